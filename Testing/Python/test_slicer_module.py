"""The Slicer module without Slicer: its support package, its .ui, and its Logic on a stand-in.

The Logic test runs the real path: a volume node (real vtkImageData + IJK→RAS matrix) written to a file,
the real `med3dfm segment` job with the bundled model in a background process, and the results read
back into nodes, checked for geometry, names, colours, terminology and Dice against the manual labels.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import py_compile
import re
import struct
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "Med3DFM"
MODULE_FILE = MODULE_DIR / "Med3DFM.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "Med3DFM.ui"
sys.path.insert(0, str(MODULE_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from Med3DFMLib.io import terminology  # noqa: E402
from Med3DFMSupport import choices, dependencies, environment, jobs, results  # noqa: E402

DEMO = "hippocampus-mr-demo"


# --- command lines --------------------------------------------------------------------------------

def test_segment_command_runs_the_cli_with_json_progress(tmp_path):
    command = jobs.segment_command("/opt/Slicer/bin/PythonSlicer", tmp_path / "in.nrrd", tmp_path / "out.seg.nrrd", DEMO, "cpu", table=tmp_path / "out.tsv")
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "Med3DFMLib.cli", "segment"]
    assert command[4] == str(tmp_path / "in.nrrd")
    assert command[command.index("-o") + 1] == str(tmp_path / "out.seg.nrrd")
    assert command[command.index("--model") + 1] == DEMO
    assert command[command.index("--device") + 1] == "cpu"
    assert command[command.index("--table") + 1] == str(tmp_path / "out.tsv")
    assert "--no-overwrite" in command and command[-2:] == ["--progress", "json"]
    # the command line is one the real CLI accepts
    from Med3DFMLib.cli import build_parser

    args = build_parser().parse_args(command[3:])
    assert (args.command, args.model, args.device, args.progress, args.no_overwrite) == ("segment", DEMO, "cpu", "json", True)


def test_segment_command_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="device"):
        jobs.segment_command("py", tmp_path / "a.nrrd", tmp_path / "b.seg.nrrd", DEMO, "gpu")
    with pytest.raises(ValueError, match="seg.nrrd"):
        jobs.segment_command("py", tmp_path / "a.nrrd", tmp_path / "b.nrrd", DEMO)


def test_models_commands_are_accepted_by_the_cli():
    from Med3DFMLib.cli import build_parser

    parser = build_parser()
    for action, arguments in (("list", []), ("download", [DEMO]), ("import", ["m.safetensors"]), ("remove", [DEMO])):
        command = jobs.models_command("py", action, arguments)
        args = parser.parse_args(command[3:])
        assert args.command == "models" and args.models_command == action
    assert "--json" in jobs.models_command("py", "list")
    assert jobs.models_command("py", "download", [DEMO])[-2:] == ["--progress", "json"]
    with pytest.raises(ValueError):
        jobs.models_command("py", "train")


def test_adapt_command_is_accepted_by_the_cli(tmp_path):
    command = jobs.adapt_command("py", tmp_path / "in.nrrd", tmp_path / "painted.seg.nrrd", " left atrium ", tmp_path / "left-atrium.safetensors",
                                 "prototype", "cpu", segment=tmp_path / "out.seg.nrrd")
    assert command[:4] == ["py", "-m", "Med3DFMLib.cli", "adapt"] and command[-2:] == ["--progress", "json"]
    from Med3DFMLib.cli import build_parser

    args = build_parser().parse_args(command[3:])
    assert args.image == [tmp_path / "in.nrrd"] and args.labels == [tmp_path / "painted.seg.nrrd"]
    assert (args.name, args.mode, args.device, args.progress) == ("left atrium", "prototype", "cpu", "json")
    assert args.output == tmp_path / "left-atrium.safetensors" and args.segment == tmp_path / "out.seg.nrrd"
    plain = build_parser().parse_args(jobs.adapt_command("py", "i.nrrd", "l.seg.nrrd", "x", "x.safetensors", seed=3)[3:])
    assert (plain.mode, plain.device, plain.segment, plain.seed) == ("adapter", "auto", None, 3)
    for bad in ({"name": " "}, {"mode": "mlp"}, {"device": "gpu"}, {"output": "x.pt"}, {"labels": "l.nii.gz"}, {"segment": "o.nii.gz"}):
        arguments = {"python": "py", "image": "i.nrrd", "labels": "l.seg.nrrd", "name": "x", "output": "x.safetensors", **bad}
        with pytest.raises(ValueError):
            jobs.adapt_command(**arguments)


def test_adapt_progress_and_held_out_dice():
    spans = jobs.STAGE_SPANS["adapt"]
    overall = [jobs.parse_progress_line(json.dumps({"stage": s, "fraction": 0.5}), "adapt").overall for s in ("load", "features", "train", "segment")]
    assert overall == sorted(overall) and all(0.0 <= v <= 1.0 for v in overall)
    train = jobs.parse_progress_line('{"stage": "train", "fraction": 0.25, "message": "step 40, held-out Dice 0.573"}', "adapt")
    assert train.overall == pytest.approx(spans["train"][0] + 0.25 * (spans["train"][1] - spans["train"][0]))
    assert jobs.held_out_dice(train.message, train.data) == pytest.approx(0.573)
    assert jobs.held_out_dice("step 40", {"held_out_dice": 0.61}) == pytest.approx(0.61)
    assert jobs.held_out_dice("step 20, held-out Dice -9.560") is None  # not a Dice: shown as the raw message
    assert jobs.held_out_dice("encoder window 1 of 1") is None
    record = {"command": "adapt", "adapter": {"classes": ["a", "b"]}, "training": {"mode": "adapter", "held_out_dice": 0.64}, "timings_s": {"total": 71.2}, "feature_cache_hits": 1}
    assert results.training_summary(record) == "2 structure(s), held-out Dice 0.64, adapter, 71 s, features from cache"


def test_adapter_names_and_background_follow_the_library():
    from Med3DFMLib.fewshot.adapt import slugify
    from Med3DFMLib.fewshot.labels import BACKGROUND_NAMES

    for name in ("left atrium", "Hippocampus  (L/R)", "--", "Tumour 2", "ÄÖ liver"):
        assert results.adapter_id(name) == slugify(name)
    assert results.adapter_file_name("left atrium") == "left-atrium.safetensors"
    assert set(results.BACKGROUND_NAMES) == set(BACKGROUND_NAMES)
    assert results.is_background(" Background ") and not results.is_background("background tissue")


def _painted_segment(segment_id, name, mask, color=(0.5, 0.5, 0.5), terminology=""):
    return results.PaintedSegment(segment_id, name, color, terminology, np.asarray(mask, dtype=bool))


def test_painted_segments_merge_into_one_label_map():
    shape = (4, 5, 6)
    a, b, bg, empty = (np.zeros(shape, bool) for _ in range(4))
    a[1, 1:3, 1:3] = True
    b[1, 2:4, 2:4] = True  # overlaps a: the later structure wins
    bg[1, :, 0] = True
    bg[1, 1, 1] = True  # painted as background and as a: the structure wins
    painted = results.painted_labels([_painted_segment("s1", "a", a), _painted_segment("bg", "Background", bg),
                                      _painted_segment("s2", "b", b, (1, 0, 0)), _painted_segment("s3", "unused", empty)])
    assert painted.structures == ["a", "b"] and painted.skipped == ["unused"]
    values = {info["name"]: info["value"] for info in painted.segments}
    assert values == {"Background": 1, "a": 2, "b": 3}
    labels = painted.labels
    assert labels[1, 1, 1] == values["a"] and labels[1, 2, 2] == values["b"] and labels[1, 3, 0] == values["Background"]
    assert labels[0].max() == 0 and labels.dtype == np.uint8
    assert next(i for i in painted.segments if i["name"] == "b")["color"] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no segments"):
        results.painted_labels([])
    with pytest.raises(ValueError, match="no structure is painted"):
        results.painted_labels([_painted_segment("bg", "background", bg), _painted_segment("s", "a", empty)])
    with pytest.raises(ValueError, match="own name"):
        results.painted_labels([_painted_segment("1", "a", a), _painted_segment("2", "A", b)])
    with pytest.raises(ValueError, match="grid"):
        results.painted_labels([_painted_segment("1", "a", a), _painted_segment("2", "b", np.ones((2, 2, 2)))])


def test_painted_segmentation_file_is_what_adapt_reads(tmp_path, hippocampus_case):
    import SimpleITK as sitk

    from Med3DFMLib.io.segmentations import read_labels, resample_labels_to
    from Med3DFMLib.io.volumes import read_volume

    image = read_volume(hippocampus_case[0])
    shape = sitk.GetArrayViewFromImage(image).shape
    mask = np.zeros(shape, bool)
    mask[10, 20:25, 15:20] = True
    entry = terminology.terminology_string({"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "5366008", "Hippocampus"]})
    painted = results.painted_labels([_painted_segment("Segment_1", "hippocampus", mask, (0.9, 0.5, 0.2), entry)])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    path = results.write_painted_segmentation(tmp_path / "painted.seg.nrrd", painted, results.LPS_TO_RAS @ ijk_to_lps)
    labels = read_labels(path)
    assert [(s.value, s.name) for s in labels.segments] == [(1, "hippocampus")]
    assert tuple(labels.segments[0].color) == pytest.approx((0.9, 0.5, 0.2))
    assert labels.segments[0].terminology["type"] == ["SCT", "5366008", "Hippocampus"]
    assert terminology.terminology_string(labels.segments[0].terminology) == entry
    import slicerio

    assert [s["id"] for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]] == ["Segment_1"]  # Slicer's segment ID kept
    on_image = sitk.GetArrayFromImage(resample_labels_to(labels.image, image))  # same grid: voxel for voxel
    assert np.array_equal(on_image == 1, mask)
    assert labels.image.GetSize() == image.GetSize() and np.allclose(labels.image.GetOrigin(), image.GetOrigin())
    assert terminology.terminology_from_string("") is None and terminology.terminology_from_string("a~b") is None
    with pytest.raises(ValueError):
        results.write_painted_segmentation(tmp_path / "painted.nrrd", painted, np.eye(4))


def test_only_the_learned_structures_go_back():
    existing = {"Segment_1": "Anterior hippocampus", "Segment_2": "posterior hippocampus", "bg": "background", "other": "liver"}
    updates = results.segments_to_update(["anterior hippocampus", "posterior hippocampus", "new structure", "background", "liver"], existing,
                                         ["anterior hippocampus", "posterior hippocampus", "new structure", "background"])
    assert [(u.result_name, u.target_id) for u in updates] == [("anterior hippocampus", "Segment_1"), ("posterior hippocampus", "Segment_2"), ("new structure", None)]


def _terminology(code, meaning="structure", context="a context"):
    return f"{context}~SCT^123037004^Anatomical Structure~SCT^{code}^{meaning}~^^~{terminology.DICOM_ANATOMY_CONTEXT}~^^~^^"


def test_a_result_replaces_only_segments_of_the_same_structure():
    existing = [("s1", "Liver", _terminology("10200004", "Liver")), ("s2", "tumour", ""), ("s3", "kidney", _terminology("64033007")),
                ("s4", "kidney", _terminology("64033007")), ("s5", "spleen", _terminology("78961009")), ("s6", "painted", "")]
    plan = results.plan_segment_merge([("liver", _terminology("10200004", "liver, other wording", "another context")),  # codes decide
                                       ("Tumour", _terminology("108369006")),  # one side has no terminology: the name decides
                                       ("kidney", _terminology("64033007")), ("kidney", _terminology("64033007")),
                                       ("kidney", _terminology("64033007")),  # each segment is replaced at most once
                                       ("spleen", _terminology("181279003"))], existing)  # same name, other codes: added
    assert [(u.result_name, u.target_id) for u in plan] == [("liver", "s1"), ("Tumour", "s2"), ("kidney", "s3"), ("kidney", "s4"),
                                                            ("kidney", None), ("spleen", None)]
    assert results.plan_segment_merge([("liver", "")], []) == [results.SegmentUpdate("liver", None)]
    assert terminology.terminology_codes("") is None and terminology.terminology_codes("not~an~entry") == (("", "not~an~entry"),)
    assert results.same_structure(" Liver ", "", "liver", _terminology("10200004"))
    assert not results.same_structure("liver", "", "liver left", "")

    merge = results.SegmentMerge(replaced=["a"], added=["b", "c"], kept=["mine"], segment_ids=["1", "2", "3"])
    assert merge.summary() == "replaced a; added b, c; kept 1 other segment" and results.SegmentMerge().summary() == "no segments"
    outputs = results.SegmentOutputs("segmentation", "table", merge)
    segmentation_node, table_node = outputs
    assert (segmentation_node, table_node, outputs.report) == ("segmentation", "table", merge) and len(outputs) == 2


def test_saved_adapters_join_the_segment_model_list(tmp_path):
    def install(model_id, version, task, title="", with_file=True):
        folder = tmp_path / "models" / model_id / version
        folder.mkdir(parents=True)
        (folder / "model.json").write_text(json.dumps({"id": model_id, "version": version, "task": task, "title": title,
                                                        "files": [{"name": f"{model_id}.safetensors"}]}))
        if with_file:
            (folder / f"{model_id}.safetensors").write_bytes(b"x")

    install("left-atrium", "1.0.0", "adapter", "left atrium")
    install("left-atrium", "0.9.0", "adapter")
    install("broken", "1.0.0", "adapter", with_file=False)
    install("a-model", "1.0.0", "segment")
    (tmp_path / "models" / "junk" / "1").mkdir(parents=True)
    (tmp_path / "models" / "junk" / "1" / "model.json").write_text("{not json")
    adapters = results.installed_models(tmp_path, task="adapter")
    assert [(a["id"], a["version"]) for a in adapters] == [("left-atrium", "1.0.0")]
    assert results.installed_models(tmp_path / "nowhere") == []
    registry = environment.read_registry(ROOT / "Resources" / "models.json")["models"]
    choices = results.segment_model_choices(registry, adapters)
    assert choices[0][1] == DEMO and choices[-1] == ("left atrium (learned: left-atrium)", "left-atrium")
    assert all(entry["task"] == "segment" for entry in registry if entry["id"] in {c[1] for c in choices[:-1]})


# --- progress lines -------------------------------------------------------------------------------

def test_progress_lines_become_events_with_overall_fraction():
    event = jobs.parse_progress_line('{"stage": "infer", "fraction": 0.5, "message": "window 2 of 4"}')
    assert (event.kind, event.stage, event.fraction, event.message) == ("progress", "infer", 0.5, "window 2 of 4")
    start, end = jobs.STAGE_SPANS["segment"]["infer"]
    assert event.overall == pytest.approx(start + 0.5 * (end - start))
    overall = [jobs.parse_progress_line(json.dumps({"stage": s, "fraction": 0.0})).overall for s in ("load", "model", "preprocess", "infer", "postprocess", "write")]
    assert overall == sorted(overall)

    done = jobs.parse_progress_line('{"stage": "done", "fraction": 1.0, "message": "wrote x", "outputs": {"segmentation": "/t/x.seg.nrrd"}}')
    assert done.kind == "done" and done.overall == 1.0 and done.data["outputs"]["segmentation"] == "/t/x.seg.nrrd"
    error = jobs.parse_progress_line('{"stage": "error", "fraction": 1.0, "message": "model xyz is not in the registry"}')
    assert error.kind == "error" and error.message == "model xyz is not in the registry"
    result = jobs.parse_progress_line('{"result": "installed", "id": "m", "version": "1"}')
    assert result.kind == "result" and result.stage == "installed" and result.data["id"] == "m"
    download = jobs.parse_progress_line('{"stage": "download", "fraction": 0.25, "message": "m: 1 MB", "bytes": 10}', "models")
    assert download.overall == pytest.approx(0.25) and download.data["bytes"] == 10


@pytest.mark.parametrize("line", ["", "warning: something", "{not json", "[1, 2]", '{"stage": "infer", "fraction": "x"}'])
def test_odd_lines_never_break_parsing(line):
    event = jobs.parse_progress_line(line)
    assert event.kind in ("text", "progress")
    assert 0.0 <= event.overall <= 1.0


# --- registry labels -> Slicer segments ------------------------------------------------------------

def test_terminology_string_has_slicers_seven_fields():
    text = terminology.terminology_string({"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "5366008", "Hippocampus"]})
    fields = text.split("~")
    assert len(fields) == 7
    assert fields[0] == terminology.SLICER_ANATOMY_CONTEXT
    assert fields[1:4] == ["SCT^123037004^Anatomical Structure", "SCT^5366008^Hippocampus", "^^"]
    assert fields[4] == terminology.DICOM_ANATOMY_CONTEXT and fields[5:] == ["^^", "^^"]
    assert terminology.terminology_string(None) == ""
    with_modifier = terminology.terminology_string({"contextName": "C", "category": ["a", "b", "c"], "type": ["d", "e", "f"], "typeModifier": ["SCT", "7771000", "Left"]})
    assert with_modifier.split("~")[3] == "SCT^7771000^Left" and with_modifier.startswith("C~")


def test_terminology_reads_back_as_it_was_written():
    """The .seg.nrrd writer, the panel and the adapters share one conversion: dict -> tag string -> dict."""
    card = {"category": ["SCT", "49755003", "Morphologically Altered Structure"], "type": ["SCT", "4147007", "Mass"],
            "anatomicRegion": ["SCT", "23451007", "Adrenal gland"], "anatomicRegionModifier": ["SCT", "24028007", "Right"]}
    text = terminology.terminology_string(card)
    assert terminology.terminology_from_string(text) == terminology.complete_terminology(card)
    assert terminology.terminology_string(terminology.terminology_from_string(text)) == text
    # missing or empty context names get the ones Slicer's terminology widget needs; the card is not changed
    completed = terminology.complete_terminology({**card, "contextName": ""})
    assert (completed["contextName"], completed["anatomicContextName"]) == (terminology.SLICER_ANATOMY_CONTEXT, terminology.DICOM_ANATOMY_CONTEXT)
    assert "anatomicContextName" not in card
    assert terminology.terminology_from_string("ctx~^^~SCT^1^x~^^~~^^~^^") is None  # no category: not an entry
    assert terminology.terminology_codes(text) == (("SCT", "49755003"), ("SCT", "4147007"), ("", ""), ("SCT", "23451007"), ("SCT", "24028007"))


def test_segment_display_info_from_the_registry():
    registry = environment.read_registry(ROOT / "Resources" / "models.json")
    entry = environment.registry_entry(registry, DEMO)
    assert entry is not None and environment.registry_entry(registry, f"{DEMO}@{entry['version']}")["id"] == DEMO
    assert environment.registry_entry(registry, "no-such-model") is None
    display = results.segment_display_info(entry)
    assert [d.value for d in display] == [1, 2]
    assert [d.name for d in display] == ["anterior hippocampus", "posterior hippocampus"]
    assert display[0].color == pytest.approx((0.86, 0.55, 0.24))
    assert "SCT^5366008^Hippocampus" in display[0].terminology


# --- records, tables, models list ------------------------------------------------------------------

def test_record_and_table_are_read(tmp_path):
    seg = tmp_path / "case.seg.nrrd"
    assert results.record_path_for(seg) == tmp_path / "case.json"
    with pytest.raises(FileNotFoundError):
        results.read_job_record(tmp_path / "case.json")
    (tmp_path / "case.json").write_text(json.dumps({"command": "segment", "model": {"id": DEMO, "version": "0.1.0"}, "device": "cpu", "segments": []}))
    (tmp_path / "case.tsv").write_text("# model x 1 sha256 abc\nsegment\tlabel\tvolume_ml\nleft lobe\t1\t2.5\n")
    result = results.SegmentResult.from_outputs({"segmentation": str(seg), "table": str(tmp_path / "case.tsv")}, seg)
    assert (result.model_id, result.model_version, result.device) == (DEMO, "0.1.0", "cpu")
    assert json.loads(result.provenance)["command"] == "segment"
    comments, columns, rows = results.read_tsv(result.table)
    assert comments == ["model x 1 sha256 abc"] and columns == ["segment", "label", "volume_ml"] and rows == [["left lobe", 1, 2.5]]
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError):
        results.read_job_record(tmp_path / "bad.json")


def test_model_rows():
    listing = [{"id": "a", "version": "1", "task": "segment", "title": "A", "licence": "MIT", "size": 10_224_566, "installed": "bundled", "path": "/x"},
               {"id": "b", "version": "2", "task": "classify", "title": "", "licence": "CC-BY-4.0", "size": 999, "installed": "not installed", "path": None}]
    rows = results.model_rows(listing)
    assert [(r.id, r.installed, r.size) for r in rows] == [("a", True, "10.2 MB"), ("b", False, "999 B")]
    assert [r.id for r in results.model_rows(listing, task="segment")] == ["a"]


# --- environment ------------------------------------------------------------------------------------

def test_library_root_for_source_checkout_and_installed_layout(tmp_path):
    assert environment.library_root(MODULE_DIR) == ROOT
    installed = tmp_path / "qt-scripted-modules"
    (installed / "Med3DFMLib").mkdir(parents=True)
    (installed / "Med3DFMLib" / "__init__.py").write_text("")
    assert environment.library_root(installed) == installed.resolve()
    with pytest.raises(FileNotFoundError):
        environment.library_root(tmp_path / "elsewhere")


def test_python_executable_prefers_pythonslicer(tmp_path):
    assert environment.python_executable(None, which=lambda name: "/on/path/PythonSlicer") == "/on/path/PythonSlicer"
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    exe.write_text("")
    assert environment.python_executable(str(tmp_path), which=lambda name: None) == str(exe)
    assert environment.python_executable(None, which=lambda name: None) == sys.executable


def test_job_environment_puts_the_library_first(tmp_path):
    env = environment.job_environment({"PYTHONPATH": os.pathsep.join(["/a", str(tmp_path)]), "X": "1"}, tmp_path, {"Y": "2"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/a"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["X"] == "1" and env["Y"] == "2"


def test_requirements_leave_out_what_slicer_and_the_pytorch_extension_provide():
    requirements = dependencies.read_requirements(ROOT / "Resources" / "requirements.txt")
    names = {dependencies.requirement_name(r).lower() for r in requirements}
    assert {"monai", "safetensors", "slicerio", "pynrrd", "psutil", "tqdm", "jsonschema"} <= names
    assert not names & {"torch", "simpleitk", "numpy", "vtk"}
    from packaging.requirements import Requirement  # every line is a valid requirement

    [Requirement(r) for r in requirements]
    assert dependencies.requirement_name("monai[nibabel]>=1.3; python_version>'3'") == "monai"


def test_missing_requirements_are_the_absent_and_the_outdated():
    import numpy

    installed = f"numpy=={numpy.__version__}"
    assert dependencies.missing_requirements([installed, "numpy>=1.0"]) == []
    assert dependencies.missing_requirements([installed, "numpy<1.0", "surely-not-installed-pkg>=1"]) == ["numpy<1.0", "surely-not-installed-pkg>=1"]
    assert dependencies.torch_installed()  # the test environment runs jobs, so it has torch
    assert isinstance(dependencies.cuda_likely_available(), bool)


def test_cpu_estimate_grows_with_the_volume_and_shrinks_with_threads():
    spec = {"spacing": [1.0, 1.0, 1.0], "window": [64, 64, 64]}
    small = environment.estimate_cpu_seconds((39, 50, 40), (1, 1, 1), spec, threads=2)
    large = environment.estimate_cpu_seconds((512, 512, 300), (0.8, 0.8, 1.5), spec, threads=2)
    assert environment.JOB_OVERHEAD_SECONDS < small < large
    assert environment.estimate_cpu_seconds((512, 512, 300), (0.8, 0.8, 1.5), spec, threads=16) < large
    assert environment.describe_duration(7) == "about 5 s" and environment.describe_duration(300) == "about 5 min"
    assert environment.describe_duration(4 * 3600).endswith("h")


def test_memory_check_before_segment_is_the_jobs_own_guard():
    """The panel's 'will not fit' says what the job would refuse: the same bytes for the same scan, on
    the model grid (a CT of 512 x 512 x 300 at 0.8 mm is resampled to 1 mm before anything runs)."""
    import torch

    from Med3DFMLib.errors import Med3DFMError
    from Med3DFMLib.inference import plan_memory

    spec = {"spacing": [1.0, 1.0, 1.0], "window": [64, 64, 64]}
    assert environment.model_grid_shape((512, 512, 300), (0.8, 0.8, 1.5), spec) == [410, 410, 450]
    needed, available, fits = environment.memory_check((512, 512, 300), (0.8, 0.8, 1.5), spec, 3, on_cpu=True, available=64 * 1024 ** 3)
    assert fits and available == 64 * 1024 ** 3
    plan_memory((450, 410, 410), 3, (64, 64, 64), torch.device("cpu"), host_available=needed)  # exactly enough: runs
    needed, _, fits = environment.memory_check((512, 512, 300), (0.8, 0.8, 1.5), spec, 3, on_cpu=True, available=needed - 1)
    assert not fits
    with pytest.raises(Med3DFMError, match="not enough main memory"):
        plan_memory((450, 410, 410), 3, (64, 64, 64), torch.device("cpu"), host_available=needed - 1)
    # On a GPU the windows' activations live there, not in main memory.
    on_gpu, _, _ = environment.memory_check((512, 512, 300), (0.8, 0.8, 1.5), spec, 3, on_cpu=False, available=1)
    assert on_gpu < needed and environment.describe_bytes(on_gpu).endswith("GiB")
    assert environment.memory_check((40, 50, 39), (1, 1, 1), spec, 3, on_cpu=True)[2]  # a crop fits on this machine


def test_diagnostics_text_has_versions_paths_and_the_last_error():
    text = environment.diagnostics_text({"Slicer home": "/opt/Slicer"}, {"command": ["py", "-m", "x"], "returncode": 1, "error": "boom", "stderr": "line1\nmed3dfm: error: boom"},
                                        dependencies.installed_versions(["numpy", "surely-not-installed-pkg"]))
    assert "/opt/Slicer" in text and "med3dfm: error: boom" in text and "exit code  : 1" in text
    assert "surely-not-installed-pkg: not installed" in text and "numpy: " in text


def test_other_patients_command_is_accepted_by_the_cli(tmp_path):
    from Med3DFMLib.cli import build_parser
    from Med3DFMLib.fewshot.adapt import stop_file_for

    pairs = [(tmp_path / "a.nrrd", tmp_path / "a.seg.nrrd"), (tmp_path / "b.nrrd", tmp_path / "b.seg.nrrd")]
    output = tmp_path / "left-atrium.safetensors"
    command = jobs.decoder_adapt_command("py", pairs, " left atrium ", output, 7.5, "cpu")
    assert command[:4] == ["py", "-m", "Med3DFMLib.cli", "adapt"] and command[-2:] == ["--progress", "json"]
    args = build_parser().parse_args(command[3:])
    assert list(zip(args.image, args.labels)) == pairs
    assert (args.mode, args.dense, args.budget_minutes, args.name, args.output, args.device, args.segment) == ("decoder", True, 7.5, "left atrium", output, "cpu", None)
    assert build_parser().parse_args(jobs.decoder_adapt_command("py", pairs[:1], "x", "x.safetensors")[3:]).budget_minutes == jobs.BUDGET_MINUTES_DEFAULT == 3.0
    assert jobs.BUDGET_MINUTES_RANGE == (0.5, 120.0)
    for bad in ({"pairs": []}, {"name": " "}, {"budget_minutes": 0}, {"budget_minutes": "soon"}, {"device": "gpu"}, {"output": "x.pt"},
                {"pairs": [("a.nrrd", "a.nii.gz")]}):
        arguments = {"python": "py", "pairs": pairs, "name": "x", "output": "x.safetensors", **bad}
        with pytest.raises(ValueError):
            jobs.decoder_adapt_command(**arguments)
    # Cancel's stop file is the library's: OUTPUT + ".stop"
    assert jobs.stop_file_for(output) == stop_file_for(output) == Path(str(output) + ".stop")
    # decoder progress: "train" is a fraction of the budget, most of the bar
    spans = jobs.STAGE_SPANS[jobs.DECODER_KIND]
    overall = [jobs.parse_progress_line(json.dumps({"stage": s, "fraction": 0.5}), jobs.DECODER_KIND).overall for s in ("load", "prepare", "train", "segment")]
    assert overall == sorted(overall) and spans["train"][1] - spans["train"][0] > 0.8


def test_labelled_volumes_must_share_their_structures():
    assert results.common_structures([("A", ["anterior", "posterior"]), ("B", ["posterior", "anterior"])]) == ["anterior", "posterior"]
    with pytest.raises(ValueError, match="B has no 'posterior'"):
        results.common_structures([("A", ["anterior", "posterior"]), ("B", ["anterior"])])
    with pytest.raises(ValueError, match="'tail' that A has not"):
        results.common_structures([("A", ["anterior"]), ("B", ["anterior", "tail"])])
    with pytest.raises(ValueError, match="at least one"):
        results.common_structures([])
    record = {"command": "adapt", "adapter": {"classes": ["a", "b"]}, "parameters": {"mode": "decoder"},
              "training": {"held_out_dice": None, "steps": 40, "stopped_by": "user"}, "timings_s": {"total": 31.0}}
    assert results.stopped_early(record) and not results.stopped_early({"training": {"stopped_by": "budget"}})
    assert results.training_summary(record) == "2 structure(s), decoder, 40 steps, stopped early (best model so far), 31 s"


def _stoppable_script(tmp_path, honours_stop: bool) -> Path:
    """A stand-in for `adapt --mode decoder`: reports progress until OUTPUT.stop appears (or forever)."""
    script = tmp_path / ("stops.py" if honours_stop else "ignores.py")
    script.write_text(textwrap.dedent(f"""
        import json, os, sys, time
        output = sys.argv[1]
        step = 0
        while not ({honours_stop} and os.path.exists(output + ".stop")):
            step += 1
            print(json.dumps({{"stage": "train", "fraction": min(1.0, step / 1000), "message": f"step {{step}}"}}), flush=True)
            time.sleep(0.05)
        os.remove(output + ".stop")
        open(output, "w").write("best so far")
        print(json.dumps({{"stage": "done", "fraction": 1.0, "outputs": {{"adapter": output}}}}), flush=True)
    """))
    return script


def _first_progress(job, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.kind == "progress" for e in job.poll()):
            return
        time.sleep(0.05)
    raise AssertionError("no progress line")


def test_cancel_with_a_stop_file_keeps_the_result(tmp_path):
    output = tmp_path / "job" / "m.safetensors"
    output.parent.mkdir()
    job = jobs.Job([sys.executable, str(_stoppable_script(tmp_path, True)), str(output)], kind=jobs.DECODER_KIND, temp_dir=output.parent,
                   stop_file=jobs.stop_file_for(output)).start()
    assert job.can_stop_early and not job.stopping
    _first_progress(job)
    assert job.stop_or_cancel() is True  # asked to stop, not killed
    assert job.stopping and job.stop_file.exists() and not job.cancelled
    result = job.wait(timeout=30)
    assert result.ok and not result.cancelled and result.outputs["adapter"] == str(output)
    assert output.read_text() == "best so far" and not job.stop_file.exists() and not job.stopping
    job.cleanup()

    # a job that does not stop within the grace time is killed; a second Cancel kills at once
    output = tmp_path / "late" / "m.safetensors"
    output.parent.mkdir()
    job = jobs.Job([sys.executable, str(_stoppable_script(tmp_path, False)), str(output)], kind=jobs.DECODER_KIND,
                   stop_file=jobs.stop_file_for(output), stop_grace_s=1.0).start()
    _first_progress(job)
    started = time.monotonic()
    assert job.stop_or_cancel() is True
    result = job.wait(timeout=30)
    assert result.cancelled and not result.ok and 1.0 <= time.monotonic() - started < 15
    assert "did not stop within 1 s" in result.error and not output.exists()
    job = jobs.Job([sys.executable, str(_stoppable_script(tmp_path, False)), str(output)], stop_file=jobs.stop_file_for(output)).start()
    _first_progress(job)
    assert job.stop_or_cancel() is True and job.stop_or_cancel() is False
    assert job.wait(timeout=30).cancelled

    # a job without a stop file ("this scan") is killed as before
    job = jobs.Job([sys.executable, str(_stoppable_script(tmp_path, True)), str(tmp_path / "x.safetensors")]).start()
    _first_progress(job)
    assert not job.can_stop_early and job.stop_or_cancel() is False
    assert job.wait(timeout=30).cancelled


# --- the job runner ---------------------------------------------------------------------------------

def test_cancel_ends_the_whole_process_tree(tmp_path):
    import psutil
    script = tmp_path / "tree.py"
    script.write_text(textwrap.dedent("""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({"stage": "infer", "fraction": 0.1, "message": f"child {child.pid}"}), flush=True)
        time.sleep(60)
    """))
    job = jobs.Job([sys.executable, str(script)], temp_dir=tmp_path / "job")
    (tmp_path / "job").mkdir()
    job.start()
    events = []
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        events = [e for e in job.poll() if e.kind == "progress"]
        time.sleep(0.05)
    child_pid = int(events[0].message.split()[1])
    assert job.running and psutil.pid_exists(child_pid)
    job.cancel()
    result = job.wait(timeout=30)
    assert result.cancelled and not result.ok and result.error == "cancelled"
    time.sleep(0.2)
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    job.cleanup()
    assert not (tmp_path / "job").exists()


def test_a_failing_job_gives_one_readable_message(tmp_path):
    command = jobs.segment_command(sys.executable, tmp_path / "missing.nrrd", tmp_path / "o.seg.nrrd", DEMO, "cpu")
    job = jobs.Job(command, env=environment.job_environment(os.environ, ROOT)).start()
    result = job.wait(timeout=120)
    assert result.returncode == 1 and not result.ok
    assert result.error and "\n" not in result.error and "missing.nrrd" in result.error
    assert "med3dfm: error:" in result.stderr
    assert not (tmp_path / "o.seg.nrrd").exists()


def test_a_short_job_runs_to_its_end_with_a_summary_for_diagnostics(tmp_path):
    """`models list/remove/import` run without progress: the process, and its one-line error for the panel."""
    failing = [sys.executable, "-c", "import sys; print('{}'); print('step 1', file=sys.stderr); print('med3dfm: error: boom', file=sys.stderr); sys.exit(3)"]
    completed, summary = jobs.run_to_end(failing, env=dict(os.environ), timeout=60)
    assert completed.returncode == 3 and completed.stdout.strip() == "{}"
    assert summary == {"command": failing, "returncode": 3, "stderr": completed.stderr, "error": "med3dfm: error: boom"}
    completed, summary = jobs.run_to_end([sys.executable, "-c", "pass"], timeout=60)
    assert completed.returncode == 0 and summary["error"] is None
    lines = "\n".join(['{"stage": "import", "fraction": 1.0}', "note", '{"result": "imported", "id": "x", "path": "/m/x/1.0.0/x.safetensors"}'])
    assert jobs.imported_model_path(lines) == Path("/m/x/1.0.0/x.safetensors")
    assert jobs.imported_model_path('{"result": "skipped", "id": "x"}') is None
    error = jobs.Med3DFMJobError("the job failed", "traceback ...")
    assert str(error) == "the job failed" and error.details == "traceback ..." and isinstance(error, RuntimeError)


def test_a_learned_adapter_is_kept_with_its_record(tmp_path):
    job_folder, kept = tmp_path / "job", tmp_path / "adapters"
    job_folder.mkdir()
    (job_folder / "left-atrium.safetensors").write_bytes(b"weights")
    (job_folder / "left-atrium.json").write_text(json.dumps({"command": "adapt", "adapter": {"id": "left-atrium"}}))
    adapter, record = results.keep_adapter(job_folder / "left-atrium.safetensors", kept)
    assert adapter == kept / "left-atrium.safetensors" and adapter.read_bytes() == b"weights"
    assert record["adapter"]["id"] == "left-atrium" and json.loads((kept / "left-atrium.json").read_text()) == record
    (job_folder / "other.safetensors").write_bytes(b"w")
    (job_folder / "other.json").write_text(json.dumps({"command": "segment"}))
    with pytest.raises(ValueError, match="adapt job"):
        results.keep_adapter(job_folder / "other.safetensors", kept)


# --- the module file and its .ui --------------------------------------------------------------------

def _helper_files():
    """The Python files of the module's two helper packages (Slicer-free, and Slicer-side)."""
    return sorted((MODULE_DIR / "Med3DFMSupport").glob("*.py")) + sorted((MODULE_DIR / "Med3DFMSlicer").glob("*.py"))


