"""The Med3DFM panel in a real Qt: the real Med3DFMWidget (Med3DFM/Med3DFM.py) built from the real .ui,
driven as a user drives it, with real jobs behind its buttons.

The harness (Testing/Python/qt_harness) gives the module PyQt5 in PythonQt's dialect as `qt`, the .ui's
Slicer/CTK widgets as small stand-ins, and the GUI half of `slicer` over slicer_standin. Message boxes
are recorded and answered (harness.answer); exceptions that escape a slot are recorded as PythonQt would
print them (harness.slot_errors). Each test checks what the user would see: enabled buttons, tooltips,
progress, status lines, message boxes, and the nodes that appear in the scene.

Screenshots: every test grabs the panel; set MED3DFM_PANEL_SCREENSHOTS=docs/panel to write the ones the
docs show (otherwise they go to the test's temporary folder).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import PyQt5  # noqa: E402,F401  (pyproject.toml's test extra installs it; a missing PyQt5 is a failure, not a skip)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Med3DFM"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import slicer_standin  # noqa: E402
from qt_harness import PanelHarness  # noqa: E402

DEMO = "hippocampus-mr-demo"
SEGMENTS = ["anterior hippocampus", "posterior hippocampus"]
QT_OK, QT_CANCEL = 0x00000400, 0x00400000  # QMessageBox.Ok, QMessageBox.Cancel


@pytest.fixture()
def harness():
    harness = PanelHarness()
    harness.install()
    harness.build_panel()
    yield harness
    try:
        assert not harness.slot_errors, "exceptions escaped the panel's slots:\n" + "\n".join(text for _w, _e, text in harness.slot_errors)
    finally:
        harness.uninstall()


@pytest.fixture()
def shots(tmp_path):
    folder = os.environ.get("MED3DFM_PANEL_SCREENSHOTS")
    return Path(folder) if folder else tmp_path


@pytest.fixture()
def slicer():
    return slicer_standin.slicer


def _load(harness, slicer, path):
    volume = slicer.util.loadVolume(str(path))
    harness.process_events()
    return volume


def _segmentations(slicer):
    return [n for n in slicer.mrmlScene.nodes if type(n).__name__ == "vtkMRMLSegmentationNode"]


def _run_to_end(harness, button, what, timeout=180.0):
    """Wait until a job's button can be clicked again; the progress bar texts seen on the way."""
    seen = []
    bar = {"applyButton": "progressBar", "learnButton": "learnProgressBar", "explainButton": "classifyProgressBar"}.get(button)

    def finished():
        if bar is not None and getattr(harness.ui, bar).visible:
            text = getattr(harness.ui, bar).format
            if not seen or seen[-1] != text:
                seen.append(text)
        return getattr(harness.ui, button).enabled

    harness.wait_until(finished, timeout, what)
    return seen


# --- opening the panel, choosing a volume ------------------------------------------------------------

