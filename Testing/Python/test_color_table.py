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