def test_module_files_byte_compile(tmp_path):
    for path in [MODULE_FILE, *_helper_files()]:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


def test_reload_rereads_every_helper_after_what_it_imports():
    """Developer mode's Reload (Med3DFMWidget.onReload) re-reads the helper modules in HELPER_MODULES' order."""
    from Med3DFMSlicer import HELPER_MODULES  # the package itself imports nothing from Slicer

    files = {f"{path.parent.name}.{path.stem}": path for path in _helper_files() if path.stem != "__init__"}
    assert sorted(HELPER_MODULES) == sorted(files)
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in ("Med3DFMSupport", "Med3DFMSlicer"):
                imported |= {f"{node.module}.{alias.name}" for alias in node.names} & set(files)
            elif isinstance(node, ast.ImportFrom) and node.module in files:
                imported.add(node.module)
        assert all(HELPER_MODULES.index(other) < HELPER_MODULES.index(name) for other in imported), (name, imported)


def _ui_names():
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    bound = {}
    for w in tree.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[w.get("name")] = prop.find("string").text
    return widgets, bound


def test_every_widget_the_code_uses_is_in_the_ui():
    widgets, _bound = _ui_names()
    panel = [MODULE_FILE] + sorted((MODULE_DIR / "Med3DFMSlicer").glob("panel_*.py"))  # the widget and its mixin
    used = set(re.findall(r"self\.ui\.(\w+)", "".join(path.read_text(encoding="utf-8") for path in panel)))
    assert used, "the module uses no widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used by the panel but not in Med3DFM.ui: {missing}"
    # the top-level widget passes the scene to every MRML combo box
    receivers = {c.findtext("receiver") for c in ET.parse(UI_FILE).iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert receivers == {name for name, cls in widgets.items() if cls == "qMRMLNodeComboBox"}


def test_ui_parameter_names_are_parameter_node_fields():
    _widgets, bound = _ui_names()
    module = ast.parse((MODULE_DIR / "Med3DFMSlicer" / "parameters.py").read_text(encoding="utf-8"))
    wrapper = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "Med3DFMParameterNode")
    fields = {s.target.id for s in wrapper.body if isinstance(s, ast.AnnAssign)}
    assert set(bound.values()) <= fields and {"inputVolume", "outputSegmentation"} <= set(bound.values())