def test_panel_opens_and_enables_what_a_loaded_volume_allows(harness, slicer, hippocampus_case, shots):
    ui = harness.ui
    # nothing loaded: every job button is off and says why
    assert not ui.applyButton.enabled and ui.applyButton.toolTip == "Select an input volume and a model"
    assert not ui.cancelButton.enabled and not ui.learnButton.enabled and not ui.classifyButton.enabled and not ui.explainButton.enabled
    assert ui.explainButton.toolTip.startswith("Select an input volume and a model")
    assert ui.learnButton.toolTip.startswith("Select the input volume")
    assert not any(getattr(ui, bar).visible for bar in ("progressBar", "learnProgressBar", "classifyProgressBar", "modelsProgressBar"))
    assert [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count)] == ["Hippocampus (MR) demo segmentation (hippocampus-mr-demo)"]
    assert ui.deviceComboBox.currentText == "Automatic" and ui.estimateLabel.text == "" and ui.domainLabel.text == ""
    assert ui.inputVolumeSelector.currentNode() is None and ui.outputSegmentationSelector.currentText == "Create new segmentation"
    assert not ui.segmentCollapsibleButton.collapsed
    assert all(getattr(ui, s).collapsed for s in ("learnCollapsibleButton", "classifyCollapsibleButton", "modelsCollapsibleButton",
                                                  "troubleshootingCollapsibleButton"))
    assert not ui.learnPatientsGroupBox.visible  # "This scan" is the default source: no labelled-volumes list
    assert harness.messages == []

    # a volume is loaded: the selector takes it (as Slicer's does), the parameter node follows, Segment can run
    volume = _load(harness, slicer, hippocampus_case[0])
    parameters = harness.widget._parameterNode
    assert ui.inputVolumeSelector.currentNode() is volume and parameters.inputVolume is volume
    assert ui.inputVolumeSelector.currentText == "hippocampus_014"
    assert ui.applyButton.enabled and ui.applyButton.toolTip == "Segment the input volume"
    assert ui.modelComboBox.currentText.startswith("\u2713 ")  # the demo model fits this MR crop
    assert ui.estimateLabel.text.startswith(("Runs on the CPU: expect", "Runs on the GPU")) and "of memory" in ui.estimateLabel.text
    # Explain: the demo model's segments; Classify waits for a classifier (none is installed)
    assert [ui.explainTargetComboBox.itemText(i) for i in range(ui.explainTargetComboBox.count)] == SEGMENTS
    assert ui.explainButton.enabled and ui.explainButton.toolTip == "Map which voxels drove this segment"
    assert not ui.classifyButton.enabled and "import one in Models" in ui.classifyButton.toolTip and ui.classifierComboBox.count == 0
    harness.screenshot(shots / "panel.png")

    # the user's choices reach the parameter node, and the parameter node reaches the widgets
    harness.choose(ui.deviceComboBox, "CPU")
    assert parameters.device == "cpu" and ui.estimateLabel.text.startswith("Runs on the CPU: expect")
    harness.click(ui.show3DCheckBox)
    assert parameters.show3D is False
    parameters.flagBelow = 0.35
    assert ui.flagBelowSpinBox.value == pytest.approx(0.35)
    harness.expand(ui.classifyCollapsibleButton)
    harness.choose(ui.explainTargetComboBox, SEGMENTS[1])
    assert parameters.explainTarget == SEGMENTS[1]

    # the volume leaves the scene: back to "nothing to segment"
    slicer.mrmlScene.RemoveNode(volume)
    harness.process_events()
    assert parameters.inputVolume is None and ui.inputVolumeSelector.currentNode() is None
    assert not ui.applyButton.enabled and not ui.explainButton.enabled and ui.estimateLabel.text == ""

    # File > Close Scene: the panel lets go of the parameter node and takes the new scene's
    _load(harness, slicer, hippocampus_case[0])
    slicer.mrmlScene.Clear()
    harness.process_events()
    assert not ui.applyButton.enabled
    again = _load(harness, slicer, hippocampus_case[0])
    assert harness.widget._parameterNode.inputVolume is again and ui.applyButton.enabled
    assert harness.messages == []


def test_a_volume_outside_the_models_domain_is_refused_with_its_reason(harness, slicer, data_dir, shots):
    ui = harness.ui
    volume = _load(harness, slicer, data_dir / "totalseg" / "example_ct_sm.nii.gz")
    assert harness.widget._parameterNode.inputVolume is volume
    assert ui.modelComboBox.currentText.startswith("\u2717 ") and ui.modelComboBox.currentText.endswith("does not fit this volume")
    assert ui.domainLabel.text.startswith(f"{DEMO} does not fit this volume: the scan is CT")
    assert "Learn from labels" in ui.domainLabel.text
    harness.click(ui.applyButton)  # still offered: the click says why not, no job starts
    assert ui.statusLabel.text.startswith(f"{DEMO} does not fit this volume")
    assert not ui.cancelButton.enabled and not ui.progressBar.visible and ui.applyButton.enabled
    assert _segmentations(slicer) == [] and harness.messages == []
    harness.screenshot(shots / "panel-not-this-volume.png")


# --- Segment and Cancel ---------------------------------------------------------------------------

