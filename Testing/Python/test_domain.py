"""Models know their domain, and scans are checked against it before anything is written (issue 18).

Real scans throughout: the CT fixtures and a whole-brain T1 are refused by the MR crop model with one
line that names the mismatch and what to use instead; the bundled example is accepted and the model
chosen for it is named; `--force` runs anyway and the record says so; nothing is left behind on a
refusal; few-shot adapters carry the domain of their labelled images; the Slicer panel's marks come
from the same check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from Med3DFMLib import domain
from Med3DFMLib.cli import main
from Med3DFMLib.io.volumes import ijk_to_lps, read_volume
from Med3DFMLib.registry.catalogue import load_registry, schema_errors
from Med3DFMLib.weights import read_card

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "Testing" / "Data"
SHARED = ROOT.parent / "shared" / "data"
DEMO = "hippocampus-mr-demo"
CT_FIXTURES = [DATA / "totalseg" / "example_ct_sm.nii.gz", DATA / "totalseg" / "example_ct_dicom"]
WHOLE_BRAIN = DATA / "brain" / "t1_brain_4mm.nii.gz"
BREAST_CROP = DATA / "pyradiomics" / "breast1_image.nrrd"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "Med3DFM"))


def _registry_entry(model_id: str) -> dict:
    return next(m for m in load_registry()["models"] if m["id"] == model_id)


def _segment(tmp_path: Path, source: Path, *extra: str) -> int:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return main(["segment", str(source), "-o", str(out / "x.seg.nrrd"), "--table", str(out / "x.tsv"), "--progress", "none", "--device", "cpu", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("med3dfm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- part 1: the cards -----------------------------------------------------------------------------


def test_every_bundled_card_declares_a_domain():
    registry = load_registry()
    assert not schema_errors(registry)
    for entry in registry["models"]:
        assert {"modality", "body_region", "field_of_view", "intensity", "measured"} <= set(entry["domain"]), entry["id"]
    demo = _registry_entry(DEMO)["domain"]
    assert (demo["modality"], demo["contrast"], demo["field_of_view"]["kind"], demo["intensity"]["scale"]) == ("MR", "T1", "crop", "relative")
    assert demo["measured"]["script"] == "scripts/measure_domain.py"
    assert _registry_entry("med3dfm-encoder-small")["domain"]["modality"] == "any"
    # the weight file carries the same card: `--model path/to/file.safetensors` is checked the same way
    assert read_card(ROOT / "Resources" / "models" / f"{DEMO}.safetensors")["domain"] == demo


@pytest.mark.shared
def test_the_demo_domain_is_what_its_training_data_measure():
    """The card's numbers come from scripts/measure_domain.py on the 144 training crops, not by hand."""
    from measure_domain import demo_domain

    measured = demo_domain(SHARED / "hippocampus")
    assert measured == _registry_entry(DEMO)["domain"]
    assert measured["measured"]["scans"] == 144
    low, high = measured["field_of_view"]["extent_mm"]["min"], measured["field_of_view"]["extent_mm"]["max"]
    assert all(25 < lo < hi < 60 for lo, hi in zip(low, high))  # crops of about 35 x 50 x 35 mm


@pytest.mark.shared
def test_the_held_out_crops_fit_and_every_other_shared_scan_does_not():
    """No bundled model accepts a scan outside its domain; its own held-out test cases are all accepted."""
    from test_shared_data import VOLUMES
    from train_hippocampus_demo import split_cases

    demo = _registry_entry(DEMO)["domain"]
    names = sorted(p.name for p in (SHARED / "hippocampus" / "images").glob("*.nii.gz"))
    for name in split_cases(names)["test"]:
        verdict = domain.check(domain.measure_image(read_volume(SHARED / "hippocampus" / "images" / name)), demo, DEMO)
        assert verdict.fits and verdict.deviation < 0.5, (name, verdict.reason())
    for relative in VOLUMES:
        if relative.startswith("hippocampus/"):
            continue
        verdict = domain.check(domain.measure_image(read_volume(SHARED / relative)), demo, DEMO)
        assert not verdict.fits and verdict.mismatches, relative


