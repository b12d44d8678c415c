"""Med3DFM: 3D medical foundation models in 3D Slicer (segmentation, classification, explanation, learning new
structures from a few painted slices or labelled volumes).

This file is the module and its panel. The panel holds no model code: each button calls
Med3DFMLogic (Med3DFMSlicer/logic.py), which writes the input volume (and any painted segments) to a
per-job temporary folder, runs the library's command line (`PythonSlicer -m Med3DFMLib.cli
segment|adapt|classify|explain|models ...`) in a background process, and turns its outputs into nodes;
the panel polls the job's JSON progress lines. Slicer-side helpers are in Med3DFMSlicer/, everything
that needs no Slicer in Med3DFMSupport/ (see their __init__.py).
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from Med3DFMSlicer import HELPER_MODULES, installer, panel_checks
from Med3DFMSlicer.logic import Med3DFMLogic
from Med3DFMSlicer.panel_models import ModelsPanelMixin
from Med3DFMSlicer.parameters import Med3DFMParameterNode
from Med3DFMSlicer.sample_data import registerSampleData
from Med3DFMSupport import choices, fit, jobs, results
from Med3DFMSupport.jobs import Med3DFMJobError

# Also part of this file's namespace, for Slicer and scripts: Slicer runs the self-test class
# `<ModuleName>Test` of the module file; scripts use Med3DFM.Med3DFMLogic, catch Med3DFM.Med3DFMJobError
# and can match the heatmap overlay's look.
from Med3DFMSlicer.nodes import HEATMAP_COLOR_NODE_ID, HEATMAP_LOWER_THRESHOLD, HEATMAP_OPACITY  # noqa: F401
from Med3DFMSlicer.selftest import Med3DFMTest  # noqa: F401

POLL_INTERVAL_MS = 200  # how often the panel reads the running jobs' progress


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


#
# Med3DFMWidget
#


class Med3DFMWidget(ModelsPanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; the model lists and the Models section are ModelsPanelMixin's (Med3DFMSlicer/panel_models.py),
    the checks before a job (estimate, licence) Med3DFMSlicer/panel_checks.py's."""

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
        self._confidenceNode = None  # the last Segment's confidence overlay, which the threshold redraws
        self._labelledPairs: List[Tuple[str, str]] = []  # other patients: (volume node ID, segmentation node ID)
        self._selectAfterImport: Optional[str] = None
        self._timer = None
        self._modelRows: List[results.ModelRow] = []
        self._modelFits: List[fit.ModelFit] = []  # the Segment model list, marked for _fitsVolumeKey
        self._fitsVolumeKey: Optional[Tuple[Any, ...]] = None
        self._listedAllVersions = False  # whether the Segment model list shows every version

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
        self.ui.downloadSampleButton.connect("clicked(bool)", self.onDownloadSample)
        self.ui.modelsTableWidget.connect("itemSelectionChanged()", self._updateModelsGUI)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.cancelModelsButton.connect("clicked(bool)", self.onCancelModelsJob)
        self.ui.forceReinstallButton.connect("clicked(bool)", self.onForceReinstall)
        self.ui.packageInfoButton.connect("clicked(bool)", self.onShowPackageInfo)
        self.ui.copyDiagnosticsButton.connect("clicked(bool)", self.onCopyDiagnostics)
        self.ui.flagBelowSpinBox.connect("valueChanged(double)", self.onFlagBelowChanged)
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
        # An installation stopped for a restart (settings marker, installer.py) is offered again once
        # the panel is shown; nothing is installed without asking.
        qt.QTimer.singleShot(0, self.onResumeInstall)

    def cleanup(self) -> None:
        for job in (self._job, self._modelsJob, self._learnJob, self._classifyJob):
            if job is not None:
                job.cancel()
                job.cleanup()
        if self.logic is not None:
            self.logic.cancelDeviceProbe()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Developer mode's Reload re-reads this file only: re-read the helper packages first, so an edit
        there takes effect without restarting Slicer."""
        import importlib

        for name in HELPER_MODULES:
            importlib.reload(importlib.import_module(name))
        ScriptedLoadableModuleWidget.onReload(self)

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

    def _updateGUI(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self._job is not None
        if self.modelListIsStale():
            self.populateModelComboBox()
        if node:
            index = self.ui.modelComboBox.findData(node.modelId)
            if index >= 0 and index != self.ui.modelComboBox.currentIndex:
                self.ui.modelComboBox.currentIndex = index
            for combo, values, value in ((self.ui.deviceComboBox, choices.DEVICES, node.device),
                                         (self.ui.learnModeComboBox, choices.LEARN_MODES, node.learnMode),
                                         (self.ui.learnSourceComboBox, choices.LEARN_SOURCES, node.learnSource),
                                         (self.ui.heatmapMethodComboBox, choices.HEATMAP_METHODS, node.heatmapMethod),
                                         (self.ui.explainMethodComboBox, choices.EXPLAIN_METHODS, node.explainMethod)):
                wanted = choices.index_of(values, value)
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
        self.ui.estimateLabel.text = panel_checks.estimateText(self.logic, node) if node and node.inputVolume else ""
        self._updateModelsGUI()
        if self.logic.deviceProbeRunning():
            self._timer.start()  # onPollJobs shows the GPU's memory once the probe answers

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelId = self.ui.modelComboBox.itemData(index)
            self.populateExplainTargets()

    def _setChoice(self, parameter: str, values: Tuple[str, ...], index: int) -> None:
        """A fixed combo box changed: store the value of its item `index` (choices.py) in the parameter node."""
        value = choices.value_at(values, index)
        if self._parameterNode and value is not None:
            setattr(self._parameterNode, parameter, value)

    def onDeviceChanged(self, index: int) -> None:
        self._setChoice("device", choices.DEVICES, index)

    # --- Segment -------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start Med3DFM."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = _("Python packages are missing: segmentation was not started.")
                return
            if not panel_checks.licenceAcknowledged(self.logic, node.modelId, self.ui.statusLabel,
                                                    _("The model's licence was not acknowledged: segmentation was not started.")):
                return
            lowerResolution = panel_checks.lowerResolutionAccepted(self.logic, node, self.ui.statusLabel)
            if lowerResolution is None:
                return
            try:
                self._job = self.logic.startSegment(node.inputVolume, node.modelId, node.device, node.outputSegmentation, node.confidence, node.flagBelow,
                                                    node.rawLabelNames, lowerResolution)
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
        if self.logic.pollDeviceProbe():  # torch has answered: the estimate can show the GPU's memory
            self._updateGUI()
        if all(job is None for job in (self._job, self._modelsJob, self._learnJob, self._classifyJob)) and not self.logic.deviceProbeRunning():
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
            self._confidenceNode = outputs.confidence_node
            self.ui.confidenceLabel.text = outputs.flags
            done = _("Done in {seconds:.0f} s: {name} ({report})").format(seconds=job.result().seconds, name=segmentationNode.GetName(),
                                                                       report=outputs.report.summary())
            factor = job.context.get("lowerResolution", 1.0)
            return done if factor == 1.0 else done + " " + _("At {factor}x the model's spacing (less detail).").format(factor=f"{factor:g}")

        self._settleJob(job, self.ui.progressBar, self.ui.statusLabel, _("Segmentation failed: {message}"), _("Cancelled."), finish)

    def onFlagBelowChanged(self, value: float) -> None:
        """A new threshold on the last confidence overlay: redraw it and recount, without running the model."""
        if self._confidenceNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not update the confidence overlay."), waitCursor=True):
            self.ui.confidenceLabel.text = self.logic.flagLowConfidence(self._confidenceNode, value)

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
        self._setChoice("learnMode", choices.LEARN_MODES, index)

    def onLearnSourceChanged(self, index: int) -> None:
        self._setChoice("learnSource", choices.LEARN_SOURCES, index)

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
            if not panel_checks.licenceAcknowledged(self.logic, choices.DEFAULT_ENCODER, self.ui.learnStatusLabel,
                                                    _("The encoder's licence was not acknowledged: learning was not started."), encoder=True):
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
            self._selectAfterImport = adapterId
            self.ui.modelsCollapsibleButton.collapsed = False
            self._startModelsJob("import", arguments, _("Saving {id}").format(id=adapterId))
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
        self._setChoice("heatmapMethod", choices.HEATMAP_METHODS, index)

    def onExplainTargetChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.explainTarget = self.ui.explainTargetComboBox.itemText(index)

    def onExplainMethodChanged(self, index: int) -> None:
        self._setChoice("explainMethod", choices.EXPLAIN_METHODS, index)

    def _startClassifyJob(self, modelId: str, start) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start Med3DFM."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.classifyStatusLabel.text = _("Python packages are missing: the job was not started.")
                return
            if not panel_checks.licenceAcknowledged(self.logic, modelId, self.ui.classifyStatusLabel,
                                                    _("The model's licence was not acknowledged: the job was not started.")):
                return
            self._classifyJob = start()
            self._setProgress(self.ui.classifyProgressBar, 0, _("Starting..."))
            self.ui.classifyStatusLabel.text = _("Starting...")
            self._timer.start()
        self._updateGUI()

    def onClassifyButton(self) -> None:
        node = self._parameterNode
        method = None if node.heatmapMethod == "none" else node.heatmapMethod
        try:
            jobs.parse_prevalence_text(node.classifyPrevalence)
        except ValueError as error:  # a typing slip: said beside the button, nothing started
            self.ui.classifyStatusLabel.text = _("Not started: {message}").format(message=error)
            return
        self._startClassifyJob(node.classifierId, lambda: self.logic.startClassify(node.inputVolume, node.classifierId, node.classifyRoi, method, node.device,
                                                                                   node.classifyPrevalence))

    def onExplainButton(self) -> None:
        node = self._parameterNode
        self._startClassifyJob(node.modelId, lambda: self.logic.startExplain(node.inputVolume, node.modelId, node.explainTarget, node.explainMethod, node.device))

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

    # --- Troubleshooting -----------------------------------------------------------------------

    def onForceReinstall(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Reinstalling the Python packages failed."), waitCursor=True):
            if self.logic.ensureDependencies(askConfirmation=True, force=True):
                # a reinstall that replaced packages Slicer had loaded has already offered a restart (installer.py)
                slicer.util.infoDisplay(_("The Python packages were reinstalled."))

    def onResumeInstall(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Continuing the installation of the Python packages failed."), waitCursor=True):
            if installer.resumePendingInstall(self.logic.requirements()):
                slicer.util.infoDisplay(_("The Python packages Med3DFM needs are installed."))

    def onShowPackageInfo(self) -> None:
        text = installer.packageInfoText(self.logic.requirements())
        slicer.util.infoDisplay(text, _("Med3DFM: Python packages"))

    def onCopyDiagnostics(self) -> None:
        text = self.logic.diagnostics()
        qt.QApplication.clipboard().setText(text)
        slicer.util.infoDisplay(_("Diagnostics copied to the clipboard."), detailedText=text)