def test_segment_runs_the_job_and_puts_the_result_in_the_scene(harness, slicer, hippocampus_case, shots):
    ui = harness.ui
    volume = _load(harness, slicer, hippocampus_case[0])
    harness.choose(ui.deviceComboBox, "CPU")
    harness.click(ui.confidenceCheckBox)
    assert harness.widget._parameterNode.confidence is True

    harness.click(ui.applyButton)
    # running: Segment off, Cancel on, the progress bar shows the job's stage
    assert ui.statusLabel.text == "Starting..." and not ui.applyButton.enabled and ui.cancelButton.enabled
    assert ui.progressBar.visible and ui.progressBar.format.endswith("Starting...")
    seen = _run_to_end(harness, "applyButton", "the segment job")
    assert len(seen) >= 2, f"the progress bar never moved: {seen}"  # "Starting..." and at least one stage of the job

    name = f"{volume.GetName()} {DEMO}"
    assert ui.statusLabel.text.startswith("Done in ") and name in ui.statusLabel.text and "added anterior hippocampus" in ui.statusLabel.text
    assert not ui.cancelButton.enabled and not ui.progressBar.visible
    [result] = _segmentations(slicer)
    segmentation = result.GetSegmentation()
    assert result.GetName() == name and [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == SEGMENTS
    table = next(n for n in slicer.mrmlScene.nodes if type(n).__name__ == "vtkMRMLTableNode")
    assert table.GetNumberOfRows() == 2
    assert harness.application_logic.selection.propagated == [table.GetID()]  # the table views show the volumes table
    # the confidence overlay: its line names what to check; a new threshold recounts without a job
    flags = ui.confidenceLabel.text
    assert flags and any(type(n).__name__ == "vtkMRMLScalarVolumeNode" and n is not volume for n in slicer.mrmlScene.nodes)
    ui.flagBelowSpinBox.value = 0.95
    harness.process_events()
    assert ui.confidenceLabel.text and ui.confidenceLabel.text != flags and ui.applyButton.enabled and not ui.cancelButton.enabled
    assert harness.messages == []
    harness.screenshot(shots / "panel-segmented.png")


def test_cancel_stops_the_job_and_leaves_no_result(harness, slicer, hippocampus_case):
    ui = harness.ui
    _load(harness, slicer, hippocampus_case[0])
    harness.choose(ui.deviceComboBox, "CPU")
    harness.click(ui.applyButton)
    harness.click(ui.cancelButton)
    assert ui.statusLabel.text == "Cancelling..."
    _run_to_end(harness, "applyButton", "the cancelled job to end", timeout=60)
    assert ui.statusLabel.text == "Cancelled."
    assert not ui.cancelButton.enabled and not ui.progressBar.visible and _segmentations(slicer) == []
    assert harness.messages == []


# --- Learn from labels, Save as model, the Models section ----------------------------------------------

def _painted(slicer, volume, labels_path, names):
    """A segmentation with a few slices of each structure painted, as in the Segment Editor."""
    full = slicer_standin._array(slicer.util.loadLabelVolume(str(labels_path)).GetImageData())
    z = np.nonzero(full.any(axis=(1, 2)))[0]
    slices = sorted({int(v) for v in np.percentile(z, (20, 50, 80)).astype(int)})
    ijk_to_ras = slicer_standin._matrix_to_numpy(volume._ijk_to_ras)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    node.CreateDefaultDisplayNodes()
    for value, name in enumerate(names, start=1):
        mask = np.zeros(full.shape, np.uint8)
        mask[slices] = full[slices] == value
        node.GetSegmentation().AddSegment(slicer_standin.Segment(name, (0.2 * value, 0.5, 0.3), mask, ijk_to_ras), f"Segment_{value}")
    return node, int((full[slices] > 0).sum())


def _voxels(slicer, node, volume):
    segmentation = node.GetSegmentation()
    return sum(int((slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetNthSegmentID(i), volume) > 0).sum())
               for i in range(segmentation.GetNumberOfSegments()))


def _table_ids(ui):
    table = ui.modelsTableWidget
    return [table.item(row, 0).toolTip().split("@")[0] for row in range(table.rowCount)]


def test_learn_an_instant_guess_save_it_as_a_model_and_delete_it(harness, slicer, hippocampus_case, shots):
    ui = harness.ui
    volume = _load(harness, slicer, hippocampus_case[0])
    painted, painted_voxels = _painted(slicer, volume, hippocampus_case[1], SEGMENTS)
    harness.process_events()
    harness.expand(ui.learnCollapsibleButton)
    assert not ui.learnButton.enabled and not ui.saveAdapterButton.enabled and not ui.learnCancelButton.enabled
    harness.choose(ui.learnSegmentationSelector, "painted")
    assert not ui.learnButton.enabled  # no name yet
    harness.type_text(ui.learnNameLineEdit, "hippocampus parts")
    harness.choose(ui.learnModeComboBox, "Instant guess")
    parameters = harness.widget._parameterNode
    assert (parameters.learnSegmentation, parameters.learnName, parameters.learnMode) == (painted, "hippocampus parts", "prototype")
    assert ui.learnButton.enabled and ui.learnButton.toolTip.startswith("Learn the painted structures")

    harness.click(ui.learnButton)
    assert ui.learnStatusLabel.text == "Learning from: " + ", ".join(SEGMENTS)
    assert not ui.learnButton.enabled and ui.learnCancelButton.enabled and ui.learnProgressBar.visible
    _run_to_end(harness, "learnButton", "the adapt job")
    assert ui.learnStatusLabel.text.startswith("Done: 2 structure(s)") and "prototype" in ui.learnStatusLabel.text, harness.describe()
    assert not ui.learnProgressBar.visible and not ui.learnCancelButton.enabled and ui.saveAdapterButton.enabled
    assert _voxels(slicer, painted, volume) > 2 * painted_voxels  # the painted structures now fill the volume
    harness.screenshot(shots / "panel-learned.png")

    # Save as model: asked first; the import job runs in the Models section; the model is then chosen for Segment
    harness.answer(QT_OK)
    harness.click(ui.saveAdapterButton)
    question = harness.messages[-1]
    assert question.kind == "question" and "Save the learned adapter as the model 'hippocampus-parts'" in question.text
    assert not ui.modelsCollapsibleButton.collapsed and ui.modelsProgressBar.visible and ui.cancelModelsButton.enabled
    harness.wait_until(lambda: not ui.cancelModelsButton.enabled, 120, "the import job")
    assert ui.learnStatusLabel.text.startswith("Saved as the model 'hippocampus-parts'"), harness.describe()
    assert ui.modelComboBox.findData("hippocampus-parts") >= 0 and parameters.modelId == "hippocampus-parts"
    assert "hippocampus-parts" in ui.modelComboBox.currentText and "hippocampus-parts" in _table_ids(ui)
    assert not ui.modelsProgressBar.visible and ui.modelsStatusLabel.text.startswith("Model folder: ")

    # Delete: nothing without a selected row; Cancel keeps the model; OK deletes it
    harness.click(ui.removeModelButton)
    assert (harness.messages[-1].kind, harness.messages[-1].text) == ("warning", "Select a model in the table first.")
    ui.modelsTableWidget.selectRow(_table_ids(ui).index("hippocampus-parts"))
    harness.answer(QT_CANCEL)
    harness.click(ui.removeModelButton)
    assert harness.messages[-1].kind == "question" and harness.messages[-1].text.startswith("Delete hippocampus-parts ")
    assert "hippocampus-parts" in _table_ids(ui)
    harness.answer(QT_OK)
    harness.click(ui.removeModelButton)
    assert "hippocampus-parts" not in _table_ids(ui) and DEMO in _table_ids(ui)
    assert ui.modelComboBox.findData("hippocampus-parts") < 0
    # the Segment section no longer offers the deleted model, and Segment does not run it
    assert parameters.modelId == ui.modelComboBox.currentData == DEMO, (parameters.modelId, ui.modelComboBox.currentData)
    assert [m.kind for m in harness.messages] == ["question", "warning", "question", "question"]