def test_the_shipped_held_out_crops_fit_and_every_other_shipped_scan_does_not():
    """The same on Testing/Data: the demo model's held-out crops there (014, 024, 035) fit; the CT
    fixtures, the whole-brain T1 and the breast MR crop do not."""
    demo = _registry_entry(DEMO)["domain"]
    crops = sorted((DATA / "hippocampus" / "images").glob("*.nii.gz"))
    assert [p.name[12:15] for p in crops] == ["014", "024", "035"]
    for crop in crops:
        verdict = domain.check(domain.measure_image(read_volume(crop)), demo, DEMO)
        assert verdict.fits and verdict.deviation < 0.5, (crop.name, verdict.reason())
    for other in [*CT_FIXTURES, WHOLE_BRAIN, BREAST_CROP]:
        verdict = domain.check(domain.measure_image(read_volume(other)), demo, DEMO)
        assert not verdict.fits and verdict.mismatches, other.name


# --- part 2: the check in `med3dfm segment` -------------------------------------------------------


@pytest.mark.parametrize("ct", CT_FIXTURES, ids=lambda p: p.name)
def test_ct_fixtures_are_refused_by_the_mr_crop_model(tmp_path, capsys, ct):
    assert _segment(tmp_path, ct, "--model", DEMO) == 1
    err = _one_error_line(capsys)
    assert f"{DEMO} does not fit this scan: the scan is CT" in err and "the model was trained on MR" in err
    assert "field of view" in err
    assert "no installed model fits it: use Learn from labels (`med3dfm adapt`)" in err and "--force" in err
    if ct.is_dir():
        assert "DICOM Modality tag" in err  # the series' own tag, not a guess from the voxels
    assert list((tmp_path / "out").iterdir()) == []  # no segmentation, table or record


def test_without_a_model_a_ct_fits_none_and_is_refused(tmp_path, capsys):
    assert _segment(tmp_path, CT_FIXTURES[0]) == 1
    err = _one_error_line(capsys)
    assert f"no segmentation model fits this scan ({DEMO}: the scan is CT" in err and "Learn from labels" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_whole_brain_t1_is_refused_by_its_field_of_view(tmp_path, capsys):
    assert _segment(tmp_path, WHOLE_BRAIN, "--model", DEMO) == 1
    err = _one_error_line(capsys)
    assert "its field of view is 160 x 192 x 224 mm (L x P x S), the model was trained on crops of 32-43 x 40-59 x 26-46 mm" in err
    assert "modality" not in err and "the scan is" not in err  # it is MR: only the extent (and the intensities) differ
    assert list((tmp_path / "out").iterdir()) == []


def test_an_mr_crop_of_other_anatomy_is_refused_by_its_intensities(tmp_path, capsys):
    """A breast MR sub-volume has a hippocampus crop's size; its intensity distribution gives it away."""
    assert _segment(tmp_path, BREAST_CROP, "--model", DEMO) == 1
    err = _one_error_line(capsys)
    assert "its intensity distribution differs" in err and "field of view" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_the_bundled_example_is_accepted_and_the_model_chosen_for_it_named(tmp_path, capsys):
    assert _segment(tmp_path, DATA / "hippocampus" / "images" / "hippocampus_014.nii.gz") == 0
    assert f"with {DEMO} {_registry_entry(DEMO)['version']} (chosen: it fits this scan best)" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "x.json").read_text())
    assert record["model"]["id"] == DEMO and record["parameters"]["model"] is None
    checked = record["domain"]
    assert (checked["fits"], checked["forced"], checked["chosen"], checked["fitting"], checked["mismatches"]) == (True, False, "best fit", [DEMO], [])
    assert checked["scan"]["modality"] == "not CT" and checked["scan"]["extent_mm"] == [39.0, 50.0, 40.0]