def test_fixed_combo_boxes_hold_the_values_the_jobs_take(tmp_path):
    """Each fixed combo box of the .ui has one item per value in choices.py, and every value is one the
    command line accepts; an index picks a value, an unknown value shows the first item."""
    tree = ET.parse(UI_FILE)
    items = {w.get("name"): len(w.findall("item")) for w in tree.iter("widget") if w.get("class") in ("QComboBox", "ctkComboBox")}
    assert {name: items.get(name) for name in choices.COMBO_BOX_VALUES} == {name: len(v) for name, v in choices.COMBO_BOX_VALUES.items()}
    for device in choices.DEVICES:
        jobs.segment_command("py", tmp_path / "i.nrrd", tmp_path / "o.seg.nrrd", choices.DEFAULT_MODEL, device)
    for mode in choices.LEARN_MODES:
        jobs.adapt_command("py", "i.nrrd", "l.seg.nrrd", "x", "x.safetensors", mode)
    for method in choices.HEATMAP_METHODS[1:]:  # the first, "none", is no heatmap at all
        jobs.classify_command("py", "i.nrrd", "r.tsv", "m", heatmap="h.nrrd", heatmap_method=method)
    for method in choices.EXPLAIN_METHODS:
        jobs.explain_command("py", "i.nrrd", "h.nrrd", choices.DEFAULT_MODEL, "t", method)
    assert choices.HEATMAP_METHODS[0] == "none" and choices.LEARN_SOURCES == ("thisScan", "otherPatients")
    assert choices.index_of(choices.DEVICES, "cuda") == 2 and choices.index_of(choices.DEVICES, "tpu") == 0
    assert choices.value_at(choices.DEVICES, 1) == "cpu" and choices.value_at(choices.DEVICES, -1) is None and choices.value_at(choices.DEVICES, 3) is None
    registry = environment.read_registry(ROOT / "Resources" / "models.json")
    assert environment.registry_entry(registry, choices.DEFAULT_MODEL) is not None