def test_learning_from_a_segmentation_with_nothing_painted_says_so(harness, slicer, hippocampus_case, shots):
    ui = harness.ui
    volume = _load(harness, slicer, hippocampus_case[0])
    shape = slicer.util.arrayFromVolume(volume).shape
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "only background")
    node.CreateDefaultDisplayNodes()
    mask = np.zeros(shape, np.uint8)
    mask[10, :4, :4] = 1
    ijk_to_ras = slicer_standin._matrix_to_numpy(volume._ijk_to_ras)
    node.GetSegmentation().AddSegment(slicer_standin.Segment("Background", (0, 0, 0), mask, ijk_to_ras), "bg")
    harness.process_events()
    harness.expand(ui.learnCollapsibleButton)
    harness.choose(ui.learnSegmentationSelector, "only background")
    harness.type_text(ui.learnNameLineEdit, "x")
    harness.click(ui.learnButton)
    [message] = harness.messages
    assert message.kind == "critical" and message.text.startswith("Failed to start learning.\n\n") and "no structure is painted" in message.text
    assert "Traceback" in message.detailedText
    message.save(shots / "message-learn-error.png")
    # tryWithErrorDisplay shows the error, then re-raises it: PythonQt prints it to the Python console
    [(where, error, _text)] = harness.slot_errors
    assert "onLearnButton" in where and "no structure is painted" in str(error)
    harness.slot_errors.clear()
    assert ui.learnButton.enabled and not ui.learnCancelButton.enabled and not ui.learnProgressBar.visible
    harness.screenshot(shots / "panel-learn-error.png")


def test_learning_from_other_patients_lists_the_labelled_volumes(harness, slicer, hippocampus_case):
    """The other-patients form without running it: Add/Remove and the enabled states."""
    ui = harness.ui
    volume = _load(harness, slicer, hippocampus_case[0])
    painted, _ = _painted(slicer, volume, hippocampus_case[1], SEGMENTS)
    harness.process_events()
    harness.expand(ui.learnCollapsibleButton)
    harness.choose(ui.learnSourceComboBox, "Other patients")
    assert harness.widget._parameterNode.learnSource == "otherPatients"
    assert ui.learnPatientsGroupBox.visible and not ui.learnSegmentationSelector.enabled and ui.learnBudgetSpinBox.enabled
    assert not ui.learnButton.enabled and not ui.learnRemovePairButton.enabled
    harness.click(ui.learnAddPairButton)  # nothing chosen yet: said in the status line
    assert ui.learnStatusLabel.text.startswith("Choose a volume and the segmentation")
    harness.choose(ui.learnPairVolumeSelector, "hippocampus_014")
    harness.choose(ui.learnPairSegmentationSelector, "painted")
    harness.click(ui.learnAddPairButton)
    harness.click(ui.learnAddPairButton)  # the same pair once
    assert ui.learnPairsTable.rowCount == 1 and ui.learnPairsTable.item(0, 1).text() == "painted"
    harness.type_text(ui.learnNameLineEdit, "hippocampus parts")
    assert ui.learnButton.enabled and ui.learnRemovePairButton.enabled and ui.learnCancelButton.toolTip.startswith("Stop training")
    harness.click(ui.learnRemovePairButton)
    assert ui.learnPairsTable.rowCount == 0 and not ui.learnButton.enabled
    harness.choose(ui.learnSourceComboBox, "This scan")
    assert not ui.learnPatientsGroupBox.visible and ui.learnSegmentationSelector.enabled


