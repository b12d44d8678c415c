"""A model's label table as a Slicer colour table file (`.csv` with terminology), and back.

A plain label map (`segment --labelmap`, batch `--labelmaps`) carries numbers only; loaded in Slicer
with this table beside it (or the table loaded as a colour node and chosen for the label map), its
values get the model's names, colours and SNOMED CT codes, as the `.seg.nrrd` has them. The columns
are those Slicer's colour table storage node reads and writes (Libs/MRML/Core/
vtkMRMLColorTableStorageNode.cxx): LabelValue, Name, Color_R/G/B/A (0-255), then for each of
Category, Type, TypeModifier, Region, RegionModifier its _CodingScheme, _CodeValue and _CodeMeaning.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Union

from Med3DFMLib.io.atomic import write_text_atomic

if TYPE_CHECKING:
    from Med3DFMLib.io.segmentations import SegmentInfo

PathLike = Union[str, Path]
# (column prefix, key in a card's terminology dict)
TERMINOLOGY_PARTS = (("Category", "category"), ("Type", "type"), ("TypeModifier", "typeModifier"),
                     ("Region", "anatomicRegion"), ("RegionModifier", "anatomicRegionModifier"))
CODE_FIELDS = ("CodingScheme", "CodeValue", "CodeMeaning")
COLUMNS = ["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A"] + [f"{part}_{field}" for part, _ in TERMINOLOGY_PARTS for field in CODE_FIELDS]
BACKGROUND_ROW = (0, "background", (0.0, 0.0, 0.0), 0.0)  # Slicer's tables have a transparent 0


def color_table_text(segments: Sequence["SegmentInfo"]) -> str:
    """The CSV text: a transparent background row, then one row per segment in label order."""
    values = [s.value for s in segments]
    if len(set(values)) != len(values) or any(v <= 0 for v in values):
        raise ValueError(f"label values must be distinct and positive: {values}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    value, name, color, alpha = BACKGROUND_ROW
    writer.writerow([value, name, *(_byte(c) for c in color), _byte(alpha)] + [""] * (len(COLUMNS) - 6))
    for segment in sorted(segments, key=lambda s: s.value):
        terminology = segment.terminology or {}
        codes: List[str] = []
        for _, key in TERMINOLOGY_PARTS:
            code = list(terminology.get(key) or ("", "", ""))
            codes += [str(c) for c in (code + ["", "", ""])[:3]]
        writer.writerow([segment.value, segment.name, *(_byte(c) for c in segment.color[:3]), 255] + codes)
    return buffer.getvalue()


def write_color_table(path: PathLike, segments: Sequence["SegmentInfo"]) -> None:
    """Write the table atomically; the name must end in .csv (the extension Slicer reads as a colour table)."""
    if not str(path).lower().endswith(".csv"):
        raise ValueError(f"a Slicer colour table file must end in .csv: {path}")
    write_text_atomic(Path(path), color_table_text(segments))


def read_color_table(path: PathLike) -> List[Dict[str, Any]]:
    """Rows as dicts: value, name, color (0..1 RGB), alpha, terminology (a card's dict, or None)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            terminology: Dict[str, Any] = {}
            for part, key in TERMINOLOGY_PARTS:
                code = [row.get(f"{part}_{field}", "") or "" for field in CODE_FIELDS]
                if any(code):
                    terminology[key] = code
            rows.append({"value": int(row["LabelValue"]), "name": row["Name"], "color": [int(row[f"Color_{c}"]) / 255.0 for c in "RGB"],
                         "alpha": int(row["Color_A"]) / 255.0, "terminology": terminology or None})
    return rows


def _byte(fraction: float) -> int:
    return int(round(max(0.0, min(1.0, float(fraction))) * 255))


def segments_of_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The non-background rows in a card's label form (value, name, color, terminology)."""
    return [{"value": r["value"], "name": r["name"], "color": r["color"], **({"terminology": r["terminology"]} if r["terminology"] else {})}
            for r in rows if r["value"] != 0]