def test_every_button_runs_a_command_the_cli_has(tmp_path):
    """Segment, Learn, Classify, Explain and Models build command lines that the real CLI parser accepts."""
    from Med3DFMLib.cli import build_parser

    parser = build_parser()
    commands = {
        "segment": jobs.segment_command("py", tmp_path / "i.nrrd", tmp_path / "o.seg.nrrd", DEMO),
        "adapt": jobs.adapt_command("py", tmp_path / "i.nrrd", tmp_path / "l.seg.nrrd", "x", tmp_path / "x.safetensors"),
        "classify": jobs.classify_command("py", tmp_path / "i.nrrd", tmp_path / "r.tsv", "m"),
        "explain": jobs.explain_command("py", tmp_path / "i.nrrd", tmp_path / "h.nrrd", DEMO, "anterior hippocampus"),
        "models": jobs.models_command("py", "list"),
    }
    for name, command in commands.items():
        assert parser.parse_args(command[3:]).command == name
    text = UI_FILE.read_text(encoding="utf-8")
    for button in ("Segment", "Learn", "Classify", "Explain"):
        assert f"<string>{button}</string>" in text


def test_classify_and_explain_commands(tmp_path):
    from Med3DFMLib.cli import build_parser

    parser = build_parser()
    command = jobs.classify_command("py", tmp_path / "i.nrrd", tmp_path / "r.tsv", "adrenal-mass", "cpu", roi=tmp_path / "roi.seg.nrrd",
                                    heatmap=tmp_path / "h.nrrd", heatmap_method="gradcam")
    assert command[-2:] == ["--progress", "json"]
    args = parser.parse_args(command[3:])
    assert (args.input, args.model, args.output, args.device) == (tmp_path / "i.nrrd", "adrenal-mass", tmp_path / "r.tsv", "cpu")
    assert (args.roi, args.heatmap, args.heatmap_method) == (tmp_path / "roi.seg.nrrd", tmp_path / "h.nrrd", "gradcam")
    plain = parser.parse_args(jobs.classify_command("py", "i.nrrd", "r.tsv", "m")[3:])
    assert (plain.roi, plain.heatmap, plain.device, plain.prevalence) == (None, None, "auto", None)
    args = parser.parse_args(jobs.explain_command("py", "i.nrrd", "h.nrrd", DEMO, " anterior hippocampus ", "occlusion", "cpu")[3:])
    assert (args.model, args.target, args.method, args.output) == (DEMO, "anterior hippocampus", "occlusion", Path("h.nrrd"))
    for bad in ({"output": "r.csv"}, {"device": "gpu"}, {"heatmap": "h.seg.nrrd"}, {"heatmap": "h.nrrd", "heatmap_method": "saliency"}):
        with pytest.raises(ValueError):
            jobs.classify_command(**{"python": "py", "image": "i.nrrd", "output": "r.tsv", "model": "m", **bad})
    for bad in ({"target": " "}, {"method": "lime"}, {"output": "h.seg.nrrd"}, {"device": "tpu"}):
        with pytest.raises(ValueError):
            jobs.explain_command(**{"python": "py", "image": "i.nrrd", "output": "h.nrrd", "model": DEMO, "target": "t", **bad})


def test_the_panels_prevalence_text_reaches_the_cli_as_the_cli_reads_it():
    """"mass=0.2, adrenal cyst = 0.05" becomes two --prevalence options that the CLI's own parser
    turns into {class: share}; slips are refused before a job starts, naming what was typed."""
    from Med3DFMLib.cli import build_parser
    from Med3DFMLib.commands.classify import parse_prevalence

    command = jobs.classify_command("py", "i.nrrd", "r.tsv", "m", prevalence="mass=0.2, adrenal cyst = 0.05;")
    args = build_parser().parse_args(command[3:])
    assert parse_prevalence(args.prevalence) == {"mass": 0.2, "adrenal cyst": 0.05}
    assert jobs.parse_prevalence_text("  ") == [] and "--prevalence" not in jobs.classify_command("py", "i.nrrd", "r.tsv", "m", prevalence=" ")
    for slip in ("mass", "mass=", "=0.2", "mass=20", "mass=0", "mass=1", "mass=0.2 cyst=0.1", "mass=a lot"):
        with pytest.raises(ValueError, match="write CLASS=P with P between 0 and 1"):
            jobs.parse_prevalence_text(slip)


def test_classifiers_have_their_own_list_and_segments_name_explain_targets(tmp_path):
    adapters = [
        {"id": "left-atrium", "task": "adapter", "title": "left atrium", "labels": [{"value": 1, "name": "left atrium"}]},
        {"id": "adrenal-mass", "task": "adapter", "kind": "classify", "title": "adrenal mass", "classes": ["normal", "mass"]},
    ]
    registry = environment.read_registry(ROOT / "Resources" / "models.json")["models"]
    segment_ids = [model_id for _label, model_id in results.segment_model_choices(registry, adapters)]
    assert "left-atrium" in segment_ids and "adrenal-mass" not in segment_ids
    assert results.classifier_choices(adapters) == [("adrenal mass (normal / mass)", "adrenal-mass")]
    demo = environment.registry_entry({"models": registry}, DEMO)
    assert results.segment_names(demo) == ["anterior hippocampus", "posterior hippocampus"]
    assert results.segment_names(adapters[0]) == ["left atrium"] and results.segment_names(None) == []


def test_region_is_the_union_of_the_visible_segments():
    a = np.zeros((4, 5, 6), bool)
    a[1, 1:3, 1:3] = True
    b = np.zeros((4, 5, 6), bool)
    b[2, 2:4, 2:5] = True
    region = results.region_labels([_painted_segment("1", "liver", a), _painted_segment("2", "lesion", b),
                                    _painted_segment("3", "empty", np.zeros((4, 5, 6), bool))])
    assert region.labels.dtype == np.uint8 and set(np.unique(region.labels)) == {0, 1}
    assert np.array_equal(region.labels > 0, a | b) and region.skipped == ["empty"]
    with pytest.raises(ValueError, match="empty"):
        results.region_labels([_painted_segment("3", "empty", np.zeros((4, 5, 6), bool))])


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "Med3DFM.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_extension_metadata():
    catalog = json.loads((ROOT / "Med3DFM.json").read_text(encoding="utf-8"))
    assert catalog["category"] == "Segmentation"  # build_dependencies: test_dependencies.py (agrees with EXTENSION_DEPENDS)
    assert catalog["scm_url"].startswith("https://") and catalog["scm_revision"] and catalog["$schema"].endswith("catalog-entry-schema-v1.0.1.json#")
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for text in ('EXTENSION_CATEGORY "Segmentation"', 'EXTENSION_CONTRIBUTORS "Med3DFM team"', "find_package(Slicer REQUIRED)",
                 "include(${Slicer_USE_FILE})", "add_subdirectory(Med3DFM)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert text in cmake
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in ("Resources/UI/${MODULE_NAME}.ui", "Resources/Icons/${MODULE_NAME}.png", "Resources/models.json", "Resources/models.schema.json",
                 "Resources/requirements.txt", "Med3DFMSupport/jobs.py"):
        assert path in module_cmake
    for helper in _helper_files():
        assert f"{helper.parent.name}/{helper.name}" in module_cmake


# --- the Logic on the stand-in: node -> file -> real job -> nodes ---------------------------------------

@pytest.fixture(scope="module")
def module():
    import slicer_standin

    slicer_standin.install()
    sys.modules.pop("Med3DFM", None)
    return importlib.import_module("Med3DFM")


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_logic_segments_a_volume_node(module, hippocampus_case):
    import slicer_standin

    slicer = slicer_standin.slicer
    image_path, labels_path = hippocampus_case
    volume = slicer.util.loadVolume(str(image_path))
    sh = slicer.mrmlScene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreatePatientItem(sh.GetSceneItemID(), "patient"), "study")
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    existing = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kept")

    logic = module.Med3DFMLogic()
    job_folders_before = set(Path(slicer.app.temporaryPath).iterdir())
    outputs = logic.segment(volume, DEMO, device="cpu", show3D=True, timeout=300)
    segmentation_node, table_node = outputs  # unpacks as it always did; the report rides along

    # names, colours and terminology survive the .seg.nrrd -> node path exactly as the registry says
    entry = environment.registry_entry(environment.read_registry(ROOT / "Resources" / "models.json"), DEMO)
    expected = results.segment_display_info(entry)
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(expected)
    for index, info in enumerate(expected):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == info.name
        assert segment.GetColor() == pytest.approx(info.color, abs=1e-6)
        assert segment.GetTerminology() == info.terminology  # read from the file, not set by the Logic
        assert segment.closed_surface is not None and segment.closed_surface.GetNumberOfPoints() > 0

    # geometry: reference = the input volume; the result matches the manual labels in physical space
    assert np.allclose(segmentation_node.reference_geometry, slicer_standin._matrix_to_numpy(volume._ijk_to_ras))
    reference = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labels_path)))
    for info in expected:
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segmentation.GetSegmentIdBySegmentName(info.name), volume) > 0
        assert mask.shape == reference.shape
        assert _dice(mask, reference == info.value) > 0.7, info.name

    # table: one row per segment, with model id and version
    table = table_node.GetTable()
    assert table_node.GetNumberOfRows() == 2
    columns = [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())]
    assert columns[:3] == ["model", "model version", "segment"] and "volume_ml" in columns
    assert table.GetColumnByName("model").GetValue(0) == DEMO
    assert table.GetColumnByName("model version").GetValue(0) == entry["version"]
    assert table.GetColumnByName("volume_ml").GetValue(0) > 0.5

    # provenance on every output; outputs in the input's study; nothing else touched; temp files gone
    for node in (segmentation_node, table_node):
        record = json.loads(node.GetAttribute(results.PROVENANCE_ATTRIBUTE))
        assert record["model"]["id"] == DEMO and record["model"]["sha256"] == entry["files"][0]["sha256"]
        assert node.GetAttribute(results.MODEL_ATTRIBUTE) == f"{DEMO}@{entry['version']}"
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert existing.GetSegmentation().GetNumberOfSegments() == 0 and existing in slicer.mrmlScene.nodes
    assert (outputs.report.replaced, outputs.report.added, outputs.report.kept) == ([], [info.name for info in expected], [])
    assert segmentation_node.GetName() == f"{volume.GetName()} {DEMO}"
    assert set(Path(slicer.app.temporaryPath).iterdir()) == job_folders_before
    assert logic.lastJob["returncode"] == 0


def _segment_table(segmentation):
    """(id, name, colour, terminology) of every segment, in order."""
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName(), tuple(segmentation.GetNthSegment(i).GetColor()),
             segmentation.GetNthSegment(i).GetTerminology()) for i in range(segmentation.GetNumberOfSegments())]