def test_force_runs_anyway_and_the_record_says_so(tmp_path, capsys):
    assert _segment(tmp_path, BREAST_CROP, "--model", DEMO, "--force") == 0
    assert "(forced: the scan is outside its domain)" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "x.json").read_text())
    assert record["parameters"]["force"] is True
    assert record["domain"]["forced"] is True and record["domain"]["fits"] is False
    assert [m["aspect"] for m in record["domain"]["mismatches"]] == ["intensity"]
    assert (tmp_path / "out" / "x.seg.nrrd").is_file() and (tmp_path / "out" / "x.tsv").is_file()


def test_force_without_a_model_is_refused_when_none_fits(tmp_path, capsys):
    assert _segment(tmp_path, CT_FIXTURES[0], "--force") == 1
    assert "--force needs --model" in _one_error_line(capsys)
    assert list((tmp_path / "out").iterdir()) == []


def _private_registry(tmp_path: Path, domains: dict) -> Path:
    """Registry entries that all point at the bundled demo weights but declare other domains."""
    entries = []
    for model_id, model_domain in domains.items():
        entry = dict(_registry_entry(DEMO), id=model_id, title=model_id)
        entry["domain"] = model_domain
        entries.append(entry)
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"schema_version": 1, "models": entries}), encoding="utf-8")
    return path


def test_of_several_fitting_models_the_closest_is_chosen_and_named(tmp_path, capsys):
    case = DATA / "hippocampus" / "images" / "hippocampus_014.nii.gz"  # 39 x 50 x 40 mm
    scan = domain.measure_image(read_volume(case))
    exact = _registry_entry(DEMO)["domain"]
    wide = json.loads(json.dumps(exact))
    wide["field_of_view"]["extent_mm"] = {"min": [20.0, 20.0, 20.0], "max": [45.0, 60.0, 45.0]}  # fits, the scan off its centre
    any_modality = dict(exact, modality="any")
    elsewhere = json.loads(json.dumps(exact))
    elsewhere["field_of_view"]["extent_mm"] = {"min": [150.0, 150.0, 150.0], "max": [250.0, 250.0, 250.0]}
    verdicts = {k: domain.check(scan, d, k) for k, d in {"wide": wide, "exact": exact, "any": any_modality, "far": elsewhere}.items()}
    assert verdicts["wide"].deviation > verdicts["exact"].deviation and not verdicts["far"].fits
    registry = _private_registry(tmp_path, {"crop-wide": wide, "crop-any": any_modality, "crop-exact": exact, "whole-head": elsewhere})
    assert _segment(tmp_path, case, "--registry", str(registry)) == 0
    assert "with crop-exact " in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "x.json").read_text())
    # closest first; a model for any modality comes after those made for this one
    assert record["model"]["id"] == "crop-exact" and record["domain"]["fitting"] == ["crop-exact", "crop-wide", "crop-any"]


def test_a_refusal_lists_the_models_that_fit(tmp_path, capsys):
    ct_domain = domain.domain_from_scans([domain.measure_image(read_volume(CT_FIXTURES[0]))], body_region="upper abdomen")
    registry = _private_registry(tmp_path, {DEMO: _registry_entry(DEMO)["domain"], "abdomen-ct": ct_domain})
    assert _segment(tmp_path, CT_FIXTURES[0], "--model", DEMO, "--registry", str(registry)) == 1
    err = _one_error_line(capsys)
    assert f"{DEMO} does not fit this scan: " in err and "; models that fit: abdomen-ct; --force runs it anyway" in err


def test_a_model_without_a_declared_domain_runs_and_says_it_was_not_checked(tmp_path, capsys):
    undeclared = dict(_registry_entry(DEMO), id="old-model")
    del undeclared["domain"]
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "models": [undeclared]}), encoding="utf-8")
    case = DATA / "hippocampus" / "images" / "hippocampus_024.nii.gz"
    assert _segment(tmp_path, case, "--registry", str(registry)) == 1  # never chosen on its own
    assert "old-model: its card declares no domain" in _one_error_line(capsys)
    assert _segment(tmp_path, case, "--model", "old-model", "--registry", str(registry)) == 0
    assert "(its card declares no domain: the scan was not checked)" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "x.json").read_text())
    assert (record["domain"]["declared"], record["domain"]["fits"], record["domain"]["forced"]) == (False, False, False)