def _registry_with_an_offline_model(folder: Path) -> Path:
    """Resources/models.json plus a model whose only download address refuses connections (a private
    registry while offline)."""
    import copy
    import json

    registry = json.loads((ROOT / "Resources" / "models.json").read_text(encoding="utf-8"))
    model = copy.deepcopy(next(m for m in registry["models"] if m["id"] == "med3dfm-encoder-small"))
    model.update(id="offline-model", title="Offline model")
    model["files"][0].pop("bundled", None)
    model["files"][0].update(name="offline-model.safetensors", urls=["http://127.0.0.1:9/offline-model.safetensors"])
    registry["models"].append(model)
    path = folder / "models.json"
    path.write_text(json.dumps(registry), encoding="utf-8")
    return path


def test_models_section_lists_opens_and_reports_a_failed_download(harness, slicer, shots, tmp_path, monkeypatch):
    ui = harness.ui
    monkeypatch.setenv("MED3DFM_REGISTRY", str(_registry_with_an_offline_model(tmp_path)))
    harness.expand(ui.modelsCollapsibleButton)
    harness.click(ui.refreshModelsButton)
    assert {DEMO, "med3dfm-encoder-small", "offline-model"} <= set(_table_ids(ui))
    table = ui.modelsTableWidget
    assert table.item(_table_ids(ui).index(DEMO), 5).text() == "yes (bundled)" and ui.modelsStatusLabel.text.startswith("Model folder: ")
    assert table.item(_table_ids(ui).index("offline-model"), 5).text() == "not installed"
    harness.click(ui.openModelsFolderButton)
    assert len(harness.opened_urls) == 1 and harness.opened_urls[0].startswith("file://")
    harness.click(ui.importModelButton)  # the file dialog is cancelled: no import starts
    assert harness.file_dialogs == ["Import a Med3DFM model"] and not ui.cancelModelsButton.enabled and not ui.modelsProgressBar.visible

    # Download of a model whose server cannot be reached: the job fails and a message box says why
    table.selectRow(_table_ids(ui).index("offline-model"))
    harness.click(ui.downloadModelButton)
    assert ui.modelsProgressBar.visible and ui.cancelModelsButton.enabled
    harness.wait_until(lambda: not ui.cancelModelsButton.enabled, 120, "the download job")
    assert ui.modelsStatusLabel.text.startswith("Model folder: ")  # the list was read again after the job
    [message] = harness.messages
    assert message.kind == "critical" and message.text.startswith("Model operation failed: could not download offline-model")
    assert "connection refused" in message.text and "connection refused" in message.detailedText
    assert not ui.modelsProgressBar.visible and table.item(_table_ids(ui).index("offline-model"), 5).text() == "not installed"
    harness.screenshot(shots / "panel-models.png")


def test_troubleshooting_shows_the_package_report(harness):
    ui = harness.ui
    harness.expand(ui.troubleshootingCollapsibleButton)
    harness.click(ui.packageInfoButton)
    [message] = harness.messages
    assert message.kind == "information" and message.title.strip() == "Med3DFM: Python packages" and "torch" in message.text


# --- Classify and Explain -------------------------------------------------------------------------

