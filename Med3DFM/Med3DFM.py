"""Med3DFM: 3D medical foundation models in 3D Slicer (segmentation, learning new structures from a few
painted slices; more tasks plug into the same jobs).

The module holds no model code. It writes the input volume (and, to learn from labels, the painted
segments as a .seg.nrrd) to a per-job temporary folder, runs the library's command line
(`PythonSlicer -m Med3DFMLib.cli segment|adapt|models ...`) in a background process, shows its JSON
progress lines, and turns the outputs (.seg.nrrd, .tsv, job record) into nodes. Everything that does
not need Slicer lives in the Med3DFMSupport package next to this file.
"""

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Tuple

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from Med3DFMSupport import environment, fit, jobs, results

MODULE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "hippocampus-mr-demo"
DEVICE_LABELS = {"auto": "Automatic", "cpu": "CPU", "cuda": "GPU (CUDA)"}
LEARN_MODES = ("adapter", "prototype")  # order of the items of learnModeComboBox in the .ui
# Learn from labels: "thisScan" (painted slices of the input volume) or "otherPatients" (labelled
# volumes: a decoder trained for a time budget); order of the items of learnSourceComboBox in the .ui.
LEARN_SOURCES = ("thisScan", "otherPatients")
HEATMAP_METHODS = ("none", "attention", "gradcam", "occlusion")  # items of heatmapMethodComboBox
EXPLAIN_METHODS = ("gradcam", "occlusion")  # items of explainMethodComboBox
# Heatmaps: a perceptually ordered colour table that Slicer ships; near-zero values are left transparent.
HEATMAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
HEATMAP_OPACITY = 0.5
HEATMAP_LOWER_THRESHOLD = 0.05
SAMPLE_NAME = "Med3DFMHippocampusMR"
POLL_INTERVAL_MS = 200


#
# Med3DFM
#


class Med3DFM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Med3DFM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["Med3DFM team"]
        self.parent.helpText = _(
            "Segment CT and MR volumes with Med3DFM, a 3D medical foundation model. Pick a volume and a model and "
            "click <b>Segment</b>: a segmentation with named, coloured and coded segments and a table of segment "
            "volumes appear next to the input. Jobs run in a separate process; the panel stays responsive and "
            "<b>Cancel</b> stops a job. <b>Learn from labels</b> learns a new structure from a few slices painted in the "
            "Segment Editor and fills in the rest of the volume; the result can be saved as a model. "
            "The <b>Models</b> section lists, downloads, imports and deletes models. "
            "Results are for research use, not for diagnosis."
        )
        self.parent.acknowledgementText = _(
            "Med3DFM is developed by the Med3DFM team. The bundled demonstration model and the self-test sample are "
            "derived from the Medical Segmentation Decathlon Task04 Hippocampus data (Vanderbilt University Medical "
            "Center), licensed CC BY-SA 4.0: Simpson et al. 2019 (arXiv:1902.09063) and Antonelli et al. 2022 "
            "(Nat Commun 13:4128). Each model's licence is shown in the Models section."
        )
        # Sample data is registered once the application has started (SampleData must be loaded first).
        slicer.app.connect("startupCompleted()", registerSampleData)


def sampleFiles() -> Tuple[Path, Path]:
    """The self-test case shipped with the extension: (MR image, reference labels)."""
    root = environment.library_root(MODULE_DIR)
    folder = root / "Testing" / "Data" / "hippocampus"
    return folder / "images" / "hippocampus_014.nii.gz", folder / "labels" / "hippocampus_014.nii.gz"


def sampleCT() -> Path:
    """A small abdominal CT shipped for the self-test: outside the demo model's domain."""
    return environment.library_root(MODULE_DIR) / "Testing" / "Data" / "totalseg" / "example_ct_sm.nii.gz"


SAMPLE_SHA256 = {
    "hippocampus_014.nii.gz": "cb4d85b584f170d404578beb0eeeb018ee3f961db7dbc247c9ac49381bfad456",
}


def registerSampleData():
    """Register the shipped hippocampus MR crop in the Sample Data module (a local file: nothing is downloaded)."""
    import SampleData

    image, _labels = sampleFiles()
    if not image.is_file():
        logging.warning(f"Med3DFM sample data not found: {image}")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Med3DFM",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "Med3DFM.png"),
        uris=image.as_uri(),
        fileNames="Med3DFMHippocampus014.nii.gz",
        checksums="SHA256:" + SAMPLE_SHA256[image.name],
        nodeNames="HippocampusMR",
    )


#
# Parameter node
#


@parameterNodeWrapper
class Med3DFMParameterNode:
    """What the panel shows; saved with the scene.

    inputVolume - the CT/MR volume to process.
    outputSegmentation - None: a new segmentation node per run; a node: the model's segments in it are replaced or added, others kept.
    modelId - registry id of the segmentation model.
    device - "auto", "cpu" or "cuda".
    show3D - build closed surfaces of the result.
    learnSegmentation - Learn from labels: the segmentation with the painted segments of inputVolume.
    learnName - the name of the new structure(s) and of the adapter.
    learnMode - "adapter" (a small trained network) or "prototype" (training-free instant guess).
    learnSource - "thisScan" (the painted slices of inputVolume) or "otherPatients" (labelled volumes).
    learnBudgetMinutes - other patients: the training time budget in minutes.
    classifierId - model id of the classification adapter used by Classify.
    classifyRoi - None: classify the whole volume; a segmentation: pool only inside its visible segments.
    heatmapMethod - "none", "attention", "gradcam" or "occlusion" (the slow reference).
    explainTarget - the segment of the Segment model that Explain maps.
    explainMethod - "gradcam" or "occlusion".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: Annotated[str, Default(DEFAULT_MODEL)]
    device: Annotated[str, Choice(["auto", "cpu", "cuda"]), Default("auto")]
    show3D: Annotated[bool, Default(True)]
    learnSegmentation: vtkMRMLSegmentationNode
    learnName: Annotated[str, Default("")]
    learnMode: Annotated[str, Choice(["adapter", "prototype"]), Default("adapter")]
    learnSource: Annotated[str, Choice(["thisScan", "otherPatients"]), Default("thisScan")]
    learnBudgetMinutes: Annotated[float, WithinRange(jobs.BUDGET_MINUTES_RANGE[0], jobs.BUDGET_MINUTES_RANGE[1]), Default(jobs.BUDGET_MINUTES_DEFAULT)]
    classifierId: Annotated[str, Default("")]
    classifyRoi: vtkMRMLSegmentationNode
    heatmapMethod: Annotated[str, Choice(["none", "attention", "gradcam", "occlusion"]), Default("attention")]
    explainTarget: Annotated[str, Default("")]
    explainMethod: Annotated[str, Choice(["gradcam", "occlusion"]), Default("gradcam")]


#
# Errors
#


class Med3DFMJobError(RuntimeError):
    """A job failed: a one-line message for the user, the job's error output as details."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


#
# Med3DFMWidget
#