# --- what the check measures ----------------------------------------------------------------------


def test_modality_comes_from_the_dicom_tag_and_else_from_hounsfield_units():
    series = read_volume(CT_FIXTURES[1])
    assert series.GetMetaData(domain.MODALITY_TAG) == "CT"
    tagged = domain.measure_image(series)
    assert (tagged.dicom_modality, tagged.modality) == ("CT", "CT")
    untagged = domain.measure_image(read_volume(CT_FIXTURES[0]))  # NIfTI: no tag, but air at -1000 HU
    assert untagged.dicom_modality is None and untagged.modality == "CT" and untagged.air_fraction > 0.2
    mr = domain.measure_image(read_volume(WHOLE_BRAIN))
    assert mr.modality == "not CT" and mr.air_fraction == 0.0
    # a tag beats the voxels: a CT series whose voxels are not in HU is still CT
    raw = domain.measure_scan(sitk.GetArrayViewFromImage(read_volume(WHOLE_BRAIN)), (40, 48, 56), np.eye(4), " ct ")
    assert raw.modality == "CT" and "DICOM Modality tag" in raw.describe_modality()


def test_field_of_view_is_the_physical_extent_along_the_patient_axes():
    image = read_volume(WHOLE_BRAIN)
    facts = domain.measure_image(image)
    assert facts.extent_mm == pytest.approx((160.0, 192.0, 224.0))
    # the same voxels turned 90 degrees in the scanner: the extent follows the patient axes
    turned = sitk.Image(image)
    turned.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    assert domain.measure_image(turned).extent_mm == pytest.approx((192.0, 160.0, 224.0))


def test_an_adapter_carries_the_domain_of_its_labelled_images(tmp_path, capsys):
    """`med3dfm adapt` measures its labelled images; `segment` with the adapter checks other scans against them."""
    image = DATA / "hippocampus" / "images" / "hippocampus_014.nii.gz"
    labels = DATA / "hippocampus" / "labels" / "hippocampus_014.nii.gz"
    adapter = tmp_path / "proto.safetensors"
    assert main(["adapt", "--image", str(image), "--labels", str(labels), "--dense", "--name", "proto", "--mode", "prototype",
                 "-o", str(adapter), "--progress", "none", "--device", "cpu"]) == 0
    card_domain = read_card(adapter)["domain"]
    facts = domain.measure_image(read_volume(image))
    assert card_domain["modality"] == "not CT" and card_domain["measured"]["images"] == [image.name]
    assert card_domain["field_of_view"]["extent_mm"] == {"min": list(facts.extent_mm), "max": list(facts.extent_mm)}
    assert _segment(tmp_path, DATA / "hippocampus" / "images" / "hippocampus_024.nii.gz", "--model", str(adapter)) == 0
    capsys.readouterr()
    other = tmp_path / "ct"
    other.mkdir()
    assert _segment(other, CT_FIXTURES[0], "--model", str(adapter)) == 1
    assert "proto does not fit this scan: the scan is CT" in _one_error_line(capsys)
    assert list((other / "out").iterdir()) == []


def test_a_ct_domain_compares_hounsfield_units():
    scans = [domain.measure_image(read_volume(p)) for p in CT_FIXTURES]
    ct_domain = domain.domain_from_scans(scans)
    assert ct_domain["modality"] == "CT" and ct_domain["intensity"]["scale"] == "absolute"
    assert min(ct_domain["intensity"]["raw"]["min"]) >= domain.HU_FLOOR  # padding below air is not anatomy
    assert all(domain.check(s, ct_domain).fits for s in scans)
    # the same CT stored as raw detector values (a CT tag, but not HU) is caught by its intensities
    shifted = domain.ScanFacts(scans[1].extent_mm, tuple(p + 1024.0 for p in scans[1].percentiles), 0.0, "CT")
    verdict = domain.check(shifted, ct_domain)
    assert [m.aspect for m in verdict.mismatches] == ["intensity"] and "HU" in verdict.reason()
    mr = domain.check(domain.measure_image(read_volume(WHOLE_BRAIN)), ct_domain, "ct-model")
    assert [m.aspect for m in mr.mismatches] == ["modality", "field of view"]