def test_logic_keeps_the_users_segments_in_the_chosen_output_node(module, hippocampus_case):
    """Segment into a node the user chose: only the model's segments are replaced (same name, and the same
    terminology codes where both have them) or added; a painted segment keeps its ID, name, colour and
    voxels, also where the result overlaps it; running again replaces the result instead of duplicating it."""
    import slicer_standin

    slicer = slicer_standin.slicer
    image_path, labels_path = hippocampus_case
    volume = slicer.util.loadVolume(str(image_path))
    manual = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labels_path)))
    ijk_to_ras = slicer_standin._matrix_to_numpy(volume._ijk_to_ras)
    anterior, posterior = results.segment_display_info(environment.registry_entry(environment.read_registry(ROOT / "Resources" / "models.json"), DEMO))

    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
    chosen.CreateDefaultDisplayNodes()
    segmentation = chosen.GetSegmentation()
    z = np.nonzero(manual.any(axis=(1, 2)))[0]
    lesion = np.zeros(manual.shape, np.uint8)
    lesion[z[len(z) // 2]] = manual[z[len(z) // 2]] > 0  # painted on one slice, right where the model will segment
    segmentation.AddSegment(slicer_standin.Segment("my lesion", (0.1, 0.9, 0.3), lesion, ijk_to_ras), "Segment_1")
    chosen.GetDisplayNode().SetSegmentVisibility("Segment_1", False)
    stale = np.zeros(manual.shape, np.uint8)
    stale[:3, :3, :3] = 1
    previous = slicer_standin.Segment("Anterior Hippocampus", (1, 0, 0), stale, ijk_to_ras)  # an earlier result: other case, other context
    older = anterior.terminology.split("~")
    older[0], older[2] = "an older context", older[2].rsplit("^", 1)[0] + "^Hippocampal structure"
    previous.SetTag("TerminologyEntry", "~".join(older))
    assert previous.GetTerminology() != anterior.terminology  # the same codes, written differently
    segmentation.AddSegment(previous, "previous result")
    namesake = slicer_standin.Segment("posterior hippocampus", (0, 0, 1), lesion, ijk_to_ras)  # same name, another structure
    namesake.SetTag("TerminologyEntry", terminology.terminology_string({"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                                                                    "type": ["SCT", "108369006", "Tumor"]}))
    segmentation.AddSegment(namesake, "posterior_hippocampus_2")  # the ID of the result's segment in its .seg.nrrd
    user_before = {sid: row for sid, *row in _segment_table(segmentation) if sid != "previous result"}
    kept_objects = [segmentation.GetSegment("Segment_1"), segmentation.GetSegment("posterior_hippocampus_2")]

    logic = module.Med3DFMLogic()
    nodes_before = len(slicer.mrmlScene.nodes)
    outputs = logic.segment(volume, DEMO, device="cpu", outputSegmentationNode=chosen, timeout=300)
    segmentation_node, _table = outputs
    assert segmentation_node is chosen and chosen.GetName() == "chosen"
    assert len(slicer.mrmlScene.nodes) == nodes_before + 1  # the table; the loaded copy was removed

    # the report: what was replaced, what was added, what was left alone
    report = outputs.report
    assert (report.replaced, report.added, report.kept) == (["anterior hippocampus"], ["posterior hippocampus"], ["my lesion", "posterior hippocampus"])
    assert report.segment_ids == ["previous result", "posterior_hippocampus_2_1"]
    assert report.summary() == "replaced anterior hippocampus; added posterior hippocampus; kept 2 other segments"

    # the user's segments: same objects, IDs, names, colours, terminology, voxels, visibility
    table = _segment_table(segmentation)
    assert [row[0] for row in table] == ["Segment_1", "previous result", "posterior_hippocampus_2", "posterior_hippocampus_2_1"]
    assert {sid: row for sid, *row in table if sid in user_before} == user_before
    assert [segmentation.GetSegment(sid) for sid in ("Segment_1", "posterior_hippocampus_2")] == kept_objects
    for segment_id in user_before:
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(chosen, segment_id, volume), lesion), segment_id
    assert not chosen.GetDisplayNode().GetSegmentVisibility("Segment_1")

    # the earlier result is replaced in place: its ID and place, the model's voxels, name, colour and terminology
    replaced = segmentation.GetSegment("previous result")
    assert (replaced.GetName(), replaced.GetTerminology()) == (anterior.name, anterior.terminology)
    assert replaced.GetColor() == pytest.approx(anterior.color, abs=1e-6)
    masks = {sid: slicer.util.arrayFromSegmentBinaryLabelmap(chosen, sid, volume) > 0 for sid in report.segment_ids}
    assert not masks["previous result"][:3, :3, :3].any()
    assert _dice(masks["previous result"], manual == anterior.value) > 0.7
    added = segmentation.GetSegment("posterior_hippocampus_2_1")
    assert (added.GetName(), added.GetTerminology()) == (posterior.name, posterior.terminology)
    assert _dice(masks["posterior_hippocampus_2_1"], manual == posterior.value) > 0.7
    # segments may overlap (Slicer's multi-layer default): the painted voxels under the result stay painted
    assert np.count_nonzero(lesion & (masks["previous result"] | masks["posterior_hippocampus_2_1"])) > 0

    # running the model again replaces its own segments; nothing is duplicated, the user's segments stay
    again = logic.segment(volume, DEMO, device="cpu", outputSegmentationNode=chosen, timeout=300).report
    assert (again.replaced, again.added, again.kept) == (["anterior hippocampus", "posterior hippocampus"], [], ["my lesion", "posterior hippocampus"])
    assert again.segment_ids == report.segment_ids
    assert [row[0] for row in _segment_table(segmentation)] == [row[0] for row in table]
    for segment_id, mask in masks.items():
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(chosen, segment_id, volume) > 0, mask), segment_id
    for segment_id in user_before:
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(chosen, segment_id, volume), lesion), segment_id
    assert {sid: row for sid, *row in _segment_table(segmentation) if sid in user_before} == user_before


def test_logic_shows_confidence_and_flags_the_segments_to_check(module, hippocampus_case):
    """Segment with the confidence overlay: a volume on the input grid drawn with the module's own colour
    table, only the voxels below the flag threshold shown; the panel's line names the segments that hold
    them, and a new threshold redraws and recounts without running the model again."""
    import slicer_standin

    from Med3DFMLib.confidence import DEFAULT_THRESHOLD

    slicer = slicer_standin.slicer
    from Med3DFMSupport import choices

    assert choices.CONFIDENCE_FLAG_BELOW == DEFAULT_THRESHOLD  # the panel and the library flag the same voxels
    volume = slicer.util.loadVolume(str(hippocampus_case[0]))
    logic = module.Med3DFMLogic()
    outputs = logic.segment(volume, DEMO, device="cpu", timeout=300, confidence=True)
    node = outputs.confidence_node
    assert node is not None and node.GetName() == f"{volume.GetName()} {DEMO} confidence"
    assert slicer.util.arrayFromVolume(node).shape == slicer.util.arrayFromVolume(volume).shape
    display = node.GetDisplayNode()
    colors = slicer.mrmlScene.GetFirstNodeByName("Med3DFM confidence")
    assert display.GetColorNodeID() == colors.GetID() and colors.GetNumberOfColors() == 256
    assert display.window_level_min_max == (0.0, 1.0) and display.threshold == (0.0, DEFAULT_THRESHOLD) and display.apply_threshold
    assert slicer_standin.SLICE_LAYERS["foreground"] is node and slicer_standin.SLICE_LAYERS["background"] is volume
    assert json.loads(node.GetAttribute(results.PROVENANCE_ATTRIBUTE))["outputs"]["confidence"]
    assert outputs.flags.startswith(f"below confidence {DEFAULT_THRESHOLD:g}: ") and "hippocampus" in outputs.flags

    def flagged_ml(line):
        return sum(float(part.split(" mL")[0].rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split("), "))

    stricter = logic.flagLowConfidence(node, 0.95)
    assert display.threshold == (0.0, 0.95)
    assert flagged_ml(stricter) > flagged_ml(outputs.flags)  # more voxels fall below a higher threshold
    with pytest.raises(module.Med3DFMJobError, match="confidence overlay"):
        logic.flagLowConfidence(volume, 0.9)
    plain = logic.segment(volume, DEMO, device="cpu", timeout=300)
    assert plain.confidence_node is None and plain.flags == ""


def test_copy_diagnostics_includes_the_devices_the_job_interpreter_sees(module):
    """Driver, CUDA and torch build come from the job interpreter (where torch runs), not from a guess."""
    import torch

    text = module.Med3DFMLogic().diagnostics()
    section = text.split("Devices (med3dfm devices, in the job interpreter)", 1)[1]
    assert f"torch {torch.__version__}" in section and "NVIDIA driver:" in section and "--device auto runs on:" in section


def test_a_restricted_licence_is_asked_about_once_in_the_panel(module, monkeypatch):
    """The panel asks before the first Segment with a model whose licence restricts use, and the answer
    is the one the job's command line reads (MED3DFM_HOME/licences.json)."""
    from Med3DFMLib.registry import licences

    logic = module.Med3DFMLogic()
    assert logic.licenceQuestion(DEMO) is None  # CC-BY-SA: nothing to acknowledge
    restricted = {"id": "nc-model", "title": "NC model", "licence": "CC-BY-NC-4.0"}
    monkeypatch.setattr(logic, "licenceCards", lambda model_id, encoder=False: [restricted])
    question = logic.licenceQuestion("nc-model")
    assert "CC-BY-NC-4.0" in question and "non-commercial use only" in question
    assert not logic.acknowledgeLicence("nc-model", False) and logic.licenceQuestion("nc-model")
    assert logic.acknowledgeLicence("nc-model", True)
    assert logic.licenceQuestion("nc-model") is None and licences.is_acknowledged(restricted)
    assert json.loads((licences.models_home() / licences.FILE).read_text())["nc-model"]["by"] == "Slicer panel"


def test_logic_reports_a_failed_job(module, hippocampus_case):
    import slicer_standin

    slicer = slicer_standin.slicer
    volume = slicer.util.loadVolume(str(hippocampus_case[0]))
    with pytest.raises(module.Med3DFMJobError) as failure:
        module.Med3DFMLogic().segment(volume, "no-such-model", device="cpu", timeout=120)
    assert "no-such-model" in str(failure.value) and "\n" not in str(failure.value)
    assert "error" in failure.value.details


def _transform(slicer, rotation_and_shift):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row, values in enumerate(rotation_and_shift):
        for column, value in enumerate(values):
            matrix.SetElement(row, column, value)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetMatrixTransformToParent(matrix)
    return node


def test_logic_results_follow_the_volumes_transform(module, hippocampus_case):
    """A volume under a parent transform (not hardened): the job sees its local frame, and the segmentation
    and the heatmap are placed under the same transform, so they line up with the volume in the views."""
    import slicer_standin

    slicer = slicer_standin.slicer
    image_path, labels_path = hippocampus_case
    volume = slicer.util.loadVolume(str(image_path))
    transform = _transform(slicer, ((0.0, -1.0, 0.0, 40.0), (1.0, 0.0, 0.0, -25.0), (0.0, 0.0, 1.0, 60.0)))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    logic = module.Med3DFMLogic()
    segmentation_node, _table = logic.segment(volume, DEMO, device="cpu", timeout=300)
    assert segmentation_node.GetTransformNodeID() == transform.GetID()
    reference = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labels_path)))
    segmentation = segmentation_node.GetSegmentation()
    for value, name in enumerate(("anterior hippocampus", "posterior hippocampus"), start=1):
        # resampled through both nodes' transforms (world space), as Slicer does
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segmentation.GetSegmentIdBySegmentName(name), volume) > 0
        assert _dice(mask, reference == value) > 0.7, name
    # into a segmentation the user chose (not under any transform): merged in world space, still aligned
    chosen = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    chosen.GetSegmentation().AddEmptySegment("anterior hippocampus", "anterior hippocampus")
    outputs = logic.segment(volume, DEMO, device="cpu", outputSegmentationNode=chosen, timeout=300)
    assert outputs.report.replaced == ["anterior hippocampus"]
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(chosen, "anterior hippocampus", volume) > 0
    assert _dice(mask, reference == 1) > 0.7
    heatmap = logic.explain(volume, DEMO, "anterior hippocampus", "gradcam", device="cpu", timeout=300)
    assert heatmap.GetTransformNodeID() == transform.GetID()


