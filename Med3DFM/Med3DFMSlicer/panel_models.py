"""The panel's model lists and its Models section, as a mixin of Med3DFMWidget (Med3DFM.py).

The Segment model list (each model marked for the input volume; every version with "Show all versions"),
the Classify and Explain lists that follow it, and the Models table with its jobs: download, import,
delete, and "Download sample" (`models sample`, then the scan is loaded as a volume). Jobs run in the
background like every other (Med3DFMSupport.jobs); the widget's timer polls them (_pollModelsJob).
"""

import logging
import os
from typing import Optional

import qt
import slicer
from slicer.i18n import tr as _

from Med3DFMSupport import results


class ModelsPanelMixin:
    """Needs the widget's ui, logic, _parameterNode, _modelsJob, _modelRows, _modelFits, _fitsVolumeKey,
    _listedAllVersions, _selectAfterImport, _timer, _setProgress and _updateGUI."""

    def _showAllVersions(self) -> bool:
        return bool(self._parameterNode and self._parameterNode.showAllVersions)

    def modelListIsStale(self) -> bool:
        """The Segment model list was made for another volume or another "Show all versions"."""
        node = self._parameterNode
        return bool(node) and (self.logic.volumeKey(node.inputVolume) != self._fitsVolumeKey or self._showAllVersions() != self._listedAllVersions)

    def populateModelComboBox(self) -> None:
        """The Segment models, each marked as fitting the input volume or not (the library's domain check)."""
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        self._listedAllVersions = self._showAllVersions()
        try:
            self._modelFits = self.logic.modelFits(volumeNode, self._listedAllVersions)
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
            elif self.ui.modelComboBox.count > 0:  # the chosen model is gone (deleted, or an older version hidden): Segment uses the one shown
                self._parameterNode.modelId = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex)
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

    # --- the Models section ------------------------------------------------------------------------

    def refreshModels(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to list models."), waitCursor=True):
            self._modelRows = results.model_rows(self.logic.listModels(self._showAllVersions()))
            table = self.ui.modelsTableWidget
            table.setRowCount(len(self._modelRows))
            for row, model in enumerate(self._modelRows):
                cells = [model.title or model.id, model.version, model.task, model.licence, model.size,
                         _("yes ({where})").format(where=model.where) if model.installed else model.where]
                for column, text in enumerate(cells):
                    cell = qt.QTableWidgetItem(text)
                    sample = "\n" + _("Sample: {description}").format(description=model.sample) if model.sample else ""
                    cell.setToolTip(f"{model.id}@{model.version}" + (f"\n{model.path}" if model.path else "") + sample)
                    table.setItem(row, column, cell)
            table.resizeColumnsToContents()
            self.ui.modelsStatusLabel.text = _("Model folder: {folder}").format(folder=self.logic.modelsFolder())
        self.populateModelComboBox()
        self._updateGUI()

    def _selectedModel(self, quiet: bool = False) -> Optional[results.ModelRow]:
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0 or row >= len(self._modelRows):
            if not quiet:
                slicer.util.warningDisplay(_("Select a model in the table first."))
            return None
        return self._modelRows[row]

    def _updateModelsGUI(self) -> None:
        selected = self._selectedModel(quiet=True)
        canSample = selected is not None and bool(selected.sample) and self._modelsJob is None
        self.ui.downloadSampleButton.enabled = canSample
        self.ui.downloadSampleButton.toolTip = (_("Download the sample scan of {id} ({description}) and load it").format(id=selected.id, description=selected.sample)
                                                if canSample else _("Select a model whose registry entry names a sample scan"))

    def _startModelsJob(self, action: str, arguments, message: str) -> None:
        self._modelsJob = self.logic.startModelsJob(action, arguments)
        self._setProgress(self.ui.modelsProgressBar, 0, message)
        self.ui.cancelModelsButton.enabled = True
        self._updateModelsGUI()
        self._timer.start()

    def onDownloadModel(self) -> None:
        model = self._selectedModel()
        if model is None or self._modelsJob is not None:
            return
        self._startModelsJob("download", [f"{model.id}@{model.version}"], _("Downloading {id}").format(id=model.id))

    def onDownloadSample(self) -> None:
        """`models sample ID@VERSION` in the background (checked against its sha256, cached); loaded as a volume when done."""
        model = self._selectedModel()
        if model is None or self._modelsJob is not None or not model.sample:
            return
        self._startModelsJob("sample", [f"{model.id}@{model.version}"], _("Downloading the sample of {id}").format(id=model.id))

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import a Med3DFM model"), "", _("Models (*.safetensors *.zip)"))
        if not path or self._modelsJob is not None:
            return
        self._startModelsJob("import", [path], _("Importing {name}").format(name=os.path.basename(path)))

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

    def _loadSample(self, path: str) -> str:
        """Load a downloaded sample as a volume and make it the input; the status text."""
        volumeNode = slicer.util.loadVolume(path)  # raises if it cannot
        if self._parameterNode:
            self._parameterNode.inputVolume = volumeNode
        return _("Sample loaded as {name} ({path}); it is the input volume now.").format(name=volumeNode.GetName(), path=path)

    def _pollModelsJob(self) -> None:
        job = self._modelsJob
        for event in job.poll():
            if event.kind == "progress":
                self._setProgress(self.ui.modelsProgressBar, event.overall, event.message or event.stage)
            elif event.kind == "result" and event.stage != "sample":
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
        for path in [str(r.get("path")) for r in result.results if r.get("result") == "sample"] if result.ok else []:
            with slicer.util.tryWithErrorDisplay(_("The sample could not be loaded."), waitCursor=True):
                self.ui.modelsStatusLabel.text = self._loadSample(path)
        selectId, self._selectAfterImport = self._selectAfterImport, None
        if selectId and result.ok and self._parameterNode and self.ui.modelComboBox.findData(selectId) >= 0:
            self._parameterNode.modelId = selectId  # a saved adapter is ready for the Segment button
            self.ui.learnStatusLabel.text = _("Saved as the model '{id}': choose it in the Segment section for other volumes.").format(id=selectId)
        self._updateGUI()
