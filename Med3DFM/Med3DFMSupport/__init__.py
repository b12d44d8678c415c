"""Everything the Med3DFM Slicer module does that needs neither Slicer nor Qt.

Building job command lines (segment, adapt, models), running a job in a background process and reading its JSON progress
lines, reading the job record and table, turning registry labels into Slicer terminology strings,
marking the models that fit the selected volume (the library's domain check), estimating CPU run time
and writing the diagnostics text. The module file (Med3DFM.py) only turns
nodes into files, calls these, and turns files back into nodes; this package is tested without
Slicer (Testing/Python/test_slicer_module.py).

This is a sub-package, not a top-level .py file, because Slicer loads every top-level .py file in
a scripted-module folder as a module of its own.
"""

from Med3DFMSupport.environment import (  # noqa: F401
    MODULE_NAME,
    diagnostics_text,
    ensure_library_importable,
    estimate_cpu_seconds,
    job_environment,
    library_root,
    read_requirements,
    resources_dir,
)
from Med3DFMSupport.fit import ModelFit, mark_model_choices, mismatch_message, scan_facts  # noqa: F401
from Med3DFMSupport.jobs import (  # noqa: F401
    Job,
    JobEvent,
    JobResult,
    adapt_command,
    held_out_dice,
    models_command,
    parse_progress_line,
    segment_command,
)
from Med3DFMSupport.results import (  # noqa: F401
    PaintedSegment,
    SegmentResult,
    installed_models,
    painted_labels,
    read_job_record,
    read_tsv,
    record_path_for,
    segment_display_info,
    segments_to_update,
    terminology_string,
    write_painted_segmentation,
)