def test_logic_refuses_a_volume_outside_the_models_domain(module, data_dir):
    """A CT from DICOM (its Subject Hierarchy item says CT): the MR demo model is marked as not fitting and
    Segment is refused with the one-line reason before any job or file exists."""
    import slicer_standin

    slicer = slicer_standin.slicer
    volume = slicer.util.loadVolume(str(data_dir / "totalseg" / "example_ct_sm.nii.gz"))
    sh = slicer.mrmlScene.GetSubjectHierarchyNode()
    sh.SetItemAttribute(sh.GetItemByDataNode(volume), slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(), "CT")
    logic = module.Med3DFMLogic()
    marked = {m.model_id: m for m in logic.modelFits(volume)}
    assert marked[DEMO].fits is False and marked[DEMO].label.startswith("\u2717 ")
    assert "the scan is CT (by its DICOM Modality tag)" in marked[DEMO].reason
    folders_before = set(Path(slicer.app.temporaryPath).iterdir())
    segmentations_before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(module.Med3DFMJobError) as refused:
        logic.segment(volume, DEMO, device="cpu", timeout=60)
    message = str(refused.value)
    assert message.startswith(f"{DEMO} does not fit this volume: the scan is CT") and "Learn from labels" in message and "\n" not in message
    assert set(Path(slicer.app.temporaryPath).iterdir()) == folders_before
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations_before
    hippocampus = slicer.util.loadVolume(str(data_dir / "hippocampus" / "images" / "hippocampus_014.nii.gz"))
    assert {m.model_id: m for m in logic.modelFits(hippocampus)}[DEMO].fits is True


def test_logic_lists_models_through_the_cli(module):
    listing = module.Med3DFMLogic().listModels()
    demo = next(m for m in listing if m["id"] == DEMO)
    assert demo["installed"] in ("bundled", "bundled+cache") and demo["licence"]
    assert results.model_rows(listing, task="segment")[0].installed


def test_logic_learns_from_three_painted_slices(module, hippocampus_case):
    """Learn from labels end to end: painted node -> .seg.nrrd -> real `adapt` job -> the same node, saved model."""
    import slicer_standin

    slicer = slicer_standin.slicer
    image_path, labels_path = hippocampus_case
    volume = slicer.util.loadVolume(str(image_path))
    full = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labels_path)))
    z = np.nonzero(full.any(axis=(1, 2)))[0]
    slices = sorted({int(v) for v in np.percentile(z, (20, 50, 80)).astype(int)})
    ijk_to_ras = slicer_standin._matrix_to_numpy(volume._ijk_to_ras)

    painted = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    painted.CreateDefaultDisplayNodes()
    names = {1: "anterior hippocampus", 2: "posterior hippocampus"}
    for value, name in names.items():
        mask = np.zeros(full.shape, np.uint8)
        mask[slices] = full[slices] == value
        painted.GetSegmentation().AddSegment(slicer_standin.Segment(name, (0.2 * value, 0.5, 0.3), mask, ijk_to_ras), f"Segment_{value}")
    background = np.zeros(full.shape, np.uint8)
    background[slices[0], :3, :3] = 1  # explicit negatives in a corner
    painted.GetSegmentation().AddSegment(slicer_standin.Segment("background", (0, 0, 0), background, ijk_to_ras), "bg")
    kept = np.zeros(full.shape, np.uint8)
    kept[:, -5:, -5:] = 1  # a finished structure from earlier: hidden, so neither learned nor changed
    painted.GetSegmentation().AddSegment(slicer_standin.Segment("kept", (1, 1, 0), kept, ijk_to_ras), "kept")
    painted.GetDisplayNode().SetSegmentVisibility("kept", False)

    logic = module.Med3DFMLogic()
    temporary_before = set(Path(slicer.app.temporaryPath).iterdir())
    adapter = logic.learnFromLabels(volume, painted, "hippocampus parts", mode="adapter", device="cpu", save=True, timeout=600)

    # the adapter is saved in the model folder under its name, the learned copy and its record are kept
    assert adapter.is_file() and adapter.name == "hippocampus-parts.safetensors"
    assert logic.modelsFolder() in adapter.parents
    kept_copy = logic.adaptersFolder() / "hippocampus-parts.safetensors"
    assert kept_copy.is_file() and (logic.adaptersFolder() / "hippocampus-parts.json").is_file()
    assert set(Path(slicer.app.temporaryPath).iterdir()) - temporary_before <= {logic.adaptersFolder()}  # job folder removed
    assert ("hippocampus parts (learned: hippocampus-parts)", "hippocampus-parts") in logic.segmentModelChoices()

    # provenance: the adapt job record on the painted node
    record = json.loads(painted.GetAttribute(results.PROVENANCE_ATTRIBUTE))
    assert record["command"] == "adapt" and record["adapter"]["classes"] == list(names.values())
    assert record["parameters"]["name"] == "hippocampus parts" and record["outputs"]["segmentation"].endswith(".seg.nrrd")
    assert painted.GetAttribute(results.MODEL_ATTRIBUTE) == "hippocampus-parts"
    assert painted.GetAttribute(results.ADAPTER_ATTRIBUTE) == str(kept_copy)

    # the same node, the same segments; the painted structures now cover the whole volume
    segmentation = painted.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == ["Segment_1", "Segment_2", "bg", "kept"]
    unpainted = [k for k in range(full.shape[0]) if k not in slices]
    for value, name in names.items():
        segment_id = f"Segment_{value}"
        assert segmentation.GetSegment(segment_id).GetName() == name
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(painted, segment_id, volume) > 0
        assert mask.shape == full.shape
        assert np.count_nonzero(mask.any(axis=(1, 2))) > len(slices), name
        dice = _dice(mask[unpainted], full[unpainted] == value)
        print(f"{name}: Dice {dice:.3f} on the {len(unpainted)} unpainted slices")
        assert dice > 0.35, (name, dice)  # measured about 0.57 / 0.68 with the CLI
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(painted, "bg", volume), background)
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(painted, "kept", volume), kept)
    assert not painted.GetDisplayNode().GetSegmentVisibility("kept")

    # the saved adapter segments the volume through the Segment path
    segmented, _table = logic.segment(volume, "hippocampus-parts", device="cpu", timeout=300)
    result_names = [segmented.GetSegmentation().GetNthSegment(i).GetName() for i in range(segmented.GetSegmentation().GetNumberOfSegments())]
    assert result_names == list(names.values())

    # corrections + learning again (instant guess): features come from the cache, the saved model is replaced
    first_sha = record["adapter"]["sha256"]
    again = logic.learnFromLabels(volume, painted, "hippocampus parts", mode="prototype", device="cpu", save=True, timeout=600)
    record = json.loads(painted.GetAttribute(results.PROVENANCE_ATTRIBUTE))
    assert again == adapter and record["feature_cache_hits"] == 1 and record["training"]["mode"] == "prototype"
    assert record["adapter"]["sha256"] != first_sha
    from Med3DFMLib.weights import sha256_of

    assert sha256_of(again) == record["adapter"]["sha256"]
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(painted, "kept", volume), kept)


def test_logic_refuses_unusable_learning_requests(module, hippocampus_case):
    import slicer_standin

    slicer = slicer_standin.slicer
    volume = slicer.util.loadVolume(str(hippocampus_case[0]))
    shape = slicer.util.arrayFromVolume(volume).shape
    ijk_to_ras = slicer_standin._matrix_to_numpy(volume._ijk_to_ras)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "only background")
    mask = np.zeros(shape, np.uint8)
    mask[10, :4, :4] = 1
    node.GetSegmentation().AddSegment(slicer_standin.Segment("Background", (0, 0, 0), mask, ijk_to_ras), "bg")
    node.GetSegmentation().AddSegment(slicer_standin.Segment("structure", (1, 0, 0), np.zeros(shape, np.uint8), ijk_to_ras), "s")
    logic = module.Med3DFMLogic()
    before = set(Path(slicer.app.temporaryPath).iterdir())
    with pytest.raises(module.Med3DFMJobError, match="no structure is painted"):
        logic.learnFromLabels(volume, node, "x", device="cpu", timeout=60)
    with pytest.raises(module.Med3DFMJobError, match="built-in model"):
        logic.learnFromLabels(volume, node, "Hippocampus MR demo", device="cpu", timeout=60)
    with pytest.raises(module.Med3DFMJobError, match="name"):
        logic.learnFromLabels(volume, node, "  ", device="cpu", timeout=60)
    with pytest.raises(module.Med3DFMJobError, match="no segment with id"):
        logic.learnFromLabels(volume, node, "x", device="cpu", segmentIds=["missing"], timeout=60)
    assert set(Path(slicer.app.temporaryPath).iterdir()) == before  # no job folder left behind


def _labelled_volume(slicer_standin, image_path, labels_path, names=("anterior hippocampus", "posterior hippocampus")):
    """A volume node and a segmentation node holding its whole-volume labels, one segment per structure."""
    slicer = slicer_standin.slicer
    volume = slicer.util.loadVolume(str(image_path))
    full = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labels_path)))
    ijk_to_ras = slicer_standin._matrix_to_numpy(volume._ijk_to_ras)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} labels")
    segmentation.CreateDefaultDisplayNodes()
    for value, name in enumerate(names, start=1):
        segmentation.GetSegmentation().AddSegment(slicer_standin.Segment(name, (0.3 * value, 0.5, 0.2), (full == value).astype(np.uint8), ijk_to_ras), f"Segment_{value}")
    return volume, segmentation


@pytest.fixture()
def other_patients():
    import slicer_standin

    folder = ROOT / "Testing" / "Data" / "hippocampus"
    return [_labelled_volume(slicer_standin, folder / "images" / f"hippocampus_{case}.nii.gz", folder / "labels" / f"hippocampus_{case}.nii.gz")
            for case in ("024", "035")]


def test_logic_builds_the_other_patients_command(module, other_patients, tmp_path):
    """Each labelled volume and its segmentation become an --image/--labels pair of `adapt --mode decoder --dense`."""
    import slicer_standin
    from Med3DFMLib.cli import build_parser
    import SimpleITK as sitk
    from Med3DFMLib.io.segmentations import read_labels

    slicer = slicer_standin.slicer
    logic = module.Med3DFMLogic()
    command, context = logic.buildOtherPatientsCommand(tmp_path, other_patients, " hippocampus parts ", 4.5, "cpu")
    args = build_parser().parse_args(command[3:])
    assert args.image == [tmp_path / "image-1.nrrd", tmp_path / "image-2.nrrd"]
    assert args.labels == [tmp_path / "labels-1.seg.nrrd", tmp_path / "labels-2.seg.nrrd"]
    assert (args.mode, args.dense, args.budget_minutes, args.name, args.device) == ("decoder", True, 4.5, "hippocampus parts", "cpu")
    assert args.output == tmp_path / "hippocampus-parts.safetensors" and args.segment is None
    assert context["structures"] == ["anterior hippocampus", "posterior hippocampus"] and context["volumes"] == 2
    assert context["stopFile"] == Path(str(args.output) + ".stop")
    for (volume, _segmentation), image, labels in zip(other_patients, args.image, args.labels):
        assert image.is_file() and labels.is_file()
        written = read_labels(labels)
        assert [s.name for s in written.segments] == ["anterior hippocampus", "posterior hippocampus"]
        truth = slicer.util.arrayFromSegmentBinaryLabelmap(_segmentation, "Segment_2", volume) > 0
        assert np.array_equal(sitk.GetArrayFromImage(written.image) == 2, truth)  # whole-volume labels, on the volume's grid
    # the same structure names in every labelled volume, or a readable refusal before any job starts
    renamed_volume, renamed = other_patients[1]
    renamed.GetSegmentation().GetSegment("Segment_2").SetName("tail")
    before = set(Path(slicer.app.temporaryPath).iterdir())
    with pytest.raises(module.Med3DFMJobError, match="same structures"):
        logic.startLearnFromOtherPatients(other_patients, "hippocampus parts", 0.2, "cpu")
    with pytest.raises(ValueError, match="at least one labelled volume"):
        logic.startLearnFromOtherPatients([], "hippocampus parts", 0.2, "cpu")
    with pytest.raises(module.Med3DFMJobError, match="built-in model"):
        logic.startLearnFromOtherPatients(other_patients, "Hippocampus MR demo", 0.2, "cpu")
    assert set(Path(slicer.app.temporaryPath).iterdir()) == before


def test_logic_learns_from_other_patients_within_the_budget(module, other_patients, hippocampus_case):
    """A real short run (--budget-minutes 0.2) on two labelled volumes: the adapter, its record, the status
    text; saved as a model it segments a third patient through the Segment path."""
    import slicer_standin

    slicer = slicer_standin.slicer
    logic = module.Med3DFMLogic()
    job = logic.startLearnFromOtherPatients(other_patients, "hippocampus others", 0.2, "cpu")
    stages = []
    try:
        job.wait(timeout=600, on_event=lambda e: stages.append(e.stage))
        learned = logic.finishLearnFromOtherPatients(job)
    finally:
        job.cleanup()
    assert "prepare" in stages and stages[-1] == "done"  # "train" lines come every 5 steps: maybe none in 12 s on a busy CPU
    adapter, record = learned["adapter"], learned["record"]
    assert adapter.is_file() and adapter == logic.adaptersFolder() / "hippocampus-others.safetensors"
    assert record["parameters"]["mode"] == "decoder" and record["parameters"]["dense"] and len(record["parameters"]["images"]) == 2
    assert record["adapter"]["classes"] == ["anterior hippocampus", "posterior hippocampus"]
    assert record["training"]["stopped_by"] == "budget" and record["training"]["steps"] > 0 and not learned["stoppedEarly"]
    summary = results.training_summary(record)
    assert summary.startswith("2 structure(s), decoder, ") and "steps" in summary and "stopped early" not in summary
    status = logic.otherPatientsStatus(learned)
    print("status:", status)
    assert status.startswith(f"Done: {summary}.") and "Save as model" in status and "'hippocampus-others'" in status
    assert "Stopped early" not in status

    # "Save as model", then the Segment section: the new model segments another patient
    saved = logic.saveAdapter(adapter)
    assert saved.is_file() and ("hippocampus others (learned: hippocampus-others)", "hippocampus-others") in logic.segmentModelChoices()
    volume = slicer.util.loadVolume(str(hippocampus_case[0]))
    segmented, _table = logic.segment(volume, "hippocampus-others", device="cpu", timeout=300)
    segmentation = segmented.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == record["adapter"]["classes"]