class Med3DFMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._modelsJob = None
        self._learnJob = None
        self._classifyJob = None
        self._learnedAdapter: Optional[Path] = None
        self._labelledPairs: List[Tuple[str, str]] = []  # other patients: (volume node ID, segmentation node ID)
        self._selectAfterImport: Optional[str] = None
        self._timer = None
        self._modelRows: List[results.ModelRow] = []
        self._modelFits: List[fit.ModelFit] = []  # the Segment model list, marked for _fitsVolumeKey
        self._fitsVolumeKey: Optional[Tuple[Any, ...]] = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/Med3DFM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = Med3DFMLogic()
        for bar in (self.ui.progressBar, self.ui.learnProgressBar, self.ui.classifyProgressBar, self.ui.modelsProgressBar):
            bar.visible = False  # shown while a job runs

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.cancelModelsButton.connect("clicked(bool)", self.onCancelModelsJob)
        self.ui.forceReinstallButton.connect("clicked(bool)", self.onForceReinstall)
        self.ui.copyDiagnosticsButton.connect("clicked(bool)", self.onCopyDiagnostics)
        self.ui.learnButton.connect("clicked(bool)", self.onLearnButton)
        self.ui.learnCancelButton.connect("clicked(bool)", self.onLearnCancelButton)
        self.ui.learnModeComboBox.connect("currentIndexChanged(int)", self.onLearnModeChanged)
        self.ui.learnSourceComboBox.connect("currentIndexChanged(int)", self.onLearnSourceChanged)
        self.ui.learnAddPairButton.connect("clicked(bool)", self.onAddLabelledPair)
        self.ui.learnRemovePairButton.connect("clicked(bool)", self.onRemoveLabelledPair)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.classifierComboBox.connect("currentIndexChanged(int)", self.onClassifierChanged)
        self.ui.heatmapMethodComboBox.connect("currentIndexChanged(int)", self.onHeatmapMethodChanged)
        self.ui.explainTargetComboBox.connect("currentIndexChanged(int)", self.onExplainTargetChanged)
        self.ui.explainMethodComboBox.connect("currentIndexChanged(int)", self.onExplainMethodChanged)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassifyButton)
        self.ui.explainButton.connect("clicked(bool)", self.onExplainButton)
        self.ui.classifyCancelButton.connect("clicked(bool)", self.onClassifyCancelButton)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJobs)

        # The model list comes from the registry file (no subprocess, no torch) so the panel opens fast.
        self.populateModelComboBox()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for job in (self._job, self._modelsJob, self._learnJob, self._classifyJob):
            if job is not None:
                job.cancel()
                job.cleanup()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._labelledPairs = []
        self._updateLabelledPairsTable()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[Med3DFMParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with the "SlicerParameterName" property in the .ui are bound to the parameter node;
            # the combo boxes filled at run time are synchronised in _updateGUI. connectParametersToGui
            # returns the tag that disconnectGui needs (connectGui returns None: Slicer issue #7547).
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._boundWidgets())
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self.populateClassifierComboBox()
            self.populateExplainTargets()
        self._updateGUI()

    def _boundWidgets(self) -> Dict[str, Any]:
        """Parameter name -> widget, for every .ui widget with the SlicerParameterName property."""
        bound = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                bound[str(name)] = widget
        return bound

    # --- GUI state -----------------------------------------------------------------------------

    def populateModelComboBox(self) -> None:
        """The Segment models, each marked as fitting the input volume or not (the library's domain check)."""
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        try:
            self._modelFits = self.logic.modelFits(volumeNode)
        except Exception as err:  # a broken registry or an unreadable volume must not break the panel
            logging.error(f"Med3DFM: cannot list the segmentation models for this volume: {err}")
            self._modelFits = []
        self._fitsVolumeKey = self.logic.volumeKey(volumeNode)
        for marked in self._modelFits:
            self.ui.modelComboBox.addItem(marked.label, marked.model_id)
        self.ui.modelComboBox.blockSignals(wasBlocked)
        if self._parameterNode:
            index = self.ui.modelComboBox.findData(self._parameterNode.modelId)
            if index >= 0:
                self.ui.modelComboBox.currentIndex = index
        self.populateClassifierComboBox()
        self.populateExplainTargets()

    def populateClassifierComboBox(self) -> None:
        combo = self.ui.classifierComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            choices = self.logic.classifierChoices()
        except Exception as err:  # an unreadable model folder must not break the panel
            logging.error(f"Med3DFM: cannot list classification adapters: {err}")
            choices = []
        for label, modelId in choices:
            combo.addItem(label, modelId)
        combo.blockSignals(wasBlocked)
        node = self._parameterNode
        if node and choices:
            index = combo.findData(node.classifierId)
            if index < 0:
                node.classifierId = combo.itemData(0)
            else:
                combo.currentIndex = index

    def populateExplainTargets(self) -> None:
        """The segments of the Segment section's model (what Explain can map)."""
        combo = self.ui.explainTargetComboBox
        node = self._parameterNode
        try:
            names = self.logic.explainTargets(node.modelId) if node else []
        except Exception as err:  # a broken registry must not break the panel
            logging.error(f"Med3DFM: cannot read the segments of {node.modelId}: {err}")
            names = []
        if [combo.itemText(i) for i in range(combo.count)] != names:
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for name in names:
                combo.addItem(name)
            combo.blockSignals(wasBlocked)
        if node and names:
            if node.explainTarget not in names:
                node.explainTarget = names[0]
            combo.currentIndex = names.index(node.explainTarget)

    def _updateGUI(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self._job is not None
        if node and self.logic.volumeKey(node.inputVolume) != self._fitsVolumeKey:
            self.populateModelComboBox()
        if node:
            index = self.ui.modelComboBox.findData(node.modelId)
            if index >= 0 and index != self.ui.modelComboBox.currentIndex:
                self.ui.modelComboBox.currentIndex = index
            deviceIndex = list(DEVICE_LABELS).index(node.device)
            if deviceIndex != self.ui.deviceComboBox.currentIndex:
                self.ui.deviceComboBox.currentIndex = deviceIndex
            modeIndex = LEARN_MODES.index(node.learnMode) if node.learnMode in LEARN_MODES else 0
            if modeIndex != self.ui.learnModeComboBox.currentIndex:
                self.ui.learnModeComboBox.currentIndex = modeIndex
            sourceIndex = LEARN_SOURCES.index(node.learnSource) if node.learnSource in LEARN_SOURCES else 0
            if sourceIndex != self.ui.learnSourceComboBox.currentIndex:
                self.ui.learnSourceComboBox.currentIndex = sourceIndex
            for combo, values, value in ((self.ui.heatmapMethodComboBox, HEATMAP_METHODS, node.heatmapMethod),
                                         (self.ui.explainMethodComboBox, EXPLAIN_METHODS, node.explainMethod)):
                wanted = values.index(value) if value in values else 0
                if wanted != combo.currentIndex:
                    combo.currentIndex = wanted
            index = self.ui.classifierComboBox.findData(node.classifierId)
            if index >= 0 and index != self.ui.classifierComboBox.currentIndex:
                self.ui.classifierComboBox.currentIndex = index
        self._updateLearnGUI()
        self._updateClassifyGUI()
        canApply = bool(node and node.inputVolume and node.modelId) and not running
        self.ui.applyButton.enabled = canApply
        self.ui.applyButton.toolTip = _("Segment the input volume") if canApply else _("Select an input volume and a model")
        self.ui.cancelButton.enabled = running
        self.ui.domainLabel.text = fit.mismatch_message(node.modelId, self._modelFits) if node else ""
        self.ui.estimateLabel.text = self._estimateText() if node and node.inputVolume else ""

    def _estimateText(self) -> str:
        node = self._parameterNode
        if node.device == "cuda" or (node.device == "auto" and self.logic.cudaLikelyAvailable()):
            return ""
        seconds = self.logic.estimateSeconds(node.inputVolume, node.modelId)
        if seconds is None:
            return _("Runs on the CPU: this can take a while.")
        return _("Runs on the CPU: expect {duration}. A CUDA GPU is much faster.").format(duration=environment.describe_duration(seconds))

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelId = self.ui.modelComboBox.itemData(index)
            self.populateExplainTargets()

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = list(DEVICE_LABELS)[index]

    # --- Segment -------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start Med3DFM."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = _("Python packages are missing: segmentation was not started.")
                return
            try:
                self._job = self.logic.startSegment(node.inputVolume, node.modelId, node.device, node.outputSegmentation)
            except Med3DFMJobError as err:  # e.g. the volume is outside the model's domain: a message, not a result
                self.ui.statusLabel.text = str(err)
                return
            self._job.context["show3D"] = node.show3D
            self._setProgress(self.ui.progressBar, 0, _("Starting..."))
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()
        self._updateGUI()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def onPollJobs(self) -> None:
        if self._job is not None:
            self._pollSegmentJob()
        if self._learnJob is not None:
            self._pollLearnJob()
        if self._classifyJob is not None:
            self._pollClassifyJob()
        if self._modelsJob is not None:
            self._pollModelsJob()
        if all(job is None for job in (self._job, self._modelsJob, self._learnJob, self._classifyJob)):
            self._timer.stop()

    def _showProgress(self, job, bar, label, describe=None) -> bool:
        """Show a job's new progress lines on its bar and label; True once the job has ended."""
        for event in job.poll():
            if event.kind == "progress":
                text = describe(event) if describe is not None else (event.message or event.stage)
                self._setProgress(bar, event.overall, text)
                label.text = text
        return job.finished

    def _settleJob(self, job, bar, label, failure: str, cancelled: str, finish) -> None:
        """Turn an ended job into nodes (`finish()` does it and returns the status text) or say why not:
        one readable message, the job's error output or the traceback as details. Always cleans up."""
        bar.visible = False
        try:
            if job.cancelled:
                label.text = cancelled
                return
            label.text = finish()
        except Exception as err:
            if isinstance(err, Med3DFMJobError):
                details = err.details
            else:
                import traceback

                details = traceback.format_exc()
            label.text = _("Failed: {message}").format(message=str(err))
            slicer.util.errorDisplay(failure.format(message=str(err)), detailedText=details)
        finally:
            job.cleanup()
            self._updateGUI()

    def _pollSegmentJob(self) -> None:
        job = self._job
        if not self._showProgress(job, self.ui.progressBar, self.ui.statusLabel):
            return
        self._job = None

        def finish() -> str:
            outputs = self.logic.finishSegment(job, show3D=job.context.get("show3D", False))
            segmentationNode, tableNode = outputs
            if tableNode is not None:
                self.showTable(tableNode)
            return _("Done in {seconds:.0f} s: {name} ({report})").format(seconds=job.result().seconds, name=segmentationNode.GetName(),
                                                                       report=outputs.report.summary())

        self._settleJob(job, self.ui.progressBar, self.ui.statusLabel, _("Segmentation failed: {message}"), _("Cancelled."), finish)

    @staticmethod
    def showTable(tableNode) -> None:
        """Make the table the one the table views show (the layout is left as the user set it)."""
        applicationLogic = slicer.app.applicationLogic()
        applicationLogic.GetSelectionNode().SetActiveTableID(tableNode.GetID())
        applicationLogic.PropagateTableSelection()

    @staticmethod
    def _setProgress(bar, fraction: float, text: str) -> None:
        bar.visible = True
        bar.value = int(round(100 * fraction))
        bar.setFormat(f"%p% {text}")

    # --- Learn from labels ---------------------------------------------------------------------

    def _otherPatients(self) -> bool:
        return bool(self._parameterNode and self._parameterNode.learnSource == "otherPatients")

    def _updateLearnGUI(self) -> None:
        node = self._parameterNode
        running = self._learnJob is not None
        other = self._otherPatients()
        named = bool(node and node.learnName.strip())
        if other:
            ready = named and bool(self._labelledPairNodes())
            tip = (_("Train a model on the labelled volumes for the time budget") if ready
                   else _("Add labelled volumes (a volume and its segmentation) and give a name"))
        else:
            ready = bool(node and node.inputVolume and node.learnSegmentation and named)
            tip = (_("Learn the painted structures and segment them in the whole volume") if ready
                   else _("Select the input volume (Segment section), the painted segmentation and a name"))
        self.ui.learnButton.enabled = ready and not running
        self.ui.learnButton.toolTip = tip
        # "This scan" widgets, "Other patients" widgets: only those of the chosen mode are usable
        self.ui.learnSegmentationSelector.enabled = not other
        self.ui.learnModeComboBox.enabled = not other
        self.ui.learnPatientsGroupBox.visible = other
        self.ui.learnBudgetSpinBox.enabled = other and not running
        self.ui.learnRemovePairButton.enabled = bool(self._labelledPairs) and not running
        self.ui.learnAddPairButton.enabled = not running
        self.ui.learnCancelButton.enabled = running
        self.ui.learnCancelButton.toolTip = (_("Stop training and keep the best model so far (a second click stops at once)")
                                             if other or (running and self._learnJob.can_stop_early)
                                             else _("Stop learning; the segmentation is not changed"))
        self.ui.saveAdapterButton.enabled = self._learnedAdapter is not None and not running and self._modelsJob is None

    def onLearnModeChanged(self, index: int) -> None:
        if self._parameterNode and 0 <= index < len(LEARN_MODES):
            self._parameterNode.learnMode = LEARN_MODES[index]

    def onLearnSourceChanged(self, index: int) -> None:
        if self._parameterNode and 0 <= index < len(LEARN_SOURCES):
            self._parameterNode.learnSource = LEARN_SOURCES[index]

    # other patients: the list of (volume, segmentation) pairs

    def _labelledPairNodes(self) -> List[Tuple[Any, Any]]:
        """The labelled volumes still in the scene, as (volume node, segmentation node)."""
        pairs = []
        for volumeId, segmentationId in self._labelledPairs:
            volumeNode, segmentationNode = slicer.mrmlScene.GetNodeByID(volumeId), slicer.mrmlScene.GetNodeByID(segmentationId)
            if volumeNode is not None and segmentationNode is not None:
                pairs.append((volumeNode, segmentationNode))
        return pairs

    def _updateLabelledPairsTable(self) -> None:
        table = self.ui.learnPairsTable
        pairs = self._labelledPairNodes()
        self._labelledPairs = [(v.GetID(), s.GetID()) for v, s in pairs]  # forget removed nodes
        table.setRowCount(len(pairs))
        for row, nodes in enumerate(pairs):
            for column, pairNode in enumerate(nodes):
                item = qt.QTableWidgetItem(pairNode.GetName())
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, column, item)

    def onAddLabelledPair(self) -> None:
        volumeNode = self.ui.learnPairVolumeSelector.currentNode()
        segmentationNode = self.ui.learnPairSegmentationSelector.currentNode()
        if volumeNode is None or segmentationNode is None:
            self.ui.learnStatusLabel.text = _("Choose a volume and the segmentation that labels it, then click Add.")
            return
        pair = (volumeNode.GetID(), segmentationNode.GetID())
        if pair not in self._labelledPairs:
            self._labelledPairs.append(pair)
        self._updateLabelledPairsTable()
        self._updateLearnGUI()

    def onRemoveLabelledPair(self) -> None:
        row = self.ui.learnPairsTable.currentRow()
        if 0 <= row < len(self._labelledPairs):
            del self._labelledPairs[row]
        elif self._labelledPairs:
            self._labelledPairs.pop()
        self._updateLabelledPairsTable()
        self._updateLearnGUI()

    def onLearnButton(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start learning."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.learnStatusLabel.text = _("Python packages are missing: learning was not started.")
                return
            if self._otherPatients():
                pairs = self._labelledPairNodes()
                self._learnJob = self.logic.startLearnFromOtherPatients(pairs, node.learnName, node.learnBudgetMinutes, node.device)
                status = _("Learning {names} from {count} labelled volume(s) for {minutes:g} min; Cancel keeps the best model so far.").format(
                    names=", ".join(self._learnJob.context["structures"]), count=len(pairs), minutes=node.learnBudgetMinutes)
            else:
                self._learnJob = self.logic.startLearnFromLabels(node.inputVolume, node.learnSegmentation, node.learnName, node.learnMode, node.device)
                status = _("Learning from: {names}").format(names=", ".join(self._learnJob.context["structures"]))
            self._learnedAdapter = None
            self._setProgress(self.ui.learnProgressBar, 0, _("Starting..."))
            self.ui.learnStatusLabel.text = status
            self._timer.start()
        self._updateGUI()

    @staticmethod
    def _stoppingText() -> str:
        return _("Stopping: keeping the best model so far")

    def onLearnCancelButton(self) -> None:
        job = self._learnJob
        if job is None:
            return
        if job.stop_or_cancel():  # other patients: the job ends on its own with the best model so far
            self._setProgress(self.ui.learnProgressBar, self.ui.learnProgressBar.value / 100.0, self._stoppingText())
            self.ui.learnStatusLabel.text = self._stoppingText()
        else:
            self.ui.learnStatusLabel.text = _("Cancelling...")

    def _pollLearnJob(self) -> None:
        job = self._learnJob

        def describe(event) -> str:
            if job.stopping:
                return self._stoppingText()
            dice = jobs.held_out_dice(event.message, event.data) if event.stage == "train" else None
            return _("training: held-out Dice {dice:.2f}").format(dice=dice) if dice is not None else (event.message or event.stage)

        if not self._showProgress(job, self.ui.learnProgressBar, self.ui.learnStatusLabel, describe):
            return
        self._learnJob = None

        def finish() -> str:
            if job.kind == jobs.DECODER_KIND:
                learned = self.logic.finishLearnFromOtherPatients(job)
                self._learnedAdapter = learned["adapter"]
                return self.logic.otherPatientsStatus(learned)
            learned = self.logic.finishLearnFromLabels(job)
            self._learnedAdapter = learned["adapter"]
            text = _("Done: {summary}. Correct the result in the Segment Editor and learn again, "
                     "or save the adapter as a model.").format(summary=results.training_summary(learned["record"]))
            if job.context.get("skipped"):
                text += " " + _("Empty segments left out: {names}.").format(names=", ".join(job.context["skipped"]))
            return text + " " + _("Segments: {report}.").format(report=learned["report"].summary())

        cancelled = (_("Cancelled: the job did not stop in time; no model was kept.") if job.kind == jobs.DECODER_KIND
                     else _("Cancelled; the segmentation was not changed."))
        self._settleJob(job, self.ui.learnProgressBar, self.ui.learnStatusLabel, _("Learning failed: {message}"), cancelled, finish)

    def onSaveAdapter(self) -> None:
        adapter = self._learnedAdapter
        if adapter is None or self._modelsJob is not None:
            return
        adapterId = results.adapter_id(adapter.name[: -len(".safetensors")])
        if not slicer.util.confirmOkCancelDisplay(
            _("Save the learned adapter as the model '{id}'? It is listed with the other models and can be chosen in the "
              "Segment section. A model saved earlier under this name is replaced.").format(id=adapterId)):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to save the adapter."), waitCursor=True):
            arguments = self.logic.adapterImportArguments(adapter)
            self._modelsJob = self.logic.startModelsJob("import", arguments)
            self._selectAfterImport = adapterId
            self.ui.modelsCollapsibleButton.collapsed = False
            self._setProgress(self.ui.modelsProgressBar, 0, _("Saving {id}").format(id=adapterId))
            self.ui.cancelModelsButton.enabled = True
            self._timer.start()
        self._updateGUI()

    # --- Classify and explain ----------------------------------------------------------------------

    def _updateClassifyGUI(self) -> None:
        node = self._parameterNode
        running = self._classifyJob is not None
        hasVolume = bool(node and node.inputVolume)
        canClassify = hasVolume and bool(node.classifierId) and self.ui.classifierComboBox.count > 0 and not running
        self.ui.classifyButton.enabled = canClassify
        self.ui.classifyButton.toolTip = (_("Classify the input volume") if canClassify else
                                          _("Select an input volume (Segment section) and a classifier (import one in Models)"))
        canExplain = hasVolume and bool(node.modelId) and bool(node.explainTarget) and not running
        self.ui.explainButton.enabled = canExplain
        self.ui.explainButton.toolTip = (_("Map which voxels drove this segment") if canExplain else
                                         _("Select an input volume and a model in the Segment section, and a segment"))
        self.ui.classifyCancelButton.enabled = running

    def onClassifierChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.classifierId = self.ui.classifierComboBox.itemData(index)

    def onHeatmapMethodChanged(self, index: int) -> None:
        if self._parameterNode and 0 <= index < len(HEATMAP_METHODS):
            self._parameterNode.heatmapMethod = HEATMAP_METHODS[index]

    def onExplainTargetChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.explainTarget = self.ui.explainTargetComboBox.itemText(index)

    def onExplainMethodChanged(self, index: int) -> None:
        if self._parameterNode and 0 <= index < len(EXPLAIN_METHODS):
            self._parameterNode.explainMethod = EXPLAIN_METHODS[index]

    def _startClassifyJob(self, start) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start Med3DFM."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.classifyStatusLabel.text = _("Python packages are missing: the job was not started.")
                return
            self._classifyJob = start()
            self._setProgress(self.ui.classifyProgressBar, 0, _("Starting..."))
            self.ui.classifyStatusLabel.text = _("Starting...")
            self._timer.start()
        self._updateGUI()

    def onClassifyButton(self) -> None:
        node = self._parameterNode
        method = None if node.heatmapMethod == "none" else node.heatmapMethod
        self._startClassifyJob(lambda: self.logic.startClassify(node.inputVolume, node.classifierId, node.classifyRoi, method, node.device))

    def onExplainButton(self) -> None:
        node = self._parameterNode
        self._startClassifyJob(lambda: self.logic.startExplain(node.inputVolume, node.modelId, node.explainTarget, node.explainMethod, node.device))

    def onClassifyCancelButton(self) -> None:
        if self._classifyJob is not None:
            self._classifyJob.cancel()
            self.ui.classifyStatusLabel.text = _("Cancelling...")

    def _pollClassifyJob(self) -> None:
        job = self._classifyJob
        if not self._showProgress(job, self.ui.classifyProgressBar, self.ui.classifyStatusLabel):
            return
        self._classifyJob = None

        def finish() -> str:
            if job.kind == "explain":
                heatmapNode = self.logic.finishExplain(job)
                return _("Heatmap: {name}").format(name=heatmapNode.GetName())
            classified = self.logic.finishClassify(job)
            self.showTable(classified["tableNode"])
            return _("Result: {summary}").format(summary=classified["result"].summary())

        failure = _("Explain failed: {message}") if job.kind == "explain" else _("Classification failed: {message}")
        self._settleJob(job, self.ui.classifyProgressBar, self.ui.classifyStatusLabel, failure, _("Cancelled."), finish)

    # --- Models --------------------------------------------------------------------------------

    def refreshModels(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to list models."), waitCursor=True):
            self._modelRows = results.model_rows(self.logic.listModels())
            table = self.ui.modelsTableWidget
            table.setRowCount(len(self._modelRows))
            for row, model in enumerate(self._modelRows):
                cells = [model.title or model.id, model.version, model.task, model.licence, model.size,
                         _("yes ({where})").format(where=model.where) if model.installed else model.where]
                for column, text in enumerate(cells):
                    cell = qt.QTableWidgetItem(text)
                    cell.setToolTip(f"{model.id}@{model.version}" + (f"\n{model.path}" if model.path else ""))
                    table.setItem(row, column, cell)
            table.resizeColumnsToContents()
            self.ui.modelsStatusLabel.text = _("Model folder: {folder}").format(folder=self.logic.modelsFolder())
        self.populateModelComboBox()
        self._updateGUI()

    def _selectedModel(self) -> Optional[results.ModelRow]:
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0 or row >= len(self._modelRows):
            slicer.util.warningDisplay(_("Select a model in the table first."))
            return None
        return self._modelRows[row]

    def onDownloadModel(self) -> None:
        model = self._selectedModel()
        if model is None or self._modelsJob is not None:
            return
        self._modelsJob = self.logic.startModelsJob("download", [f"{model.id}@{model.version}"])
        self._setProgress(self.ui.modelsProgressBar, 0, _("Downloading {id}").format(id=model.id))
        self.ui.cancelModelsButton.enabled = True
        self._timer.start()

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import a Med3DFM model"), "", _("Models (*.safetensors *.zip)"))
        if not path or self._modelsJob is not None:
            return
        self._modelsJob = self.logic.startModelsJob("import", [path])
        self._setProgress(self.ui.modelsProgressBar, 0, _("Importing {name}").format(name=os.path.basename(path)))
        self.ui.cancelModelsButton.enabled = True
        self._timer.start()

    def onRemoveModel(self) -> None:
        model = self._selectedModel()
        if model is None:
            return
        if not slicer.util.confirmOkCancelDisplay(_("Delete {id} {version} from the model folder? Bundled copies stay.").format(id=model.id, version=model.version)):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to delete the model."), waitCursor=True):
            self.logic.removeModel(f"{model.id}@{model.version}")
        self.refreshModels()

    def onOpenModelsFolder(self) -> None:
        folder = self.logic.modelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onCancelModelsJob(self) -> None:
        if self._modelsJob is not None:
            self._modelsJob.cancel()

    def _pollModelsJob(self) -> None:
        job = self._modelsJob
        for event in job.poll():
            if event.kind == "progress":
                self._setProgress(self.ui.modelsProgressBar, event.overall, event.message or event.stage)
            elif event.kind == "result":
                self.ui.modelsStatusLabel.text = _("{id}: {result}").format(id=event.data.get("id", ""), result=event.stage)
        if not job.finished:
            return
        self._modelsJob = None
        self.ui.modelsProgressBar.visible = False
        self.ui.cancelModelsButton.enabled = False
        result = job.result()
        self.logic.rememberJob(result)
        if result.cancelled:
            self.ui.modelsStatusLabel.text = _("Cancelled (a partial download resumes next time).")
        elif not result.ok:
            self.ui.modelsStatusLabel.text = _("Failed: {message}").format(message=result.error)
            slicer.util.errorDisplay(_("Model operation failed: {message}").format(message=result.error), detailedText=result.stderr)
        self.refreshModels()
        selectId, self._selectAfterImport = self._selectAfterImport, None
        if selectId and result.ok and self._parameterNode and self.ui.modelComboBox.findData(selectId) >= 0:
            self._parameterNode.modelId = selectId  # a saved adapter is ready for the Segment button
            self.ui.learnStatusLabel.text = _("Saved as the model '{id}': choose it in the Segment section for other volumes.").format(id=selectId)
        self._updateGUI()

    # --- Troubleshooting -----------------------------------------------------------------------

    def onForceReinstall(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Reinstalling the Python packages failed."), waitCursor=True):
            if self.logic.ensureDependencies(askConfirmation=True, force=True):
                slicer.util.infoDisplay(_("The Python packages were reinstalled. Restart Slicer if a package was already in use."))

    def onCopyDiagnostics(self) -> None:
        text = self.logic.diagnostics()
        qt.QApplication.clipboard().setText(text)
        slicer.util.infoDisplay(_("Diagnostics copied to the clipboard."), detailedText=text)


#
# Med3DFMLogic
#


class Med3DFMLogic(ScriptedLoadableModuleLogic):
    """Segment volumes with Med3DFM from scripts or the panel.

    Scripts::

        logic = Med3DFMLogic()
        segmentationNode, tableNode = logic.segment(volumeNode, "hippocampus-mr-demo", device="auto")
        # paint a few slices of a new structure in the Segment Editor, then:
        adapterPath = logic.learnFromLabels(volumeNode, paintedSegmentationNode, "left atrium")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.libraryRoot = environment.ensure_library_importable(MODULE_DIR)
        self.resources = environment.resources_dir(self.libraryRoot)
        self.lastJob: Optional[Dict[str, Any]] = None
        self._dependenciesOk = False
        self._scanFacts: Tuple[Any, Any] = (None, None)  # (volumeKey, facts) of the last volume measured

    def getParameterNode(self):
        return Med3DFMParameterNode(super().getParameterNode())

    # --- environment ---------------------------------------------------------------------------

    def pythonExecutable(self) -> str:
        return environment.python_executable(slicer.app.slicerHome)

    def jobEnvironment(self) -> Dict[str, str]:
        return environment.job_environment(os.environ, self.libraryRoot)

    def registryPath(self) -> Path:
        return self.resources / "models.json"

    def registryModels(self, task: Optional[str] = None) -> List[Dict[str, Any]]:
        registry = environment.read_registry(self.registryPath())
        return [m for m in registry.get("models", []) if task is None or m.get("task") == task]

    def segmentModelChoices(self) -> List[Tuple[str, str]]:
        """(label, id) for the Segment model list: registry segmentation models, then adapters saved from Learn from labels."""
        return results.segment_model_choices(self.registryModels(task="segment"), self.installedAdapters())

    @classmethod
    def volumeKey(cls, volumeNode) -> Optional[Tuple[Any, ...]]:
        """Changes whenever the volume's voxels or geometry do (the domain facts are measured again then)."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            return None
        return (volumeNode.GetID(), volumeNode.GetImageData().GetMTime(), *cls._ijkToRasArray(volumeNode).ravel())

    def scanFacts(self, volumeNode):
        """What the domain check needs to know about a volume node: extent, intensities, DICOM Modality."""
        key = self.volumeKey(volumeNode)
        if key is None:
            return None
        if self._scanFacts[0] != key:
            voxels = slicer.util.arrayFromVolume(volumeNode)
            if voxels.ndim != 3:  # e.g. RGB: not a scan any model takes (the job says so)
                return None
            shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
            modality = shNode.GetItemAttribute(shNode.GetItemByDataNode(volumeNode),
                                               slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName())
            self._scanFacts = (key, fit.scan_facts(voxels, self._ijkToRasArray(volumeNode), modality))
        return self._scanFacts[1]

    def modelFits(self, volumeNode) -> List["fit.ModelFit"]:
        """The Segment model list, each marked as fitting `volumeNode` or not (unmarked without a volume)."""
        entries: Dict[str, Dict[str, Any]] = {}
        for entry in self.registryModels(task="segment") + self.installedAdapters():
            entries.setdefault(entry["id"], entry)  # as segmentModelChoices: the registry's entry first
        return fit.mark_model_choices(self.segmentModelChoices(), entries, self.scanFacts(volumeNode))

    def modelsFolder(self) -> Path:
        from Med3DFMLib.registry.cache import models_home  # torch-free

        return models_home()

    def requirements(self) -> List[str]:
        return environment.read_requirements(self.resources / "requirements.txt")

    def missingRequirements(self) -> List[str]:
        try:
            from packaging.requirements import Requirement
        except ImportError:  # pragma: no cover - Slicer ships packaging
            Requirement = None
        missing = []
        for text in self.requirements():
            name = environment.requirement_name(text)
            installed = environment.installed_versions([name])[name]
            if installed is None:
                missing.append(text)
            elif Requirement is not None and installed not in Requirement(text).specifier:
                missing.append(text)
        return missing

    @staticmethod
    def torchInstalled() -> bool:
        return environment.installed_versions(["torch"])["torch"] is not None

    def cudaLikelyAvailable(self) -> bool:
        """Without importing torch: torch already imported and seeing CUDA, or an NVIDIA driver present."""
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            try:
                return bool(torch.cuda.is_available())
            except Exception:
                return False
        import shutil

        return shutil.which("nvidia-smi") is not None

    def ensureDependencies(self, askConfirmation: bool = True, force: bool = False) -> bool:
        """Install what the jobs need into Slicer's Python, on the main thread, after one consent dialog.

        PyTorch comes through the PyTorch extension's helper (it picks the CUDA build that matches the
        driver); the rest from Resources/requirements.txt. Packages Slicer ships are never replaced.
        Returns False if the user declined or something is still missing.
        """
        if self._dependenciesOk and not force:
            return True
        missing = self.requirements() if force else self.missingRequirements()
        needTorch = not self.torchInstalled()
        if not missing and not needTorch:
            self._dependenciesOk = True
            return True
        if askConfirmation and not slicer.app.testingEnabled():
            items = (["torch (through the PyTorch extension)"] if needTorch else []) + missing
            message = _(
                "Med3DFM needs these Python packages in Slicer's Python environment:\n\n{packages}\n\n"
                "They are downloaded from the Python Package Index (several hundred MB for PyTorch). Continue?"
            ).format(packages="\n".join("  • " + item for item in items))
            if not slicer.util.confirmOkCancelDisplay(message, _("Med3DFM: install Python packages")):
                return False
        elif slicer.app.testingEnabled() and (missing or needTorch):
            raise RuntimeError(f"Med3DFM: Python packages missing in testing mode (not installed automatically): {missing + (['torch'] if needTorch else [])}")
        if needTorch:
            self._installTorch()
        if missing:
            self._pipInstall(missing, force)
        self._dependenciesOk = not self.missingRequirements() and self.torchInstalled()
        return self._dependenciesOk

    @staticmethod
    def _installTorch() -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(_("Med3DFM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer and try again."))
        # Consent was given in our own dialog already.
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        if torch is None:
            raise RuntimeError(_("PyTorch was not installed."))

    @staticmethod
    def _pipInstall(requirements: List[str], force: bool) -> None:
        import importlib

        from packaging.requirements import Requirement

        # slicer.packaging.pip_ensure (Slicer >= 5.11; slicer.pydeps in some previews, which needs
        # Requirement objects) checks, installs and offers a restart when an already imported package
        # changed; older Slicer: pip_install.
        ensure = None
        for name in ("slicer.packaging", "slicer.pydeps"):
            try:
                ensure = getattr(importlib.import_module(name), "pip_ensure", None)
            except ImportError:
                continue
            if ensure is not None:
                break
        if ensure is not None and not force:
            ensure([Requirement(r) for r in requirements], prompt_install=False, requester="Med3DFM")
            return
        arguments = (["--force-reinstall", "--no-deps"] if force else []) + requirements
        slicer.util.pip_install(arguments)  # a list: requirements with spaces or markers stay intact

    def rememberJob(self, result: "jobs.JobResult") -> None:
        self.lastJob = result.as_dict()

    def diagnostics(self) -> str:
        info = {
            "Slicer": f"{slicer.app.applicationVersion} ({slicer.app.repositoryRevision})",
            "Slicer home": slicer.app.slicerHome,
            "job interpreter": self.pythonExecutable(),
            "Med3DFM library": str(self.libraryRoot / "Med3DFMLib"),
            "model registry": str(self.registryPath()),
            "model folder": str(self.modelsFolder()),
            "CUDA (likely)": "yes" if self.cudaLikelyAvailable() else "no",
        }
        names = ["torch"] + [environment.requirement_name(r) for r in self.requirements()]
        return environment.diagnostics_text(info, self.lastJob, environment.installed_versions(names))

    # --- jobs ----------------------------------------------------------------------------------

    def _newJobFolder(self) -> Path:
        base = slicer.app.temporaryPath or tempfile.gettempdir()
        Path(base).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="Med3DFM-", dir=base))

    @staticmethod
    def writeVolume(volumeNode, path: Path) -> None:
        """Write a volume without changing the node's own storage (its file name stays the user's)."""
        storageNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storageNode.SetFileName(str(path))
            storageNode.UseCompressionOff()
            if not storageNode.WriteData(volumeNode):
                raise RuntimeError(f"could not write {volumeNode.GetName()} to {path}")
        finally:
            storageNode.UnRegister(None)

    def startSegment(self, volumeNode, modelId: str = DEFAULT_MODEL, device: str = "auto", outputSegmentationNode=None) -> "jobs.Job":
        """Start a segment job in the background; poll it with job.poll(), then call finishSegment(job).

        A volume outside the model's declared domain is refused here (Med3DFMJobError naming the mismatch
        and the models that fit) before anything is written; the job checks again (without the DICOM tag).
        """
        message = fit.mismatch_message(modelId, self.modelFits(volumeNode))
        if message:
            raise Med3DFMJobError(message)

        def build(folder: Path, inputPath: Path):
            output = folder / "result.seg.nrrd"
            command = jobs.segment_command(self.pythonExecutable(), inputPath, output, modelId, device, table=folder / "result.tsv", registry=None)
            return command, {"modelId": modelId, "output": output, "outputSegmentationNode": outputSegmentationNode}

        return self._startJob("segment", volumeNode, build)

    def finishSegment(self, job: "jobs.Job", show3D: bool = False):
        """Turn a finished segment job's files into nodes: (segmentation node, table node), with `.report`
        (results.SegmentMerge: the segments replaced, added and kept)."""
        result = self._checkFinished(job)
        segmentResult = results.SegmentResult.from_outputs(result.outputs, job.context["output"])
        return self.loadSegmentResult(segmentResult, job.context["volumeNode"], job.context.get("outputSegmentationNode"), show3D)

    def segment(self, volumeNode, modelId: str = DEFAULT_MODEL, device: str = "auto", outputSegmentationNode=None,
                show3D: bool = False, timeout: Optional[float] = None):
        """Segment synchronously (scripts, tests): returns (segmentation node, table node), with `.report`."""
        job = self.startSegment(volumeNode, modelId, device, outputSegmentationNode)
        try:
            job.wait(timeout=timeout)
            return self.finishSegment(job, show3D=show3D)
        finally:
            job.cleanup()

    def loadSegmentResult(self, segmentResult: "results.SegmentResult", volumeNode, outputSegmentationNode=None, show3D: bool = False):
        loaded = slicer.util.loadSegmentation(str(segmentResult.segmentation))  # raises if it cannot
        self.forgetTemporaryFile(loaded)
        self.placeUnderInputTransform(volumeNode, loaded)  # before merging: Slicer resamples between the two frames
        entry = environment.registry_entry(environment.read_registry(self.registryPath()), f"{segmentResult.model_id}@{segmentResult.model_version}")
        self.applySegmentDisplay(loaded, results.segment_display_info(entry) if entry else [])
        if outputSegmentationNode is not None and outputSegmentationNode is not loaded:
            # The user chose this node as the output: only the model's segments are replaced or added,
            # everything else in it (painted, imported, other models' results) stays as it is.
            try:
                report = self.mergeResultSegments(loaded, outputSegmentationNode, volumeNode)
            finally:
                slicer.mrmlScene.RemoveNode(loaded)
            segmentationNode = outputSegmentationNode
        else:
            segmentationNode = loaded
            segmentationNode.SetName(f"{volumeNode.GetName()} {segmentResult.model_id}")
            segmentation = loaded.GetSegmentation()
            report = results.SegmentMerge(added=[segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                                          segment_ids=[segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())])
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.CreateDefaultDisplayNodes()
        if show3D:
            segmentationNode.CreateClosedSurfaceRepresentation()

        tableNode = self.loadTable(segmentResult, f"{volumeNode.GetName()} {segmentResult.model_id} volumes") if segmentResult.table else None

        modelText = f"{segmentResult.model_id}@{segmentResult.model_version}"
        for node in (segmentationNode, tableNode):
            if node is not None:
                node.SetAttribute(results.PROVENANCE_ATTRIBUTE, segmentResult.provenance)
                node.SetAttribute(results.MODEL_ATTRIBUTE, modelText)
        self.placeBesideInput(volumeNode, [segmentationNode, tableNode])
        return results.SegmentOutputs(segmentationNode, tableNode, report)

    @staticmethod
    def _segmentIds(segmentation) -> List[str]:
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    def mergeResultSegments(self, resultNode, segmentationNode, volumeNode) -> "results.SegmentMerge":
        """Put the segments of `resultNode` into the user's `segmentationNode` without touching anything else.

        A result segment replaces the segment of the same name (case-insensitive) whose terminology
        agrees where both have one (results.plan_segment_merge): that segment keeps its ID, its place in
        the list and its display settings; its voxels, name, colour and terminology become the
        result's. Other result segments are added. Every other segment keeps its ID, name, colour,
        tags and voxels. Returns what was replaced, added and kept.
        """
        source = resultNode.GetSegmentation()
        target = segmentationNode.GetSegmentation()
        sourceIds = self._segmentIds(source)
        existing = [(segmentId, target.GetSegment(segmentId).GetName(), self.segmentTerminology(target.GetSegment(segmentId)))
                    for segmentId in self._segmentIds(target)]
        plan = results.plan_segment_merge([(source.GetSegment(i).GetName(), self.segmentTerminology(source.GetSegment(i))) for i in sourceIds], existing)
        # Overlaps: a replaced segment gets a labelmap of its own (updateSegmentBinaryLabelmapFromArray
        # imports it as a new layer after clearing only that segment) and an added one keeps its own
        # copy (CopySegmentFromSegmentation), so where the result overlaps a kept segment both keep
        # their voxels: Slicer's default, segments may overlap in a multi-layer segmentation. Nothing is
        # erased from a kept segment.
        # Replacements first: if Slicer refuses one (e.g. a node whose source representation is not a
        # binary labelmap), nothing has been added yet.
        targetIds: Dict[str, str] = {}
        for sourceId, update in zip(sourceIds, plan):
            if update.target_id is None:
                continue
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(resultNode, sourceId, volumeNode)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, update.target_id, volumeNode)
            self.copySegmentProperties(source.GetSegment(sourceId), target.GetSegment(update.target_id))
            targetIds[sourceId] = update.target_id
        for sourceId, update in zip(sourceIds, plan):
            if update.target_id is not None:
                continue
            before = set(self._segmentIds(target))
            # The copy keeps the source ID unless the node has one already; then Slicer makes it unique.
            if not target.CopySegmentFromSegmentation(source, sourceId):
                raise RuntimeError(f"could not add the segment '{update.result_name}' to {segmentationNode.GetName()}")
            targetIds[sourceId] = next(i for i in self._segmentIds(target) if i not in before)
        changed = set(targetIds.values())
        return results.SegmentMerge(
            replaced=[u.result_name for u in plan if u.target_id is not None],
            added=[u.result_name for u in plan if u.target_id is None],
            kept=[name for segmentId, name, _terminology in existing if segmentId not in changed],
            segment_ids=[targetIds[i] for i in sourceIds])

    def copySegmentProperties(self, source, segment) -> None:
        """Name, colour and (where the result has one) terminology of a result segment onto the segment it replaced."""
        if segment.GetName() != source.GetName():
            segment.SetName(source.GetName())
        if any(abs(a - b) > 1e-6 for a, b in zip(segment.GetColor(), source.GetColor())):
            segment.SetColor(*source.GetColor())
        terminology = self.segmentTerminology(source)
        if terminology and self.segmentTerminology(segment) != terminology:
            segment.SetTag("TerminologyEntry", terminology)

    @staticmethod
    def forgetTemporaryFile(node) -> None:
        """A node read from a job folder (deleted afterwards) must not keep pointing at it: without its
        storage node, Save Data proposes a new file (as Slicer's SampleData module does)."""
        storageNode = node.GetStorageNode()
        if storageNode is not None:
            slicer.mrmlScene.RemoveNode(storageNode)
            node.SetAndObserveStorageNodeID(None)

    @staticmethod
    def segmentTerminology(segment) -> str:
        getter = getattr(segment, "GetTerminology", None)
        if getter is not None:
            return getter() or ""
        value = vtk.reference("")  # vtkSegment::GetTag(tag, std::string& value)
        if segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value):
            return str(value)
        return ""

    def applySegmentDisplay(self, segmentationNode, display: List["results.SegmentDisplay"]) -> None:
        """Names, colours and terminology as the registry says (the .seg.nrrd normally carries them already)."""
        segmentation = segmentationNode.GetSegmentation()
        for index, info in enumerate(display):
            if index >= segmentation.GetNumberOfSegments():
                break
            segment = segmentation.GetNthSegment(index)
            if segment.GetName() != info.name:
                segment.SetName(info.name)
            if any(abs(a - b) > 1e-3 for a, b in zip(segment.GetColor(), info.color)):
                segment.SetColor(*info.color)
            if info.terminology and self.segmentTerminology(segment) != info.terminology:
                segment.SetTag("TerminologyEntry", info.terminology)

    @classmethod
    def loadTable(cls, segmentResult: "results.SegmentResult", name: str):
        """A table node from the job's .tsv, with the model id and version on every row."""
        _comments, columns, rows = results.read_tsv(segmentResult.table)
        header = ["model", "model version"] + columns
        values = [[segmentResult.model_id, segmentResult.model_version] + row for row in rows]
        return cls.tableFromColumns(name, [(column, [row[index] for row in values]) for index, column in enumerate(header)])

    @staticmethod
    def tableFromColumns(name: str, columns: List[Tuple[str, List[Any]]]):
        """A new table node; integer, real and text columns keep their types."""
        tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for columnName, cells in columns:
            if all(isinstance(c, int) for c in cells):
                array = vtk.vtkIntArray()
            elif all(isinstance(c, (int, float)) for c in cells):
                array = vtk.vtkDoubleArray()
            else:
                array = vtk.vtkStringArray()
                cells = [str(c) for c in cells]
            array.SetName(columnName)
            for cell in cells:
                array.InsertNextValue(cell)
            tableNode.AddColumn(array)
        tableNode.Modified()
        return tableNode

    @staticmethod
    def placeUnderInputTransform(volumeNode, node) -> None:
        """A result read from a job file is in the volume's own (local) frame, as the job saw the volume:
        under the volume's parent transform (not hardened) it lines up with the volume wherever that is."""
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())

    @staticmethod
    def placeBesideInput(volumeNode, nodes) -> None:
        """Put the outputs in the input's study (its parent in the Subject Hierarchy)."""
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        if not parent:
            return
        for node in nodes:
            if node is not None:
                shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)

    # --- classify and explain -------------------------------------------------------------------

    def installedAdapters(self) -> List[Dict[str, Any]]:
        try:
            return results.installed_models(self.modelsFolder(), task="adapter")
        except Exception as err:  # an unreadable model folder must not hide the rest
            logging.warning(f"Med3DFM: cannot list saved adapters: {err}")
            return []

    def classifierChoices(self) -> List[Tuple[str, str]]:
        """(label, id) for the Classify model list: classification adapters in the model folder."""
        return results.classifier_choices(self.installedAdapters())

    def explainTargets(self, modelId: str) -> List[str]:
        """The segment names Explain accepts for a registry model or a saved segmentation adapter."""
        entry = environment.registry_entry(environment.read_registry(self.registryPath()), modelId)
        if entry is None:
            entry = next((e for e in self.installedAdapters() if e.get("id") == modelId), None)
        return results.segment_names(entry)

    def exportRegion(self, volumeNode, segmentationNode, path: Path) -> "results.PaintedLabels":
        """The visible segments of `segmentationNode` as one region (.seg.nrrd on the volume's geometry)."""
        try:
            region = results.region_labels(self.paintedSegments(volumeNode, segmentationNode))
        except ValueError as err:
            raise Med3DFMJobError(str(err)) from None
        results.write_painted_segmentation(path, region, self._ijkToRasArray(volumeNode))
        return region

    def _startJob(self, kind: str, volumeNode, build) -> "jobs.Job":
        """Write the volume into a new job folder, build the command (`build(folder, inputPath)` returns
        (command, context)) and start it; the folder is removed if anything fails before the start.
        A context "stopFile" makes Cancel ask the job to stop early (jobs.Job.stop_or_cancel)."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError(_("The input volume has no image data."))
        folder = self._newJobFolder()
        try:
            inputPath = folder / "input.nrrd"
            self.writeVolume(volumeNode, inputPath)
            command, context = build(folder, inputPath)
            job = jobs.Job(command, kind=kind, env=self.jobEnvironment(), cwd=str(folder), temp_dir=folder,
                           stop_file=context.pop("stopFile", None))
            job.context.update(volumeNode=volumeNode, **context)
            job.start()
        except Exception:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            raise
        logging.info("Med3DFM job: " + subprocess.list2cmdline(command))
        return job

    def _checkFinished(self, job: "jobs.Job") -> "jobs.JobResult":
        """The job's result, remembered for diagnostics; a cancelled or failed job raises Med3DFMJobError."""
        result = job.result()
        self.rememberJob(result)
        if result.cancelled:
            raise Med3DFMJobError(_("cancelled"), result.stderr)
        if not result.ok:
            raise Med3DFMJobError(result.error or _("the job failed"), result.stderr)
        return result

    def startClassify(self, volumeNode, modelId: str, roiSegmentationNode=None, heatmapMethod: Optional[str] = "attention",
                      device: str = "auto") -> "jobs.Job":
        """Start `classify` in the background (optionally inside the visible segments of a segmentation,
        optionally with a heatmap); poll job.poll(), then finishClassify(job)."""
        if not modelId:
            raise ValueError(_("Choose a classification adapter (import one in the Models section)."))

        def build(folder: Path, inputPath: Path):
            roi = None
            if roiSegmentationNode is not None:
                roi = folder / "region.seg.nrrd"
                self.exportRegion(volumeNode, roiSegmentationNode, roi)
            table = folder / "result.tsv"
            heatmap = folder / "heatmap.nrrd" if heatmapMethod else None
            command = jobs.classify_command(self.pythonExecutable(), inputPath, table, modelId, device, roi=roi, heatmap=heatmap,
                                            heatmap_method=heatmapMethod or "attention")
            return command, {"modelId": modelId, "table": table}

        return self._startJob("classify", volumeNode, build)

    def finishClassify(self, job: "jobs.Job") -> Dict[str, Any]:
        """Table node of class probabilities (+ heatmap overlay when asked): {"result", "tableNode", "heatmapNode"}."""
        result = self._checkFinished(job)
        classified = results.ClassifyResult.from_outputs(result.outputs, job.context["table"])
        volumeNode = job.context["volumeNode"]
        tableNode = self.tableFromColumns(f"{volumeNode.GetName()} {classified.model_id} classes", classified.table_columns())
        provenance = json.dumps(classified.record, sort_keys=True)
        tableNode.SetAttribute(results.PROVENANCE_ATTRIBUTE, provenance)
        tableNode.SetAttribute(results.MODEL_ATTRIBUTE, f"{classified.model_id}@{classified.model_version}")
        heatmapNode = None
        if classified.heatmap is not None:
            heatmapNode = self.loadHeatmap(classified.heatmap, volumeNode, f"{volumeNode.GetName()} {classified.model_id} heatmap ({classified.heatmap.title()})")
        self.placeBesideInput(volumeNode, [tableNode, heatmapNode])
        return {"result": classified, "tableNode": tableNode, "heatmapNode": heatmapNode}

    def classify(self, volumeNode, modelId: str, roiSegmentationNode=None, heatmapMethod: Optional[str] = "attention",
                 device: str = "auto", timeout: Optional[float] = None) -> Dict[str, Any]:
        """Classify synchronously (scripts, tests); see finishClassify for what it returns."""
        job = self.startClassify(volumeNode, modelId, roiSegmentationNode, heatmapMethod, device)
        try:
            job.wait(timeout=timeout)
            return self.finishClassify(job)
        finally:
            job.cleanup()

    def startExplain(self, volumeNode, modelId: str, target: str, method: str = "gradcam", device: str = "auto") -> "jobs.Job":
        """Start `explain` (a heatmap of one segment of any segmentation model or adapter) in the background."""

        def build(folder: Path, inputPath: Path):
            heatmap = folder / "heatmap.nrrd"
            command = jobs.explain_command(self.pythonExecutable(), inputPath, heatmap, modelId, target, method, device)
            return command, {"modelId": modelId, "heatmap": heatmap, "target": target}

        return self._startJob("explain", volumeNode, build)

    def finishExplain(self, job: "jobs.Job"):
        """The heatmap of a finished explain job as an overlay on its input; returns the volume node."""
        result = self._checkFinished(job)
        heatmap = results.HeatmapResult.from_file(Path(result.outputs.get("heatmap") or job.context["heatmap"]))
        volumeNode = job.context["volumeNode"]
        heatmapNode = self.loadHeatmap(heatmap, volumeNode, f"{volumeNode.GetName()} {job.context['modelId']} heatmap ({heatmap.title()})")
        self.placeBesideInput(volumeNode, [heatmapNode])
        return heatmapNode

    def explain(self, volumeNode, modelId: str, target: str, method: str = "gradcam", device: str = "auto",
                timeout: Optional[float] = None):
        """Explain synchronously (scripts, tests): the heatmap volume node."""
        job = self.startExplain(volumeNode, modelId, target, method, device)
        try:
            job.wait(timeout=timeout)
            return self.finishExplain(job)
        finally:
            job.cleanup()

    def loadHeatmap(self, heatmap: "results.HeatmapResult", volumeNode, name: str):
        """Load a heatmap as a scalar volume and show it over its input: colour map, fixed 0..1 range,
        near-zero values transparent, half opacity. Its JSON note is attached as provenance."""
        heatmapNode = slicer.util.loadVolume(str(heatmap.path), {"name": name, "show": False})  # raises if it cannot
        self.forgetTemporaryFile(heatmapNode)
        self.placeUnderInputTransform(volumeNode, heatmapNode)
        displayNode = heatmapNode.GetDisplayNode()
        if displayNode is None:
            heatmapNode.CreateDefaultDisplayNodes()
            displayNode = heatmapNode.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID(HEATMAP_COLOR_NODE_ID)
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0.0, 1.0)
        displayNode.SetThreshold(HEATMAP_LOWER_THRESHOLD, 1.0)
        displayNode.ApplyThresholdOn()
        heatmapNode.SetAttribute(results.PROVENANCE_ATTRIBUTE, json.dumps(heatmap.note, sort_keys=True, default=str))
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=heatmapNode, foregroundOpacity=HEATMAP_OPACITY)
        return heatmapNode

    # --- learn from labels -----------------------------------------------------------------------

    def adaptersFolder(self) -> Path:
        """Where learned adapters are kept until (and after) they are saved to the model folder."""
        base = Path(slicer.app.temporaryPath or tempfile.gettempdir())
        return base / "Med3DFM-adapters"

    @staticmethod
    def _ijkToRasArray(volumeNode):
        import numpy as np

        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])

    @staticmethod
    def learnedSegmentIds(segmentationNode, segmentIds: Optional[List[str]] = None) -> List[str]:
        """The segments to learn from: the given ids, else every segment visible in the views.

        Hidden segments (e.g. finished structures from an earlier run) are neither learned nor changed.
        """
        segmentation = segmentationNode.GetSegmentation()
        allIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if segmentIds is not None:
            unknown = [i for i in segmentIds if i not in allIds]
            if unknown:
                raise ValueError(f"no segment with id {unknown[0]} in {segmentationNode.GetName()}")
            return [i for i in allIds if i in segmentIds]
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is None:
            return allIds
        return [i for i in allIds if displayNode.GetSegmentVisibility(i)]

    def paintedSegments(self, volumeNode, segmentationNode, segmentIds: Optional[List[str]] = None) -> List["results.PaintedSegment"]:
        """The segments to learn from, each as a mask on the volume's grid (Slicer resamples if needed)."""
        import numpy as np

        segmentation = segmentationNode.GetSegmentation()
        painted = []
        for segmentId in self.learnedSegmentIds(segmentationNode, segmentIds):
            segment = segmentation.GetSegment(segmentId)
            mask = np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)) > 0
            painted.append(results.PaintedSegment(segmentId, segment.GetName(), tuple(segment.GetColor()),
                                                  self.segmentTerminology(segment), mask))
        return painted

    def exportPaintedLabels(self, volumeNode, segmentationNode, path: Path, segmentIds: Optional[List[str]] = None) -> "results.PaintedLabels":
        """The painted segments as one .seg.nrrd on the volume's geometry (what `adapt --labels` reads)."""
        try:
            painted = results.painted_labels(self.paintedSegments(volumeNode, segmentationNode, segmentIds))
        except ValueError as err:
            raise Med3DFMJobError(str(err)) from None
        results.write_painted_segmentation(path, painted, self._ijkToRasArray(volumeNode))
        return painted

    def checkAdapterName(self, name: str) -> str:
        """The adapter id for `name`; refuses names that would shadow a built-in model."""
        if not name or not name.strip():
            raise Med3DFMJobError(_("Give the new structure a name."))
        adapterId = results.adapter_id(name)
        if any(entry.get("id") == adapterId for entry in self.registryModels()):
            raise Med3DFMJobError(_("'{name}' is the name of a built-in model; choose another name.").format(name=name))
        return adapterId

    def startLearnFromLabels(self, volumeNode, segmentationNode, name: str, mode: str = "adapter", device: str = "auto",
                             segmentIds: Optional[List[str]] = None) -> "jobs.Job":
        """Start `adapt` in the background on the painted segments; poll job.poll(), then finishLearnFromLabels(job)."""
        if segmentationNode is None:
            raise ValueError(_("Choose the segmentation that holds the painted segments."))
        self.checkAdapterName(name)

        def build(folder: Path, inputPath: Path):
            labelsPath = folder / "painted.seg.nrrd"
            painted = self.exportPaintedLabels(volumeNode, segmentationNode, labelsPath, segmentIds)
            adapter = folder / results.adapter_file_name(name)
            output = folder / "learned.seg.nrrd"
            command = jobs.adapt_command(self.pythonExecutable(), inputPath, labelsPath, name.strip(), adapter, mode, device, segment=output)
            return command, {"segmentationNode": segmentationNode, "name": name.strip(), "mode": mode, "adapter": adapter,
                             "output": output, "structures": painted.structures, "skipped": painted.skipped}

        return self._startJob("adapt", volumeNode, build)

    def finishLearnFromLabels(self, job: "jobs.Job") -> Dict[str, Any]:
        """Keep the adapter, put the learned segments into the painted node, attach the record.

        Returns {"adapter": path of the kept adapter, "record": the job record, "segmentIds": updated
        or added segment ids, "segmentationNode": the painted node}.
        """
        result = self._checkFinished(job)
        adapter, record = self._keepAdapter(Path(result.outputs.get("adapter") or job.context["adapter"]))

        segmentationNode = job.context["segmentationNode"]
        volumeNode = job.context["volumeNode"]
        output = Path(result.outputs.get("segmentation") or job.context["output"])
        report = self.applyLearnedSegments(output, volumeNode, segmentationNode, record.get("adapter", {}).get("classes") or job.context["structures"])
        segmentationNode.SetAttribute(results.PROVENANCE_ATTRIBUTE, json.dumps(record, sort_keys=True))
        segmentationNode.SetAttribute(results.MODEL_ATTRIBUTE, str(record.get("adapter", {}).get("id", "")))
        segmentationNode.SetAttribute(results.ADAPTER_ATTRIBUTE, str(adapter))
        return {"adapter": adapter, "record": record, "segmentIds": report.segment_ids, "report": report, "segmentationNode": segmentationNode}

    def _keepAdapter(self, learned: Path) -> Tuple[Path, Dict[str, Any]]:
        """Copy a job's adapter and its record out of the job folder into adaptersFolder()."""
        import shutil

        record = results.adapter_record(learned)
        folder = self.adaptersFolder()
        folder.mkdir(parents=True, exist_ok=True)
        adapter = folder / learned.name
        shutil.copyfile(learned, adapter)
        (folder / (learned.name[: -len(".safetensors")] + ".json")).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return adapter, record

    def buildOtherPatientsCommand(self, folder: Path, pairs: List[Tuple[Any, Any]], name: str,
                                  budgetMinutes: float = jobs.BUDGET_MINUTES_DEFAULT, device: str = "auto",
                                  firstImage: Optional[Path] = None) -> Tuple[List[str], Dict[str, Any]]:
        """Write each labelled volume and its segmentation (visible segments, whole-volume labels) into
        `folder`; the `adapt --mode decoder --dense --budget-minutes` command and the job context.
        `firstImage`: where the first volume has been written already."""
        folder = Path(folder)
        labelled, files = [], []
        for index, (volumeNode, segmentationNode) in enumerate(pairs, start=1):
            if volumeNode is None or segmentationNode is None or volumeNode.GetImageData() is None:
                raise ValueError(_("Labelled volume {index}: choose a volume with image data and its segmentation.").format(index=index))
            image = firstImage if index == 1 and firstImage is not None else folder / f"image-{index}.nrrd"
            if image != firstImage:
                self.writeVolume(volumeNode, image)
            labelsPath = folder / f"labels-{index}.seg.nrrd"
            painted = self.exportPaintedLabels(volumeNode, segmentationNode, labelsPath)
            labelled.append((f"{volumeNode.GetName()} ({segmentationNode.GetName()})", painted.structures))
            files.append((image, labelsPath))
        try:
            structures = results.common_structures(labelled)
        except ValueError as err:
            raise Med3DFMJobError(str(err)) from None
        adapter = folder / results.adapter_file_name(name)
        command = jobs.decoder_adapt_command(self.pythonExecutable(), files, name.strip(), adapter, budgetMinutes, device)
        return command, {"name": name.strip(), "mode": "decoder", "adapter": adapter, "structures": structures,
                         "volumes": len(files), "budgetMinutes": float(budgetMinutes), "stopFile": jobs.stop_file_for(adapter)}

    def startLearnFromOtherPatients(self, pairs: List[Tuple[Any, Any]], name: str, budgetMinutes: float = jobs.BUDGET_MINUTES_DEFAULT,
                                    device: str = "auto") -> "jobs.Job":
        """Start `adapt --mode decoder` on labelled volumes ((volume node, segmentation node) pairs, the
        same structure names in each) for `budgetMinutes`; poll job.poll(), then finishLearnFromOtherPatients(job).
        job.stop_or_cancel() (Cancel) ends training early and keeps the best model so far."""
        pairs = list(pairs or [])
        if not pairs:
            raise ValueError(_("Add at least one labelled volume (a volume and the segmentation with its structures)."))
        self.checkAdapterName(name)

        def build(folder: Path, inputPath: Path):
            return self.buildOtherPatientsCommand(folder, pairs, name, budgetMinutes, device, firstImage=inputPath)

        return self._startJob(jobs.DECODER_KIND, pairs[0][0], build)

    def finishLearnFromOtherPatients(self, job: "jobs.Job") -> Dict[str, Any]:
        """Keep the trained model (a job stopped by Cancel still wrote its best one) in adaptersFolder().
        Returns {"adapter": the kept file, "record": the job record, "stoppedEarly": bool}; Save as model
        (saveAdapter) makes it a Segment model for any volume."""
        result = self._checkFinished(job)
        adapter, record = self._keepAdapter(Path(result.outputs.get("adapter") or job.context["adapter"]))
        return {"adapter": adapter, "record": record, "stoppedEarly": results.stopped_early(record)}

    @staticmethod
    def otherPatientsStatus(learned: Dict[str, Any]) -> str:
        """The panel's status line for a finished other-patients job (finishLearnFromOtherPatients' result)."""
        text = _("Done: {summary}.").format(summary=results.training_summary(learned["record"]))
        if learned["stoppedEarly"]:
            text += " " + _("Stopped early: the best model so far was kept.")
        return text + " " + _("To apply it, click Save as model, then choose '{id}' in the Segment section and segment "
                              "any volume.").format(id=learned["record"].get("adapter", {}).get("id", ""))

    def learnFromOtherPatients(self, pairs: List[Tuple[Any, Any]], name: str, budgetMinutes: float = jobs.BUDGET_MINUTES_DEFAULT,
                               device: str = "auto", save: bool = True, timeout: Optional[float] = None) -> Path:
        """Train on labelled volumes synchronously (scripts, tests); the adapter file (in the model folder when `save`)."""
        job = self.startLearnFromOtherPatients(pairs, name, budgetMinutes, device)
        try:
            job.wait(timeout=timeout)
            learned = self.finishLearnFromOtherPatients(job)
        finally:
            job.cleanup()
        return self.saveAdapter(learned["adapter"]) if save else learned["adapter"]

    def applyLearnedSegments(self, output: Path, volumeNode, segmentationNode, structures: List[str]) -> "results.SegmentMerge":
        """Replace the painted structures (matched by name) with the full result; add any that are missing.

        Only the voxels of a replaced segment change (its ID, name, colour and terminology are the
        user's). Background and every other segment of the node are left as they are; overlaps are
        kept as in mergeResultSegments. Returns what was replaced, added and kept.
        """
        loaded = slicer.util.loadSegmentation(str(output))  # raises if it cannot
        self.placeUnderInputTransform(volumeNode, loaded)
        try:
            source = loaded.GetSegmentation()
            sourceIds = {source.GetNthSegment(i).GetName(): source.GetNthSegmentID(i) for i in range(source.GetNumberOfSegments())}
            target = segmentationNode.GetSegmentation()
            existing = {target.GetNthSegmentID(i): target.GetNthSegment(i).GetName() for i in range(target.GetNumberOfSegments())}
            report = results.SegmentMerge()
            for update in results.segments_to_update(list(sourceIds), existing, structures):
                sourceId = sourceIds[update.result_name]
                if update.target_id is None:
                    before = set(self._segmentIds(target))
                    if not target.CopySegmentFromSegmentation(source, sourceId):
                        raise RuntimeError(f"could not add the segment '{update.result_name}' to {segmentationNode.GetName()}")
                    report.segment_ids += [i for i in self._segmentIds(target) if i not in before]
                    report.added.append(update.result_name)
                else:
                    mask = slicer.util.arrayFromSegmentBinaryLabelmap(loaded, sourceId, volumeNode)
                    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, update.target_id, volumeNode)
                    report.segment_ids.append(update.target_id)
                    report.replaced.append(existing[update.target_id])
            report.kept = [name for segmentId, name in existing.items() if segmentId not in report.segment_ids]
        finally:
            slicer.mrmlScene.RemoveNode(loaded)
        segmentationNode.CreateDefaultDisplayNodes()
        return report

    def adapterImportArguments(self, adapter: Path) -> List[str]:
        """Make room for a new copy of a learned adapter in the model folder; the `models import` arguments.

        Every learned adapter has version 1.0.0, so a copy saved earlier under the same name is removed
        first (the library refuses to overwrite a different file of the same id@version).
        """
        adapterId = results.adapter_id(Path(adapter).name[: -len(".safetensors")])
        for entry in results.installed_models(self.modelsFolder(), task="adapter"):
            if entry.get("id") == adapterId:
                self._runModelsCommand("remove", [f"{entry['id']}@{entry['version']}"])
        return [str(adapter)]

    def saveAdapter(self, adapter: Path) -> Path:
        """Install a learned adapter into the model folder (`models import`), listed beside the built-in models."""
        completed = self._runModelsCommand("import", self.adapterImportArguments(adapter))
        for line in completed.stdout.splitlines():
            event = jobs.parse_progress_line(line, "models")
            if event.kind == "result" and event.stage == "imported" and event.data.get("path"):
                return Path(event.data["path"])
        raise Med3DFMJobError(_("the adapter was not imported"), completed.stdout + completed.stderr)

    def learnFromLabels(self, volumeNode, segmentationNode, name: str, mode: str = "adapter", device: str = "auto",
                        save: bool = True, timeout: Optional[float] = None, segmentIds: Optional[List[str]] = None) -> Path:
        """Learn structures from a few painted slices, synchronously (scripts, tests).

        Learns from the visible segments of `segmentationNode` (or `segmentIds`); a segment named
        "background" marks explicit negatives. The painted structures are replaced by the full 3D
        result; background and other segments stay. Returns the adapter file: its copy in the model
        folder when `save` (then usable by Segment), else the kept copy in adaptersFolder().
        """
        job = self.startLearnFromLabels(volumeNode, segmentationNode, name, mode, device, segmentIds)
        try:
            job.wait(timeout=timeout)
            learned = self.finishLearnFromLabels(job)
        finally:
            job.cleanup()
        if save:
            return self.saveAdapter(learned["adapter"])
        return learned["adapter"]

    # --- models --------------------------------------------------------------------------------

    def _runModelsCommand(self, action: str, arguments: List[str], timeout: float = 120) -> subprocess.CompletedProcess:
        command = jobs.models_command(self.pythonExecutable(), action, arguments)
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
        completed = subprocess.run(command, env=self.jobEnvironment(), capture_output=True, text=True, encoding="utf-8",
                                   errors="replace", timeout=timeout, **kwargs)
        self.lastJob = {"command": command, "returncode": completed.returncode, "stderr": completed.stderr,
                        "error": None if completed.returncode == 0 else (completed.stderr.strip().splitlines() or ["failed"])[-1]}
        if completed.returncode != 0:
            raise Med3DFMJobError(self.lastJob["error"], completed.stderr)
        return completed

    def listModels(self) -> List[Dict[str, Any]]:
        """`models list --json`, run as a job (the registry code stays out of Slicer's process)."""
        return json.loads(self._runModelsCommand("list", []).stdout)

    def removeModel(self, spec: str) -> None:
        self._runModelsCommand("remove", [spec])

    def startModelsJob(self, action: str, arguments: List[str]) -> "jobs.Job":
        """`models download|import ...` in the background, with progress; poll like a segment job."""
        command = jobs.models_command(self.pythonExecutable(), action, arguments)
        return jobs.Job(command, kind="models", env=self.jobEnvironment()).start()

    def estimateSeconds(self, volumeNode, modelId: str) -> Optional[float]:
        entry = environment.registry_entry(environment.read_registry(self.registryPath()), modelId)
        imageData = volumeNode.GetImageData() if volumeNode else None
        if not entry or imageData is None:
            return None
        return environment.estimate_cpu_seconds(imageData.GetDimensions(), volumeNode.GetSpacing(), entry.get("input", {}))


