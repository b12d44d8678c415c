"""A finished job's files, understood: the record, the table, the segments' names/colours/terminology."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# The context names the library writes when a registry entry leaves them out (Med3DFMLib.io.segmentations).
SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"
PROVENANCE_ATTRIBUTE = "Med3DFM.provenance"
MODEL_ATTRIBUTE = "Med3DFM.model"


def record_path_for(output: Path) -> Path:
    """The job record beside an output (`x.seg.nrrd` → `x.json`): the library's own rule."""
    from Med3DFMLib.record import record_path_for as library_rule

    return library_rule(Path(output))


def read_job_record(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the job record {path.name} was not written; the job did not finish")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or "command" not in record:
        raise ValueError(f"{path.name} is not a Med3DFM job record")
    return record


def _code(triple: Optional[Sequence[str]]) -> str:
    values = list(triple or ("", "", ""))
    values += [""] * (3 - len(values))
    return "^".join(str(v) for v in values[:3])


def terminology_string(terminology: Optional[Mapping[str, Any]]) -> str:
    """A registry label's terminology as Slicer's `TerminologyEntry` tag string.

    Seven `~`-separated fields: context ~ category ~ type ~ type modifier ~ anatomic context ~ region ~
    region modifier; each code is `scheme^value^meaning`. Empty when the label has none.
    """
    if not terminology:
        return ""
    fields = [
        str(terminology.get("contextName") or SLICER_ANATOMY_CONTEXT),
        _code(terminology.get("category")),
        _code(terminology.get("type")),
        _code(terminology.get("typeModifier")),
        str(terminology.get("anatomicContextName") or DICOM_ANATOMY_CONTEXT),
        _code(terminology.get("anatomicRegion")),
        _code(terminology.get("anatomicRegionModifier")),
    ]
    return "~".join(fields)


@dataclass
class SegmentDisplay:
    """How one label of a model appears in Slicer."""

    value: int
    name: str
    color: Tuple[float, float, float]
    terminology: str


def segment_display_info(entry: Mapping[str, Any]) -> List[SegmentDisplay]:
    """Segment names, colours and terminology strings of a registry entry's labels, by label value."""
    infos = []
    for label in sorted(entry.get("labels", []), key=lambda item: int(item["value"])):
        color = tuple(float(c) for c in (label.get("color") or (0.5, 0.5, 0.5)))[:3]
        infos.append(SegmentDisplay(int(label["value"]), str(label["name"]), color, terminology_string(label.get("terminology"))))  # type: ignore[arg-type]
    return infos


def read_tsv(path: Path) -> Tuple[List[str], List[str], List[List[Any]]]:
    """(comments, column names, rows) of a `.tsv` written by the library; numbers become numbers."""
    comments: List[str] = []
    columns: List[str] = []
    rows: List[List[Any]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        cells = line.split("\t")
        if not columns:
            columns = cells
            continue
        rows.append([_number(cell) for cell in cells])
    return comments, columns, rows


def _number(cell: str) -> Any:
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


@dataclass
class SegmentResult:
    """The files of a finished segment job, and the record that says how they were made."""

    segmentation: Path
    table: Optional[Path]
    record: Dict[str, Any]
    provenance: str = ""
    segments: List[Dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, str], segmentation: Path) -> "SegmentResult":
        seg = Path(outputs.get("segmentation") or segmentation)
        table = Path(outputs["table"]) if outputs.get("table") else None
        record = read_job_record(record_path_for(seg))
        return cls(seg, table, record, json.dumps(record, sort_keys=True), list(record.get("segments", [])))

    @property
    def model_id(self) -> str:
        return str(self.record.get("model", {}).get("id", ""))

    @property
    def model_version(self) -> str:
        return str(self.record.get("model", {}).get("version", ""))

    @property
    def device(self) -> str:
        return str(self.record.get("device", ""))


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


@dataclass
class ModelRow:
    id: str
    version: str
    task: str
    title: str
    licence: str
    size: str
    installed: bool
    where: str
    path: Optional[str]


def model_rows(listing: Sequence[Mapping[str, Any]], task: Optional[str] = None) -> List[ModelRow]:
    """Rows for the models table from `models list --json`, optionally only one task."""
    rows = []
    for item in listing:
        if task and item.get("task") != task:
            continue
        where = str(item.get("installed", "not installed"))
        rows.append(ModelRow(str(item["id"]), str(item.get("version", "")), str(item.get("task", "")), str(item.get("title", "")),
                             str(item.get("licence", "?")), human_size(float(item.get("size", 0))),
                             where in ("bundled", "cache", "bundled+cache"), where, item.get("path")))
    return rows