def test_logic_cancel_keeps_the_best_model_so_far(module, other_patients):
    """Cancel of an other-patients job: the stop file ends a 30-minute budget early; the adapter is written."""
    from Med3DFMLib.weights import read_weights

    logic = module.Med3DFMLogic()
    job = logic.startLearnFromOtherPatients(other_patients, "hippocampus stopped", 30, "cpu")
    try:
        assert job.can_stop_early and job.stop_file == Path(str(job.context["adapter"]) + ".stop")
        deadline = time.monotonic() + 600
        while not any(e.stage == "train" for e in job.poll()):
            assert job.running and time.monotonic() < deadline, job.stderr
            time.sleep(0.2)
        started = time.monotonic()
        assert job.stop_or_cancel() is True and job.stopping
        job.wait(timeout=120)
        assert time.monotonic() - started < jobs.STOP_GRACE_S
        learned = logic.finishLearnFromOtherPatients(job)
    finally:
        job.cleanup()
    assert not job.cancelled and learned["stoppedEarly"]
    _tensors, card = read_weights(learned["adapter"])
    assert card["training"]["summary"]["stopped_by"] == "user" and card["architecture"]["type"] == "feature-decoder"
    assert "stopped early (best model so far)" in results.training_summary(learned["record"])
    assert "Stopped early: the best model so far was kept." in logic.otherPatientsStatus(learned)


# --- Classify and Explain on the stand-in: node -> file -> real job -> table and heatmap overlay ----------

ADRENAL = ROOT / "Testing" / "Data" / "adrenal" / "adrenalmnist3d_64_trainval_subset.npz"  # the first scans of each class, as in test_classify.py


def _write_scan(array, path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path), True)
    return path


def _assert_heatmap_overlay(slicer_standin, heatmap_node, volume, module):
    """A [0, 1] volume on the input's grid, shown over the input with the heatmap colours, no temp file."""
    heat = slicer_standin.arrayFromVolume(heatmap_node)
    assert heat.shape == slicer_standin.arrayFromVolume(volume).shape
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(slicer_standin._matrix_to_numpy(heatmap_node._ijk_to_ras), slicer_standin._matrix_to_numpy(volume._ijk_to_ras))
    display = heatmap_node.GetDisplayNode()
    assert display.GetColorNodeID() == module.HEATMAP_COLOR_NODE_ID and display.window_level_min_max == (0.0, 1.0)
    assert display.apply_threshold and display.threshold == (module.HEATMAP_LOWER_THRESHOLD, 1.0) and not display.auto_window_level
    assert slicer_standin.SLICE_LAYERS == {"background": volume, "foreground": heatmap_node, "foregroundOpacity": module.HEATMAP_OPACITY}
    assert heatmap_node.GetStorageNode() is None  # the job folder it was read from is gone
    return heat


def test_logic_classifies_a_volume_inside_a_region_with_a_heatmap(module, tmp_path):
    """Classify end to end: a classifier trained on real AdrenalMNIST3D scans, imported as a model, applied to
    a held-out scan node inside a painted region; the table and heatmap match the library run on the same files."""
    import slicer_standin
    from Med3DFMLib.classify.data import ListRow
    from Med3DFMLib.classify.job import run_adapt_classify, run_classify

    slicer = slicer_standin.slicer
    archive = np.load(ADRENAL)
    x, y = archive["train_images"], archive["train_labels"].ravel()
    rows = [ListRow(f"row {i}", _write_scan(x[i], tmp_path / f"train_{i}.nii.gz"), "mass" if y[i] else "normal")
            for cls in (0, 1) for i in np.nonzero(y == cls)[0][:4]]
    trained = tmp_path / "adrenal-mass.safetensors"
    run_adapt_classify(rows, "adrenal mass", trained, max_steps=20)
    logic = module.Med3DFMLogic()
    logic.saveAdapter(trained)
    assert ("adrenal mass (normal / mass)", "adrenal-mass") in logic.classifierChoices()
    assert "adrenal-mass" not in [model_id for _label, model_id in logic.segmentModelChoices()]

    scan = _write_scan(archive["val_images"][0], tmp_path / "val_0.nii.gz")
    volume = slicer.util.loadVolume(str(scan))
    ijk_to_ras = slicer_standin._matrix_to_numpy(volume._ijk_to_ras)
    box = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    box[16:48, 16:48, 16:48] = 1  # the middle of the 64³ crop, where the adrenal gland sits
    region = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "region")
    region.CreateDefaultDisplayNodes()
    region.GetSegmentation().AddSegment(slicer_standin.Segment("gland", (1, 1, 0), box, ijk_to_ras), "gland")
    hidden = np.zeros_like(box)
    hidden[:4, :4, :4] = 1
    region.GetSegmentation().AddSegment(slicer_standin.Segment("hidden", (0, 1, 0), hidden, ijk_to_ras), "hidden")
    region.GetDisplayNode().SetSegmentVisibility("hidden", False)

    temporary_before = set(Path(slicer.app.temporaryPath).iterdir())
    classified = logic.classify(volume, "adrenal-mass", roiSegmentationNode=region, heatmapMethod="gradcam", device="cpu", timeout=300)

    # the same probabilities and heatmap as the library on the same scan and region
    _write_scan(box, tmp_path / "box.nii.gz")
    record, failed = run_classify([ListRow("scan", scan, roi=tmp_path / "box.nii.gz")], str(trained), tmp_path / "direct.tsv",
                                  tmp_path / "direct_heat.nrrd", "gradcam")
    assert failed == 0
    _comments, columns, direct = results.read_tsv(tmp_path / "direct.tsv")
    expected = [direct[0][columns.index(f"probability_{c}")] for c in ("normal", "mass")]
    result = classified["result"]
    assert result.classes == ["normal", "mass"] and result.probabilities == pytest.approx(expected, abs=1e-4)
    assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-4) and result.prediction == direct[0][1]
    assert not result.calibrated  # 4 examples per class: the card says so and so does the table

    table = classified["tableNode"].GetTable()
    assert classified["tableNode"].GetNumberOfRows() == 2
    assert [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())] == ["class", "probability", "predicted", "calibrated", "model", "model version"]
    assert table.GetColumnByName("probability").GetValue(1) == pytest.approx(expected[1], abs=1e-4)
    assert table.GetColumnByName("calibrated").GetValue(0) == "no" and table.GetColumnByName("model").GetValue(0) == "adrenal-mass"
    provenance = json.loads(classified["tableNode"].GetAttribute(results.PROVENANCE_ATTRIBUTE))
    assert provenance["command"] == "classify" and provenance["model"]["id"] == "adrenal-mass"

    # the Grad-CAM heatmap: the library's map of the same inputs (how a region restricts pooling is
    # tested in test_classify.py; the map's cells are 20 mm here, coarser than the region's edges)
    heat = _assert_heatmap_overlay(slicer_standin, classified["heatmapNode"], volume, module)
    assert json.loads(classified["heatmapNode"].GetAttribute(results.PROVENANCE_ATTRIBUTE))["method"] == "gradcam"
    import SimpleITK as sitk

    assert np.allclose(heat, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "direct_heat.nrrd"))), atol=1e-4)
    assert set(Path(slicer.app.temporaryPath).iterdir()) == temporary_before

    # an empty region is refused before any job starts
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    empty.CreateDefaultDisplayNodes()
    empty.GetSegmentation().AddSegment(slicer_standin.Segment("nothing", (1, 0, 0), np.zeros_like(box), ijk_to_ras), "nothing")
    with pytest.raises(module.Med3DFMJobError, match="empty"):
        logic.classify(volume, "adrenal-mass", roiSegmentationNode=empty, heatmapMethod=None, device="cpu", timeout=300)
    assert set(Path(slicer.app.temporaryPath).iterdir()) == temporary_before
    # a segmentation model is not a classifier: one readable message from the job
    with pytest.raises(module.Med3DFMJobError, match="classification"):
        logic.classify(volume, DEMO, heatmapMethod=None, device="cpu", timeout=300)


def test_logic_explains_a_segment_of_the_demo_model(module, hippocampus_case, tmp_path):
    """Explain end to end: the Grad-CAM map of the demo model's anterior hippocampus, as an overlay, equal to
    the library's map of the same file and brighter on the structure than elsewhere."""
    import slicer_standin
    from Med3DFMLib.explain.job import run_explain

    slicer = slicer_standin.slicer
    image_path, labels_path = hippocampus_case
    volume = slicer.util.loadVolume(str(image_path))
    logic = module.Med3DFMLogic()
    assert logic.explainTargets(DEMO) == ["anterior hippocampus", "posterior hippocampus"]
    heatmap_node = logic.explain(volume, DEMO, "anterior hippocampus", "gradcam", device="cpu", timeout=300)
    heat = _assert_heatmap_overlay(slicer_standin, heatmap_node, volume, module)
    note = json.loads(heatmap_node.GetAttribute(results.PROVENANCE_ATTRIBUTE))
    assert (note["method"], note["target"]) == ("gradcam", "anterior hippocampus")

    run_explain(image_path, DEMO, "anterior hippocampus", tmp_path / "direct.nrrd", "gradcam", device_name="cpu")
    import SimpleITK as sitk

    direct = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "direct.nrrd")))
    assert np.allclose(heat, direct, atol=1e-4)
    labels = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labels_path)))
    assert heat[labels == 1].mean() > 2 * heat[labels == 0].mean()
    with pytest.raises(module.Med3DFMJobError, match="unknown target"):
        logic.explain(volume, DEMO, "amygdala", "gradcam", device="cpu", timeout=300)


def test_the_slicer_self_test_runs(module):
    """The module's own ScriptedLoadableModuleTest (what Slicer's self-test button runs): registered sample
    with checksum, Segment + Dice, Learn from labels on 3 painted slices + Dice, Explain; all real jobs."""
    import slicer_standin

    test = module.Med3DFMTest()
    test.runTest()
    from Med3DFMSlicer.sample_data import SAMPLE_NAME

    sample = slicer_standin.sys.modules["SampleData"].SampleDataLogic.sources[SAMPLE_NAME]
    assert sample["checksums"].startswith("SHA256:") and sample["uris"].startswith("file:")


# --- the installer on the stand-in: consent, PyTorch extension, pip with Slicer's packages pinned, restart marker ---

class _InstallWorld:
    """What the installer sees of Slicer's Python: installed versions (by name), the distributions
    snapshot it compares before/after a step, which of them are imported; and what it asked and ran."""

    def __init__(self, installed, imports):
        self.installed = dict(installed)
        self.imports = imports
        self.answers = []  # replies to confirmOkCancelDisplay, in order
        self.asked, self.restart_offers, self.restarts = [], [], 0
        self.torch_calls, self.pip_calls = [], []
        self.bump_on_torch = {}  # distributions the PyTorch step changes (as light-the-torch may)
        self.fail_pip = False

    def distributions(self):
        return {dependencies.canonical_name(n): v for n, v in self.installed.items() if v is not None}

    def pip(self, kind, arguments, constraints):
        path = Path(constraints)
        self.pip_calls.append((kind, list(arguments), path, path.read_text(encoding="utf-8")))
        if self.fail_pip:
            import subprocess

            raise subprocess.CalledProcessError(1, ["pip", "install"])
        for requirement in arguments:
            if not requirement.startswith("-") and requirement != str(path):
                self.installed[dependencies.requirement_name(requirement)] = "1.5"


