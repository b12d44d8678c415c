"""The parts of the Med3DFM module that need Slicer, beside the panel (Med3DFM.py):

- logic: Med3DFMLogic, what the buttons do (and what scripts call): start a job, finish it into nodes;
- nodes: MRML nodes in and out (volume to file; segmentation, table and heatmap nodes from files);
- parameters: Med3DFMParameterNode, the panel's state saved with the scene;
- installer: installing the Python packages the jobs need, after the user agrees, and continuing after a restart;
- panel_models: the panel's model lists and Models section (a mixin of Med3DFMWidget);
- panel_checks: what the panel checks before a job: the device and memory estimate, a restricted licence;
- sample_data: the self-test's sample in Sample Data;
- selftest: Med3DFMTest, the self-test Slicer runs.

Slicer finds Med3DFMWidget, Med3DFMLogic and Med3DFMTest by name in Med3DFM.py, which imports them
from here. Everything that needs no Slicer is in Med3DFMSupport. Sub-packages, not top-level .py
files, because Slicer loads every top-level .py file in a scripted-module folder as a module.
"""

# Every helper module, each after those it imports: what developer mode's Reload re-reads before the
# module file (Med3DFMWidget.onReload), so an edit here takes effect without restarting Slicer.
HELPER_MODULES = (
    "Med3DFMSupport.environment",
    "Med3DFMSupport.jobs",
    "Med3DFMSupport.choices",
    "Med3DFMSupport.dependencies",
    "Med3DFMSupport.fit",
    "Med3DFMSupport.results",
    "Med3DFMSlicer.parameters",
    "Med3DFMSlicer.nodes",
    "Med3DFMSlicer.installer",
    "Med3DFMSlicer.sample_data",
    "Med3DFMSlicer.logic",
    "Med3DFMSlicer.panel_checks",
    "Med3DFMSlicer.panel_models",
    "Med3DFMSlicer.selftest",
)