#
# Med3DFMTest
#


class Med3DFMTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the shipped hippocampus sample through the real job, checked against its labels."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_sample()
        self.setUp()
        self.test_segment_under_a_transform()
        self.setUp()
        self.test_a_ct_is_refused_by_the_mr_model()
        self.setUp()
        self.test_learn_from_three_slices()
        self.setUp()
        self.test_explain_a_segment()

    def _loadSample(self):
        """(volume node, reference label array) of the shipped sample."""
        import SampleData

        registerSampleData()
        volumeNode = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(volumeNode)
        _image, labelsPath = sampleFiles()
        return volumeNode, slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labelsPath)))

    def test_learn_from_three_slices(self):
        """Learn from labels: the reference painted on 3 slices, the rest of the volume filled in (Dice checked)."""
        import numpy as np

        self.delayDisplay("Painting 3 slices of the sample")
        volumeNode, reference = self._loadSample()
        z = np.nonzero(reference.any(axis=(1, 2)))[0]
        slices = sorted({int(v) for v in np.percentile(z, (20, 50, 80)).astype(int)})
        painted = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
        painted.CreateDefaultDisplayNodes()
        painted.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        names = {1: "anterior hippocampus", 2: "posterior hippocampus"}
        for value, name in names.items():
            segmentId = painted.GetSegmentation().AddEmptySegment(name, name)
            mask = np.zeros(reference.shape, np.uint8)
            mask[slices] = reference[slices] == value
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, painted, segmentId, volumeNode)

        self.delayDisplay("Learning (a background job)")
        logic = Med3DFMLogic()
        logic.learnFromLabels(volumeNode, painted, "selftest hippocampus", mode="adapter", device="auto", save=False, timeout=900)
        unpainted = [k for k in range(reference.shape[0]) if k not in slices]
        for value, name in names.items():
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(painted, name, volumeNode) > 0
            truth = reference == value
            dice = 2.0 * np.logical_and(mask[unpainted], truth[unpainted]).sum() / max(1, mask[unpainted].sum() + truth[unpainted].sum())
            self.delayDisplay(f"{name}: Dice {dice:.3f} on the unpainted slices")
            self.assertGreater(dice, 0.35)  # about 0.57 / 0.68 when measured outside Slicer
        self.delayDisplay("Test passed")

    def test_explain_a_segment(self):
        """Explain: the Grad-CAM heatmap of the demo model's anterior hippocampus, brighter on the structure."""
        self.delayDisplay("Explaining a segment (a background job)")
        volumeNode, reference = self._loadSample()
        heatmapNode = Med3DFMLogic().explain(volumeNode, DEFAULT_MODEL, "anterior hippocampus", "gradcam", device="auto", timeout=600)
        heat = slicer.util.arrayFromVolume(heatmapNode)
        self.assertEqual(heat.shape, reference.shape)
        self.assertGreater(heat[reference == 1].mean(), 2 * heat[reference == 0].mean())
        self.assertEqual(heatmapNode.GetDisplayNode().GetColorNodeID(), HEATMAP_COLOR_NODE_ID)
        self.delayDisplay("Test passed")

    def test_segment_sample(self):
        import numpy as np

        self.delayDisplay("Loading the sample")
        volumeNode, reference = self._loadSample()

        self.delayDisplay("Segmenting (a background job)")
        logic = Med3DFMLogic()
        segmentationNode, tableNode = logic.segment(volumeNode, DEFAULT_MODEL, device="auto", timeout=600)

        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["anterior hippocampus", "posterior hippocampus"])
        for value, name in enumerate(names, start=1):
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0
            truth = reference == value
            dice = 2.0 * np.logical_and(mask, truth).sum() / max(1, mask.sum() + truth.sum())
            self.delayDisplay(f"{name}: Dice {dice:.3f}")
            self.assertGreater(dice, 0.7)
        self.assertEqual(tableNode.GetNumberOfRows(), 2)
        record = json.loads(segmentationNode.GetAttribute(results.PROVENANCE_ATTRIBUTE))
        self.assertEqual(record["model"]["id"], DEFAULT_MODEL)
        self.assertTrue(record["domain"]["fits"])
        self.delayDisplay("Test passed")

    def test_segment_under_a_transform(self):
        """A volume under a (not hardened) rotation + shift: the result lands under the same transform, aligned."""
        import numpy as np

        volumeNode, reference = self._loadSample()
        matrix = vtk.vtkMatrix4x4()
        for row, values in enumerate(((0.0, -1.0, 0.0, 40.0), (1.0, 0.0, 0.0, -25.0), (0.0, 0.0, 1.0, 60.0))):
            for column, value in enumerate(values):
                matrix.SetElement(row, column, value)
        transformNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
        transformNode.SetMatrixTransformToParent(matrix)
        volumeNode.SetAndObserveTransformNodeID(transformNode.GetID())

        self.delayDisplay("Segmenting a transformed volume (a background job)")
        segmentationNode, _tableNode = Med3DFMLogic().segment(volumeNode, DEFAULT_MODEL, device="auto", timeout=600)
        self.assertEqual(segmentationNode.GetTransformNodeID(), transformNode.GetID())
        segmentation = segmentationNode.GetSegmentation()
        for value, name in enumerate(("anterior hippocampus", "posterior hippocampus"), start=1):
            # resampled onto the volume through both nodes' transforms: aligned only if they agree
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentation.GetSegmentIdBySegmentName(name), volumeNode) > 0
            truth = reference == value
            dice = 2.0 * np.logical_and(mask, truth).sum() / max(1, mask.sum() + truth.sum())
            self.delayDisplay(f"{name}: Dice {dice:.3f} under the transform")
            self.assertGreater(dice, 0.7)
        self.delayDisplay("Test passed")

    def test_a_ct_is_refused_by_the_mr_model(self):
        """A CT is outside the MR crop model's domain: marked in the model list, refused with a message, no result."""
        volumeNode = slicer.util.loadVolume(str(sampleCT()))
        logic = Med3DFMLogic()
        marked = {m.model_id: m for m in logic.modelFits(volumeNode)}
        self.assertIs(marked[DEFAULT_MODEL].fits, False)
        self.assertIn("does not fit", marked[DEFAULT_MODEL].label)
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        with self.assertRaises(Med3DFMJobError) as caught:
            logic.startSegment(volumeNode, DEFAULT_MODEL, device="auto")
        message = str(caught.exception)
        self.delayDisplay(message)
        self.assertIn(f"{DEFAULT_MODEL} does not fit this volume", message)
        self.assertIn("CT", message)
        others = [m.model_id for m in marked.values() if m.fits]  # a CT adapter saved by the user would be offered
        self.assertIn("Models that fit it" if others else "Learn from labels", message)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before)
        self.delayDisplay("Test passed")
