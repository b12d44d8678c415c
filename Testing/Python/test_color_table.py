"""`segment --color-table`: the model's label table as a Slicer colour table (.csv), so a plain label map
loads in Slicer with the model's names, colours and SNOMED CT codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from Med3DFMLib.cli import main
from Med3DFMLib.io.color_table import COLUMNS, color_table_text, read_color_table, segments_of_rows
from Med3DFMLib.io.segmentations import SegmentInfo

ROOT = Path(__file__).resolve().parents[2]
# The terminology columns Slicer's colour table storage node reads (vtkMRMLColorTableStorageNode.cxx).
SLICER_TERMINOLOGY_COLUMNS = [f"{part}_{field}" for part in ("Category", "Type", "TypeModifier", "Region", "RegionModifier")
                              for field in ("CodingScheme", "CodeValue", "CodeMeaning")]


def _demo_labels():
    registry = json.loads((ROOT / "Resources" / "models.json").read_text())
    models = registry["models"] if isinstance(registry, dict) and "models" in registry else registry
    entry = next(m for m in (models if isinstance(models, list) else models.values()) if m["id"] == "hippocampus-mr-demo")
    return entry["labels"]


def test_the_label_map_and_its_colour_table_carry_the_models_names_colours_and_codes(tmp_path, hippocampus_case):
    image_path, _ = hippocampus_case
    table = tmp_path / "case.csv"
    code = main(["segment", str(image_path), "-o", str(tmp_path / "case.seg.nrrd"), "--labelmap", str(tmp_path / "case.nii.gz"),
                 "--color-table", str(table), "--progress", "none"])
    assert code == 0
    with open(table, newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:6] == ["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A"] and header[6:] == SLICER_TERMINOLOGY_COLUMNS
    rows = read_color_table(table)
    assert rows[0]["value"] == 0 and rows[0]["alpha"] == 0.0  # transparent background, as Slicer's tables
    expected = _demo_labels()
    for row, label in zip(segments_of_rows(rows), expected):
        assert (row["value"], row["name"]) == (label["value"], label["name"])
        assert row["color"] == pytest.approx(label["color"], abs=0.5 / 255)
        assert row["terminology"]["category"] == label["terminology"]["category"] and row["terminology"]["type"] == label["terminology"]["type"]
    # every value in the label map has a row
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case.nii.gz")))).tolist())
    assert values <= {r["value"] for r in rows} and values >= {1, 2}
    assert json.loads((tmp_path / "case.json").read_text())["outputs"]["color_table"] == str(table)


def test_a_table_without_terminology_and_bad_tables():
    text = color_table_text([SegmentInfo(3, "lesion, left", (1.0, 0.0, 0.5), None), SegmentInfo(1, "liver", (0.5, 0.25, 0.0), None)])
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == COLUMNS and [r[0] for r in rows[1:]] == ["0", "1", "3"]  # label order
    assert rows[3][:6] == ["3", "lesion, left", "255", "0", "128", "255"] and rows[3][6:] == [""] * 15  # a comma in a name is quoted
    with pytest.raises(ValueError, match="distinct and positive"):
        color_table_text([SegmentInfo(1, "a", (0, 0, 0), None), SegmentInfo(1, "b", (0, 0, 0), None)])
    with pytest.raises(ValueError, match="distinct and positive"):
        color_table_text([SegmentInfo(0, "background", (0, 0, 0), None)])


def test_a_colour_table_not_ending_in_csv_is_refused_before_any_work(tmp_path, hippocampus_case, capsys):
    code = main(["segment", str(hippocampus_case[0]), "-o", str(tmp_path / "out.seg.nrrd"), "--color-table", str(tmp_path / "table.txt"), "--progress", "none"])
    assert code == 1 and "must end in .csv" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_each_segmentation_model_ships_the_colour_table_its_card_generates():
    """Resources/models/<id>.csv, named by the entry's color_table, is what `med3dfm models color-table ID` writes."""
    from Med3DFMLib.registry.cli import model_color_table

    registry = json.loads((ROOT / "Resources" / "models.json").read_text())
    segmenters = [m for m in registry["models"] if m["task"] == "segment"]
    assert segmenters
    for entry in segmenters:
        shipped = ROOT / "Resources" / entry["color_table"]
        assert shipped.read_text(encoding="utf-8") == model_color_table(entry), f"regenerate: med3dfm models color-table {entry['id']} --output {shipped}"


def test_the_colour_table_command(tmp_path, capsys):
    assert main(["models", "color-table", "hippocampus-mr-demo"]) == 0
    assert capsys.readouterr().out == (ROOT / "Resources" / "models" / "hippocampus-mr-demo.csv").read_text()
    assert main(["models", "color-table", "med3dfm-encoder-small"]) == 1
    assert "has no label table" in capsys.readouterr().err
    assert main(["models", "color-table", "hippocampus-mr-demo", "--output", str(tmp_path / "t.txt")]) == 1 and not (tmp_path / "t.txt").exists()


def test_segments_are_named_by_their_terminology_unless_raw_names_are_asked_for():
    """As SlicerTotalSegmentator's "Use standard segment names": the terminology's name by default, the
    card's with raw names; a label whose standard name another label shares keeps its card name."""
    from Med3DFMLib.io.terminology import segment_names, standard_name

    kidney = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "64033007", "Kidney"]}
    left = {**kidney, "typeModifier": ["SCT", "7771000", "Left"]}
    labels = [{"name": "kidney_left", "terminology": left}, {"name": "kidney_right", "terminology": {**kidney, "typeModifier": ["SCT", "24028007", "Right"]}},
              {"name": "tumour", "terminology": None}]
    assert standard_name(kidney) == "Kidney" and standard_name(left) == "Kidney Left" and standard_name(None) is None
    assert segment_names(labels) == ["Kidney Left", "Kidney Right", "tumour"]
    assert segment_names(labels, raw=True) == ["kidney_left", "kidney_right", "tumour"]
    demo = _demo_labels()  # both coded as Hippocampus: the codes cannot tell them apart, the card names stay
    assert segment_names(demo) == segment_names(demo, raw=True) == ["anterior hippocampus", "posterior hippocampus"]