def _broken_classifier(models_home: Path) -> None:
    """A classification adapter in the model folder whose weights file is damaged (e.g. a cut-off copy)."""
    import hashlib
    import json

    folder = models_home / "models" / "broken-classifier" / "0.1.0"
    folder.mkdir(parents=True)
    weights = b"not a safetensors file"
    (folder / "broken-classifier.safetensors").write_bytes(weights)
    entry = {"id": "broken-classifier", "version": "0.1.0", "task": "adapter", "kind": "classify", "title": "broken classifier",
             "licence": "CC-BY-SA-4.0", "classes": ["normal", "mass"],
             "files": [{"name": "broken-classifier.safetensors", "size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}]}
    (folder / "model.json").write_text(json.dumps(entry), encoding="utf-8")


def test_classify_is_offered_once_a_classifier_is_installed_and_a_broken_one_says_why(harness, slicer, hippocampus_case, shots):
    ui = harness.ui
    _load(harness, slicer, hippocampus_case[0])
    harness.expand(ui.classifyCollapsibleButton)
    assert not ui.classifyButton.enabled and ui.explainButton.enabled and not ui.classifyCancelButton.enabled
    _broken_classifier(Path(os.environ["MED3DFM_HOME"]))
    harness.expand(ui.modelsCollapsibleButton)
    harness.click(ui.refreshModelsButton)
    assert ui.classifierComboBox.currentText == "broken classifier (normal / mass)"
    assert harness.widget._parameterNode.classifierId == "broken-classifier"
    assert ui.classifyButton.enabled and ui.classifyButton.toolTip == "Classify the input volume"

    harness.type_text(ui.classifyPrevalenceLineEdit, "mass=20")  # a slip (a percentage) is named and starts nothing
    harness.click(ui.classifyButton)
    assert ui.classifyStatusLabel.text == "Not started: prevalence 'mass=20': write CLASS=P with P between 0 and 1, e.g. mass=0.2"
    assert harness.widget._classifyJob is None and ui.classifyButton.enabled and harness.messages == []
    harness.type_text(ui.classifyPrevalenceLineEdit, "mass=0.2")
    assert harness.widget._parameterNode.classifyPrevalence == "mass=0.2"
    harness.click(ui.classifyButton)
    assert ui.classifyStatusLabel.text == "Starting..." and ui.classifyCancelButton.enabled
    command = harness.widget._classifyJob.command
    assert command[command.index("--prevalence") + 1] == "mass=0.2"
    assert not ui.classifyButton.enabled and not ui.explainButton.enabled  # one classify/explain job at a time
    _run_to_end(harness, "classifyButton", "the classify job")
    [message] = harness.messages
    assert message.kind == "critical" and message.text.startswith("Classification failed: not a valid safetensors weight file"), message
    assert ui.classifyStatusLabel.text.startswith("Failed: ") and not ui.classifyProgressBar.visible and not ui.classifyCancelButton.enabled
    assert ui.explainButton.enabled
    harness.screenshot(shots / "panel-classify-error.png")
    message.save(shots / "message-classify-error.png")


def test_explain_maps_a_segment_and_its_cancel_stops_it(harness, slicer, hippocampus_case):
    ui = harness.ui
    volume = _load(harness, slicer, hippocampus_case[0])
    harness.choose(ui.deviceComboBox, "CPU")
    harness.expand(ui.classifyCollapsibleButton)
    harness.choose(ui.explainTargetComboBox, SEGMENTS[0])
    harness.click(ui.explainButton)
    harness.click(ui.classifyCancelButton)
    assert ui.classifyStatusLabel.text == "Cancelling..."
    _run_to_end(harness, "explainButton", "the cancelled explain job", timeout=60)
    assert ui.classifyStatusLabel.text == "Cancelled." and not ui.classifyCancelButton.enabled

    harness.click(ui.explainButton)
    seen = _run_to_end(harness, "explainButton", "the explain job")
    heatmaps = [n for n in slicer.mrmlScene.nodes if type(n).__name__ == "vtkMRMLScalarVolumeNode" and n is not volume]
    assert len(heatmaps) == 1 and ui.classifyStatusLabel.text == f"Heatmap: {heatmaps[0].GetName()}", harness.describe()
    assert seen and not ui.classifyProgressBar.visible and not ui.classifyCancelButton.enabled
    assert slicer.util.arrayFromVolume(heatmaps[0]).shape == slicer.util.arrayFromVolume(volume).shape
    assert harness.widget._parameterNode.inputVolume is volume  # the heatmap (a new volume) did not take the input selector
    assert harness.messages == []


# --- issue 21: versions, samples, licences before every job, raw names, GPU memory -----------------------

def _registry_with_versions_and_a_sample(folder: Path, sample_url: str = "", sample_sha: str = "", sample_size: int = 0) -> Path:
    """Resources/models.json plus an older version of the demo model (the same bundled weights) and,
    when given, a sample scan for the demo model."""
    import copy
    import json

    registry = json.loads((ROOT / "Resources" / "models.json").read_text(encoding="utf-8"))
    demo = next(m for m in registry["models"] if m["id"] == DEMO)
    older = copy.deepcopy(demo)
    older["version"] = "0.0.9"
    registry["models"].append(older)
    if sample_url:
        demo["sample"] = {"url": sample_url, "sha256": sample_sha, "size": sample_size, "description": "a held-out hippocampus crop"}
    path = folder / "models.json"
    path.write_text(json.dumps(registry), encoding="utf-8")
    return path


def _items(combo):
    return [combo.itemData(i) for i in range(combo.count)]


def test_show_all_versions_lists_older_ones_and_segment_runs_the_chosen(harness, slicer, hippocampus_case, tmp_path, monkeypatch):
    ui = harness.ui
    monkeypatch.setenv("MED3DFM_REGISTRY", str(_registry_with_versions_and_a_sample(tmp_path)))
    _load(harness, slicer, hippocampus_case[0])
    harness.expand(ui.modelsCollapsibleButton)
    harness.click(ui.refreshModelsButton)
    assert _items(ui.modelComboBox) == [DEMO] and _table_ids(ui).count(DEMO) == 1  # the newest of each id
    harness.click(ui.showAllVersionsCheckBox)
    parameters = harness.widget._parameterNode
    assert parameters.showAllVersions is True
    assert _items(ui.modelComboBox) == [DEMO, f"{DEMO}@0.0.9"] and ui.modelComboBox.currentData == DEMO  # the newest stays chosen
    assert "older version" in ui.modelComboBox.itemText(1) and ui.modelComboBox.itemText(1).startswith("\u2713 ")
    harness.click(ui.refreshModelsButton)
    assert _table_ids(ui).count(DEMO) == 2  # the Models table follows the box
    harness.choose(ui.modelComboBox, ui.modelComboBox.itemText(1))
    assert parameters.modelId == f"{DEMO}@0.0.9"
    harness.choose(ui.deviceComboBox, "CPU")
    harness.click(ui.applyButton)
    assert "--model" in harness.widget._job.command and f"{DEMO}@0.0.9" in harness.widget._job.command
    _run_to_end(harness, "applyButton", "the segment job with the older version")
    [result] = _segmentations(slicer)
    assert result.GetAttribute("Med3DFM.model") == f"{DEMO}@0.0.9", harness.describe()
    harness.click(ui.showAllVersionsCheckBox)  # off again: the older version is gone and Segment runs the one shown
    assert _items(ui.modelComboBox) == [DEMO] and parameters.modelId == DEMO
    assert harness.messages == []


def test_download_sample_for_this_model_loads_it_and_a_bad_checksum_says_so(harness, slicer, hippocampus_case, tmp_path, monkeypatch):
    import hashlib

    from registry_server import FileServer

    ui = harness.ui
    data = hippocampus_case[0].read_bytes()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FileServer() as server:
        url = server.add("/samples/hippocampus_014.nii.gz", data)
        monkeypatch.setenv("MED3DFM_REGISTRY", str(_registry_with_versions_and_a_sample(tmp_path, url, hashlib.sha256(data).hexdigest(), len(data))))
        harness.expand(ui.modelsCollapsibleButton)
        harness.click(ui.refreshModelsButton)
        assert not ui.downloadSampleButton.enabled  # nothing selected yet
        ui.modelsTableWidget.selectRow(_table_ids(ui).index(DEMO))
        harness.process_events()
        assert ui.downloadSampleButton.enabled and "a held-out hippocampus crop" in ui.downloadSampleButton.toolTip
        assert server.requests_for("/samples/hippocampus_014.nii.gz") == []  # nothing is fetched before the click
        harness.click(ui.downloadSampleButton)
        assert ui.modelsProgressBar.visible and ui.cancelModelsButton.enabled and not ui.downloadSampleButton.enabled
        harness.wait_until(lambda: not ui.cancelModelsButton.enabled, 120, "the sample download")
        volume = harness.widget._parameterNode.inputVolume
        assert volume is not None and volume.GetName() == "hippocampus_014", harness.describe()
        assert ui.modelsStatusLabel.text.startswith("Sample loaded as hippocampus_014") and ui.applyButton.enabled
        assert harness.messages == []

        monkeypatch.setenv("MED3DFM_REGISTRY", str(_registry_with_versions_and_a_sample(tmp_path, url.replace("014", "014b"), "d" * 64, len(data))))
        server.add("/samples/hippocampus_014b.nii.gz", data)
        harness.click(ui.refreshModelsButton)
        ui.modelsTableWidget.selectRow(_table_ids(ui).index(DEMO))
        harness.click(ui.downloadSampleButton)
        harness.wait_until(lambda: not ui.cancelModelsButton.enabled, 120, "the failing sample download")
    [message] = harness.messages
    assert message.kind == "critical" and "checksum mismatch" in message.text
    assert [n.GetName() for n in slicer.mrmlScene.nodes if type(n).__name__ == "vtkMRMLScalarVolumeNode"] == ["hippocampus_014"]


def test_learn_classify_and_explain_ask_for_a_restricted_licence_first(harness, slicer, hippocampus_case, monkeypatch):
    ui = harness.ui
    volume = _load(harness, slicer, hippocampus_case[0])
    logic = harness.widget.logic
    asked = []
    restricted = {"id": "nc-encoder", "title": "NC encoder", "licence": "CC-BY-NC-4.0"}
    monkeypatch.setattr(logic, "licenceCards", lambda model_id, encoder=False: asked.append((model_id, encoder)) or [restricted])
    harness.expand(ui.classifyCollapsibleButton)
    harness.answer(QT_CANCEL)
    harness.click(ui.explainButton)
    assert harness.messages[-1].kind == "question" and "CC-BY-NC-4.0: non-commercial use only" in harness.messages[-1].text
    assert ui.classifyStatusLabel.text == "The model's licence was not acknowledged: the job was not started."
    assert harness.widget._classifyJob is None and ui.explainButton.enabled and asked[-1] == (DEMO, False)
    painted, _ = _painted(slicer, volume, hippocampus_case[1], SEGMENTS)
    harness.process_events()
    harness.expand(ui.learnCollapsibleButton)
    harness.choose(ui.learnSegmentationSelector, "painted")
    harness.type_text(ui.learnNameLineEdit, "parts")
    harness.answer(QT_CANCEL)
    harness.click(ui.learnButton)
    assert ui.learnStatusLabel.text == "The encoder's licence was not acknowledged: learning was not started."
    assert harness.widget._learnJob is None and asked[-1] == ("med3dfm-encoder-small", True)
    assert [m.kind for m in harness.messages] == ["question", "question"]


def test_raw_label_names_reach_the_job_and_the_estimate_shows_the_gpu(harness, slicer, hippocampus_case):
    ui = harness.ui
    _load(harness, slicer, hippocampus_case[0])
    harness.click(ui.rawLabelNamesCheckBox)
    assert harness.widget._parameterNode.rawLabelNames is True
    harness.choose(ui.deviceComboBox, "CPU")
    harness.click(ui.applyButton)
    assert "--raw-label-names" in harness.widget._job.command
    harness.click(ui.cancelButton)
    _run_to_end(harness, "applyButton", "the cancelled job", timeout=60)

    # GPU (CUDA): torch in the job interpreter is asked once, in the background; this machine has no GPU
    logic = harness.widget.logic
    harness.choose(ui.deviceComboBox, "GPU (CUDA)")
    assert ui.estimateLabel.text.startswith("Runs on the GPU (CUDA); checking its memory...") and logic.deviceProbeRunning()
    harness.wait_until(lambda: not logic.deviceProbeRunning(), 120, "the device probe")
    harness.process_events()
    import torch

    if not torch.cuda.is_available():
        assert ui.estimateLabel.text.startswith("GPU (CUDA) chosen, but PyTorch sees no CUDA GPU here"), ui.estimateLabel.text
    # what a GPU's report (torch.cuda.mem_get_info) makes of it: fits, or not
    for free, expected in ((20.0, "Runs on the GPU (Test GPU): needs about"), (0.05, "Will not fit on the GPU (Test GPU): one window needs about")):
        logic._deviceFacts = {"auto": "cuda", "cuda_devices": [{"index": 0, "name": "Test GPU", "memory_gib": 24.0, "free_gib": free}]}
        harness.widget._updateGUI()
        assert ui.estimateLabel.text.startswith(expected) and "free of 24.0 GiB" in ui.estimateLabel.text, ui.estimateLabel.text
    assert harness.messages == []


def test_a_scan_that_will_not_fit_is_offered_at_a_lower_resolution(harness, slicer, hippocampus_case, monkeypatch):
    """Main memory too small for the scan at the model's spacing: the estimate says so and names the
    coarser factor that fits; Segment asks, and runs `segment --lower-resolution F` when accepted."""
    import psutil

    ui = harness.ui
    _load(harness, slicer, hippocampus_case[0])
    harness.choose(ui.deviceComboBox, "CPU")
    logic = harness.widget.logic
    node = harness.widget._parameterNode
    needed = logic.memoryCheck(node.inputVolume, DEMO, onCpu=True)[0]
    entry = logic.registryEntry(DEMO)
    from Med3DFMLib.windows import window_bytes_needed

    window = window_bytes_needed(entry["input"]["window"])
    available = window + (needed - window) // 2  # the scan's arrays need twice what is left: 1.5x coarser fits (1.5^3 > 2)
    real = psutil.virtual_memory

    class Memory:
        def __init__(self):
            self.total, self.available = real().total, available

    monkeypatch.setattr(psutil, "virtual_memory", Memory)
    harness.widget._updateGUI()
    assert "Will not fit" in ui.estimateLabel.text and "at 1.5x its spacing instead, which fits" in ui.estimateLabel.text, ui.estimateLabel.text

    harness.answer(QT_CANCEL)
    harness.click(ui.applyButton)
    assert harness.messages[-1].kind == "question" and "at 1.5x the model's spacing instead" in harness.messages[-1].text
    assert harness.widget._job is None and ui.statusLabel.text == "Not enough memory for this scan: segmentation was not started."

    harness.answer(QT_OK)
    harness.click(ui.applyButton)
    command = harness.widget._job.command
    assert command[command.index("--lower-resolution") + 1] == "1.5"
    monkeypatch.setattr(psutil, "virtual_memory", real)  # the job's own guard reads this process's memory no more; let it finish
    _run_to_end(harness, "applyButton", "the lower-resolution job")
    assert ui.statusLabel.text.startswith("Done in") and ui.statusLabel.text.endswith("At 1.5x the model's spacing (less detail)."), ui.statusLabel.text

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"total": 1, "available": 1})())
    harness.widget._updateGUI()
    harness.click(ui.applyButton)  # nothing fits: said, nothing started, no question asked
    assert harness.widget._job is None and ui.statusLabel.text.startswith("The scan does not fit in memory even at 4x")