@pytest.fixture()
def install_world(module, monkeypatch):
    import types

    import slicer
    import slicer_standin

    world = _InstallWorld({"numpy": "2.4.6", "SimpleITK": "2.5.7", "requests": "2.34.2", "vtk": "9.7.2", "torch": None}, {})
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: False)
    settings = slicer_standin.Settings()
    monkeypatch.setattr(slicer.app, "settings", lambda: settings)
    world.settings = settings
    monkeypatch.setattr(dependencies, "installed_versions", lambda names: {n: world.installed.get(n) for n in names})
    monkeypatch.setattr(dependencies, "installed_distributions", world.distributions)
    monkeypatch.setattr(dependencies, "distribution_imports", lambda: world.imports)

    def confirm_ok_cancel(text, windowTitle=None, parent=None, **kwargs):
        world.asked.append(text)
        return world.answers.pop(0)

    def confirm_yes_no(text, windowTitle=None, parent=None, **kwargs):  # "Restart now?": no
        world.restart_offers.append((text, kwargs.get("detailedText")))
        return False

    def restart():
        world.restarts += 1

    def util_pip_install(arguments):  # Slicer <= 5.10: one list of pip arguments, the constraints file last
        assert isinstance(arguments, list) and arguments[-2] == "-c"
        world.pip("util.pip_install", arguments[:-2], arguments[-1])

    for name, function in (("confirmOkCancelDisplay", confirm_ok_cancel), ("confirmYesNoDisplay", confirm_yes_no), ("restart", restart),
                           ("pip_install", util_pip_install)):
        monkeypatch.setattr(slicer.util, name, function, raising=False)

    class PyTorchUtilsLogic:  # fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py: installTorch's signature
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None, torchvisionVersionRequirement=None):
            world.torch_calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement})
            world.installed["torch"] = "2.13.0+cu121"
            world.installed.update(world.bump_on_torch)
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True, requester=None,
                   skip_in_testing=True, show_progress=True):  # Slicer 5.12 Base/Python/slicer/packaging.py
        assert (skip_packages, prompt_install, prompt_restart, requester) == (None, False, False, "Med3DFM")
        world.pip("pip_ensure", requirements, constraints)

    def pip_install(requirements, constraints=None, no_deps_requirements=None, skip_packages=None, blocking=True, show_progress=True,
                    requester=None, logCallback=None, completedCallback=None):
        world.pip("packaging.pip_install", requirements, constraints)

    world.packaging = types.SimpleNamespace(pip_ensure=pip_ensure, pip_install=pip_install)
    monkeypatch.setitem(sys.modules, "slicer.packaging", world.packaging)
    return world


def _marker(world):
    return dependencies.PendingInstall.from_text(world.settings.value(dependencies.RESUME_SETTINGS_KEY))


PINS = ["numpy==2.4.6", "SimpleITK==2.5.7", "requests==2.34.2", "vtk==9.7.2"]


def test_installer_stops_for_a_restart_and_resumes_with_slicer_packages_pinned(module, install_world):
    from Med3DFMSlicer import installer

    world = install_world
    requirements = ["fakepkg-a>=1.0,<2", "fakepkg-b>=1.0,<2"]
    world.installed.update({"fakepkg-a": None, "fakepkg-b": "1.5", "fakejson": "1.0"})
    # fakejson is loaded in this process and the PyTorch step updates it; torch was never loaded in the
    # Slicer this stands for (this test process may have imported the real one)
    world.imports = {"fakejson": {"json"}, "torch": {"a_torch_never_imported"}}
    world.bump_on_torch = {"fakejson": "2.0"}
    world.answers = [True]
    assert installer.ensureDependencies(requirements) is False  # a restart comes before the rest
    assert world.torch_calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1,<2.14"}]
    assert "torch>=2.1,<2.14 (through the PyTorch extension)" in world.asked[0] and "fakepkg-a>=1.0,<2" in world.asked[0]
    assert "fakepkg-b" not in world.asked[0] and world.pip_calls == []
    assert _marker(world).remaining == ["fakepkg-a>=1.0,<2"] and "fakejson: 1.0 -> 2.0" in _marker(world).reason
    (text, details), = world.restart_offers
    assert "Restart Slicer to continue" in text and details == "fakejson: 1.0 -> 2.0" and world.restarts == 0
    assert "Installation waiting for a restart:\n  fakepkg-a>=1.0,<2" in installer.packageInfoText(requirements)

    # the next start: the panel offers to continue; pip gets Slicer's packages (torch now too) pinned
    world.answers = [True]
    assert installer.resumePendingInstall(requirements) is True
    (kind, arguments, constraints, text), = world.pip_calls
    assert (kind, arguments) == ("pip_ensure", ["fakepkg-a>=1.0,<2"])
    assert set(PINS + ["torch==2.13.0+cu121"]) <= set(text.splitlines()) and not constraints.exists()
    assert _marker(world) is None and world.settings.syncs >= 3 and len(world.restart_offers) == 1
    assert installer.resumePendingInstall(requirements) is None  # nothing left to resume
    assert installer.ensureDependencies(requirements) is True and len(world.asked) == 2  # all there: nothing asked


def test_installer_force_reinstall_failures_and_a_declined_resume(module, install_world, monkeypatch):
    from Med3DFMSlicer import installer

    world = install_world
    requirements = ["fakepkg-a>=1.0,<2", "fakepkg-b>=1.0,<2"]
    world.installed.update({"torch": "2.13.0", "fakepkg-a": "1.5", "fakepkg-b": "1.5"})
    world.imports = {"fakepkg-b": {"json"}}  # fakepkg-b is loaded
    monkeypatch.delitem(sys.modules, "slicer.packaging")  # Slicer before 5.12: slicer.util.pip_install only

    world.answers = [True]
    assert installer.ensureDependencies(requirements, force=True) is True
    assert [(kind, arguments) for kind, arguments, _path, _text in world.pip_calls] == [
        ("util.pip_install", ["--force-reinstall", "--no-deps", *requirements]), ("util.pip_install", requirements)]
    assert all(set(PINS + ["torch==2.13.0"]) <= set(text.splitlines()) for *_rest, text in world.pip_calls)
    assert world.torch_calls == [] and _marker(world) is None  # an installed PyTorch is never reinstalled
    (text, details), = world.restart_offers  # files of a loaded package were replaced: restart recommended, nothing left
    assert "jobs can run now" in text and details == "fakepkg-b: 1.5 (reinstalled)"

    # pip fails while a package it replaces is loaded (Windows keeps such files locked): kept for after a restart
    world.fail_pip, world.answers = True, [True]
    assert installer.ensureDependencies(requirements, force=True) is False
    pending = _marker(world)
    assert pending.remaining == requirements and pending.force and "in use" in pending.reason
    assert "failed because some were in use" in world.restart_offers[-1][0]
    # ... a job asks to continue it (a forced reinstall still owes its packages although they are installed)
    world.fail_pip, world.answers = False, [False]
    assert installer.ensureDependencies(requirements) is False and "continues the installation" in world.asked[-1]
    assert _marker(world) == pending  # declined at a job: kept
    world.answers = [False]
    assert installer.resumePendingInstall(requirements) is False and _marker(world) is None  # declined at start: forgotten

    # a failure with nothing loaded is an ordinary error, and leaves no marker
    world.imports, world.fail_pip, world.answers = {}, True, [True]
    import subprocess

    with pytest.raises(subprocess.CalledProcessError):
        installer.ensureDependencies(requirements, force=True)
    assert _marker(world) is None

    # testing mode never installs or asks: a marker waits, a missing package is an error
    import slicer

    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: True)
    world.settings.setValue(dependencies.RESUME_SETTINGS_KEY, pending.to_text())
    assert installer.resumePendingInstall(requirements) is None and _marker(world) == pending
    world.installed["fakepkg-a"] = None
    with pytest.raises(RuntimeError, match="testing mode"):
        installer.ensureDependencies(requirements)


# --- issue 21: GPU memory, versions, names, samples -------------------------------------------------

def test_gpu_memory_before_segment_is_the_jobs_own_guard():
    """The panel's GPU line says what the job would refuse: one window's activations against the free
    memory torch.cuda.mem_get_info reports (`devices --json`), whatever the scan's size."""
    import torch

    from Med3DFMLib.errors import Med3DFMError
    from Med3DFMLib.inference import plan_memory

    spec = {"spacing": [1.0, 1.0, 1.0], "window": [64, 64, 64]}
    report = {"cuda_devices": [{"index": 0, "name": "Test GPU", "memory_gib": 8.0, "free_gib": 0.1}]}
    needed, free, total, name, fits = environment.gpu_memory_check(spec, report)
    assert (total, name) == (8 * 1024 ** 3, "Test GPU") and needed > free and not fits
    with pytest.raises(Med3DFMError, match="not enough GPU memory"):
        plan_memory((40, 50, 39), 3, (64, 64, 64), torch.device("cuda"), host_available=1024 ** 3, device_available=free)
    report["cuda_devices"][0]["free_gib"] = 6.0
    assert environment.gpu_memory_check(spec, report)[-1]
    assert plan_memory((40, 50, 39), 3, (64, 64, 64), torch.device("cuda"), host_available=1024 ** 3, device_available=6 * 1024 ** 3) >= 1
    assert environment.gpu_memory_check(spec, {"cuda_devices": []}) is None
    # the probe's output: `devices --json` lines, read back whole
    text = json.dumps({"auto": "cpu", "cuda_devices": []}, indent=2)
    assert jobs.device_report(text.splitlines()) == {"auto": "cpu", "cuda_devices": []}
    assert jobs.device_report(["no json"]) is None and jobs.devices_command("py", as_json=True)[-2:] == ["devices", "--json"]


def test_segment_names_follow_the_job_and_old_versions_join_the_list():
    coded = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "64033007", "Kidney"], "typeModifier": ["SCT", "7771000", "Left"]}
    entry = {"id": "kidney", "task": "segment", "labels": [{"value": 1, "name": "kidney_left", "color": [1, 0, 0], "terminology": coded}]}
    assert [d.name for d in results.segment_display_info(entry)] == ["Kidney Left"]  # as `segment` names it
    assert [d.name for d in results.segment_display_info(entry, raw_label_names=True)] == ["kidney_left"]
    assert [d.name for d in results.segment_display_info({**entry, "task": "adapter"})] == ["kidney_left"]  # a user's names stay
    models = [{"id": "a", "version": "1.2.0", "task": "segment", "title": "A"}, {"id": "b", "version": "1.0.0", "task": "segment", "title": "B"},
              {"id": "a", "version": "1.10.0", "task": "segment", "title": "A"}]
    assert [spec for _, spec in results.segment_model_choices(models, [])] == ["a", "b"]
    labelled = results.segment_model_choices(models, [], all_versions=True)
    assert [spec for _, spec in labelled] == ["a", "a@1.2.0", "b"] and labelled[0][0] == "A (a, newest: 1.10.0)"
    row = results.model_rows([{"id": "a", "version": "1", "task": "segment", "size": 1, "installed": "bundled", "sample": {"description": "a scan"}}])[0]
    assert row.sample == "a scan" and results.model_rows([{"id": "b", "size": 1}])[0].sample == ""


def test_the_new_panel_commands_are_accepted_by_the_cli(tmp_path):
    from Med3DFMLib.cli import build_parser

    parser = build_parser()
    segment = jobs.segment_command("py", tmp_path / "i.nrrd", tmp_path / "o.seg.nrrd", f"{DEMO}@0.1.0", raw_label_names=True)
    assert parser.parse_args(segment[3:]).raw_label_names is True
    sample = jobs.models_command("py", "sample", [f"{DEMO}@0.1.0"])
    assert parser.parse_args(sample[3:]).models_command == "sample" and sample[-2:] == ["--progress", "json"]
    assert parser.parse_args(jobs.models_command("py", "list", ["--all-versions"])[3:]).all_versions is True


def test_logic_asks_about_the_encoder_before_learning_and_lists_every_version(module, tmp_path, monkeypatch):
    """Learn checks the encoder's licence (what adapt trains on); "Show all versions" lists id@version."""
    import copy

    from Med3DFMLib.registry import licences

    registry = json.loads((ROOT / "Resources" / "models.json").read_text(encoding="utf-8"))
    for model in registry["models"]:
        if model["id"] == choices.DEFAULT_ENCODER:
            model["licence"] = "CC-BY-NC-4.0"
    older = copy.deepcopy(next(m for m in registry["models"] if m["id"] == DEMO))
    older["version"] = "0.0.9"
    registry["models"].append(older)
    path = tmp_path / "models.json"
    path.write_text(json.dumps(registry), encoding="utf-8")
    monkeypatch.setenv("MED3DFM_REGISTRY", str(path))
    logic = module.Med3DFMLogic()
    assert logic.licenceQuestion(DEMO) is None
    question = logic.licenceQuestion(choices.DEFAULT_ENCODER, encoder=True)
    assert "CC-BY-NC-4.0: non-commercial use only" in question
    assert logic.acknowledgeLicence(choices.DEFAULT_ENCODER, True, encoder=True) and logic.licenceQuestion(choices.DEFAULT_ENCODER, encoder=True) is None
    assert json.loads((licences.models_home() / licences.FILE).read_text())[choices.DEFAULT_ENCODER]["by"] == "Slicer panel"
    assert [m.model_id for m in logic.modelFits(None)] == [DEMO]
    assert [m.model_id for m in logic.modelFits(None, allVersions=True)] == [DEMO, f"{DEMO}@0.0.9"]
    assert logic.registryEntry(f"{DEMO}@0.0.9")["version"] == "0.0.9"