# --- part 3: the Slicer panel's marks, without Slicer -----------------------------------------------


def test_the_slicer_helper_marks_the_models_that_fit_a_volume():
    from Med3DFMSupport import fit, results

    registry = load_registry()["models"]
    ct_adapter = {"id": "abdomen-ct", "task": "adapter", "title": "abdomen CT",
                  "domain": domain.domain_from_scans([domain.measure_image(read_volume(CT_FIXTURES[0]))])}
    legacy = {"id": "legacy", "task": "adapter", "title": "legacy adapter"}  # saved before cards had a domain
    choices = results.segment_model_choices([m for m in registry if m["task"] == "segment"], [ct_adapter, legacy])
    entries = {e["id"]: e for e in registry + [ct_adapter, legacy]}

    def node_facts(path: Path, modality: str = ""):
        image = read_volume(path)  # what a volume node holds: voxels in (k, j, i), geometry in RAS
        return fit.scan_facts(sitk.GetArrayFromImage(image), np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(image), modality)

    hippocampus = node_facts(DATA / "hippocampus" / "images" / "hippocampus_014.nii.gz")
    from_file = domain.measure_image(read_volume(DATA / "hippocampus" / "images" / "hippocampus_014.nii.gz"))
    assert hippocampus.extent_mm == pytest.approx(from_file.extent_mm) and hippocampus.percentiles == pytest.approx(from_file.percentiles)
    marked = {m.model_id: m for m in fit.mark_model_choices(choices, entries, hippocampus)}
    assert (marked[DEMO].fits, marked["abdomen-ct"].fits, marked["legacy"].fits) == (True, False, None)
    assert marked[DEMO].label.endswith("fits this volume") and "fit unknown" in marked["legacy"].label
    assert fit.mismatch_message(DEMO, list(marked.values())) == ""

    ct = list(fit.mark_model_choices(choices, entries, node_facts(CT_FIXTURES[0], "CT")))
    message = fit.mismatch_message(DEMO, ct)
    assert message.startswith(f"{DEMO} does not fit this volume: the scan is CT (by its DICOM Modality tag)")
    assert message.endswith("Models that fit it: abdomen-ct.")
    assert "does not fit this volume" in next(m for m in ct if m.model_id == DEMO).label
    brain = fit.mark_model_choices(choices, {DEMO: entries[DEMO]}, node_facts(WHOLE_BRAIN))
    assert "field of view" in fit.mismatch_message(DEMO, brain) and "Learn from labels" in fit.mismatch_message(DEMO, brain)
    assert all(m.fits is None for m in fit.mark_model_choices(choices, entries, None))  # no volume selected: no marks


def test_explain_refuses_a_scan_outside_the_domain_and_force_records_it(tmp_path, capsys):
    """A heatmap of where the hippocampus model 'sees' a hippocampus in a CT misleads like the
    segmentation would: refused with the same line, no map; --force writes it and the note says so."""
    heat = tmp_path / "heat.nrrd"
    arguments = ["explain", str(CT_FIXTURES[0]), "--model", DEMO, "--target", "anterior hippocampus", "-o", str(heat), "--progress", "none", "--device", "cpu"]
    assert main(arguments) == 1
    err = _one_error_line(capsys)
    assert f"{DEMO} does not fit this scan: the scan is CT" in err and "--force" in err
    assert list(tmp_path.iterdir()) == []
    assert main(arguments + ["--force"]) == 0
    notes = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert heat.exists() and len(notes) == 1
    assert notes[0]["domain"]["forced"] is True and notes[0]["domain"]["fits"] is False
