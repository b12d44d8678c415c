"""A finished job's files, understood: the record, the table, the segments' names/colours/terminology;
and for Learn from labels: the painted segments as one .seg.nrrd, and which result segments go back where;
for a Segment output the user chose: which of its segments a result replaces (plan_segment_merge) and
the report of what was replaced, added and kept (SegmentMerge)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

PROVENANCE_ATTRIBUTE = "Med3DFM.provenance"
MODEL_ATTRIBUTE = "Med3DFM.model"


def record_path_for(output: Path) -> Path:
    """The job record beside an output (`x.seg.nrrd` → `x.json`): the library's own rule."""
    from Med3DFMLib.record import record_path_for as library_rule

    return library_rule(Path(output))


def read_job_record(path: Path, required: str = "command", what: str = "job record") -> Dict[str, Any]:
    """A JSON object a job wrote (its record, or a heatmap's note), checked for its `required` key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the {what} {path.name} was not written; the job did not finish")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or required not in record:
        raise ValueError(f"{path.name} is not a Med3DFM {what}")
    return record


@dataclass
class SegmentDisplay:
    """How one label of a model appears in Slicer."""

    value: int
    name: str
    color: Tuple[float, float, float]
    terminology: str


def segment_display_info(entry: Mapping[str, Any], raw_label_names: bool = False) -> List[SegmentDisplay]:
    """Segment names, colours and terminology strings of a registry entry's labels, by label value; the
    names as the segment job gives them (terminology names unless `raw_label_names`, Med3DFMLib/segment.py)."""
    from Med3DFMLib.io.terminology import segment_names, terminology_string

    labels = sorted(entry.get("labels", []), key=lambda item: int(item["value"]))
    names = segment_names(labels, raw=raw_label_names or entry.get("task") != "segment")
    infos = []
    for label, name in zip(labels, names):
        color = tuple(float(c) for c in (label.get("color") or (0.5, 0.5, 0.5)))[:3]
        infos.append(SegmentDisplay(int(label["value"]), name, color, terminology_string(label.get("terminology"))))  # type: ignore[arg-type]
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


class _ModelOfRecord:
    """The model a job record names (its "model" entry)."""

    record: Dict[str, Any]

    @property
    def model_id(self) -> str:
        return str(self.record.get("model", {}).get("id", ""))

    @property
    def model_version(self) -> str:
        return str(self.record.get("model", {}).get("version", ""))


@dataclass
class SegmentResult(_ModelOfRecord):
    """The files of a finished segment job, and the record that says how they were made."""

    segmentation: Path
    table: Optional[Path]
    record: Dict[str, Any]
    provenance: str = ""
    segments: List[Dict[str, Any]] = field(default_factory=list)
    confidence: Optional[Path] = None  # per-voxel confidence volume, when asked for
    labelmap: Optional[Path] = None

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, str], segmentation: Path) -> "SegmentResult":
        seg = Path(outputs.get("segmentation") or segmentation)
        table = Path(outputs["table"]) if outputs.get("table") else None
        record = read_job_record(record_path_for(seg))
        return cls(seg, table, record, json.dumps(record, sort_keys=True), list(record.get("segments", [])),
                   Path(outputs["confidence"]) if outputs.get("confidence") else None, Path(outputs["labelmap"]) if outputs.get("labelmap") else None)

    def confidence_map(self) -> "ConfidenceMap":
        """The job's label map and confidence volume, read now (the job's folder is removed once loaded)."""
        if self.confidence is None or self.labelmap is None:
            raise ValueError("this segment job wrote no confidence volume (run it with the confidence overlay on)")
        import SimpleITK as sitk

        labels = sitk.ReadImage(str(self.labelmap))
        return ConfidenceMap(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(sitk.ReadImage(str(self.confidence))),
                             [(int(s["value"]), str(s["name"])) for s in self.segments], float(np.prod(labels.GetSpacing())) / 1000.0)

    @property
    def device(self) -> str:
        return str(self.record.get("device", ""))


@dataclass
class ConfidenceMap:
    """A segment result's labels and confidence in memory, to say for any threshold the panel's slider
    picks which segments hold the voxels below it (Med3DFMLib.confidence.flag_low_confidence)."""

    labels: np.ndarray
    confidence: np.ndarray
    segments: List[Tuple[int, str]]  # (label value, name)
    voxel_ml: float

    def flags(self, threshold: float) -> Tuple[List[Dict[str, Any]], str]:
        """(rows, one line): the segments holding the voxels below `threshold`, most first."""
        from Med3DFMLib.confidence import describe_flags, flag_low_confidence
        from Med3DFMLib.io.segmentations import SegmentInfo

        infos = [SegmentInfo(value, name, (0.5, 0.5, 0.5), None) for value, name in self.segments]
        rows = flag_low_confidence(self.labels, self.confidence, infos, threshold, self.voxel_ml)
        return rows, describe_flags(rows, threshold)


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
    sample: str = ""  # the one-line description of its sample scan ("" when the entry names none)


def model_rows(listing: Sequence[Mapping[str, Any]], task: Optional[str] = None) -> List[ModelRow]:
    """Rows for the models table from `models list --json`, optionally only one task."""
    from Med3DFMLib.registry.cli import human_size

    rows = []
    for item in listing:
        if task and item.get("task") != task:
            continue
        where = str(item.get("installed", "not installed"))
        rows.append(ModelRow(str(item["id"]), str(item.get("version", "")), str(item.get("task", "")), str(item.get("title", "")),
                             str(item.get("licence", "?")), human_size(float(item.get("size", 0))),
                             where in ("bundled", "cache", "bundled+cache"), where, item.get("path"),
                             str((item.get("sample") or {}).get("description", ""))))
    return rows


# --- Learn from labels: painted segments -> .seg.nrrd, the result -> the painted node ------------------

# Segment names that mean "not the structure" (the library's rule: Med3DFMLib.fewshot.labels).
BACKGROUND_NAMES = frozenset({"background", "bg", "negative"})
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ADAPTER_ATTRIBUTE = "Med3DFM.adapter"


def is_background(name: str) -> bool:
    return name.strip().lower() in BACKGROUND_NAMES


def adapter_id(name: str) -> str:
    """The id the library gives an adapter called `name` (its card's `id`): lower-case, `-` separated."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "adapter"


def adapter_file_name(name: str) -> str:
    return adapter_id(name) + ".safetensors"


def training_summary(record: Mapping[str, Any]) -> str:
    """One line for the status label from the adapt job record."""
    training = record.get("training", {}) or {}
    adapter = record.get("adapter", {}) or {}
    parts = [f"{len(adapter.get('classes', []))} structure(s)"]
    dice = training.get("held_out_dice")
    if isinstance(dice, (int, float)):
        parts.append(f"held-out Dice {dice:.2f}")
    mode = training.get("mode") or (record.get("parameters") or {}).get("mode")
    if mode:
        parts.append(str(mode))
    if isinstance(training.get("steps"), int) and training.get("stopped_by"):
        parts.append(f"{training['steps']} steps")
    if stopped_early(record):
        parts.append("stopped early (best model so far)")
    seconds = (record.get("timings_s") or {}).get("total")
    if isinstance(seconds, (int, float)):
        parts.append(f"{seconds:.0f} s")
    if record.get("feature_cache_hits"):
        parts.append("features from cache")
    return ", ".join(parts)


def stopped_early(record: Mapping[str, Any]) -> bool:
    """Whether an `adapt --mode decoder` job ended before its time budget because the user asked (Cancel)."""
    return ((record.get("training") or {}).get("stopped_by")) == "user"


def common_structures(labelled: Sequence[Tuple[str, Sequence[str]]]) -> List[str]:
    """The structure names shared by every labelled volume ("other patients"), in the first one's order.

    `labelled`: (what to call the volume in a message, its structure names). Every volume must label the
    same structures (matched by name, as `adapt` merges them); otherwise the error names the difference.
    """
    if not labelled:
        raise ValueError("add at least one labelled volume (a volume and the segmentation with its structures)")
    first_label, first = labelled[0]
    names = [n.strip() for n in first]
    for label, other in labelled[1:]:
        others = [n.strip() for n in other]
        missing = [n for n in names if n not in others]
        extra = [n for n in others if n not in names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"has no {', '.join(repr(n) for n in missing)}")
            if extra:
                parts.append(f"has {', '.join(repr(n) for n in extra)} that {first_label} has not")
            raise ValueError(f"every labelled volume must have the same structures (segment names): {label} {' and '.join(parts)}")
    return names


# --- painted segments -> one .seg.nrrd ----------------------------------------------------------------

@dataclass
class PaintedSegment:
    """One segment of the painted node, as a mask on the input volume's grid (k, j, i)."""

    segment_id: str
    name: str
    color: Tuple[float, float, float]
    terminology: str
    mask: np.ndarray

    @property
    def background(self) -> bool:
        return is_background(self.name)


@dataclass
class PaintedLabels:
    labels: np.ndarray  # (k, j, i) on the volume grid; 0 = unlabelled
    segments: List[Dict[str, Any]]  # value, id, name, color, terminology (string)
    structures: List[str]  # names of the structures that will be learned
    skipped: List[str] = field(default_factory=list)  # empty segments, left out


def painted_labels(segments: Sequence[PaintedSegment]) -> PaintedLabels:
    """Merge the painted masks into one label map (what `adapt` reads).

    Empty segments are left out. Background is written first, structures on top (a voxel painted as a
    structure and as background counts as the structure); where two structures overlap the later
    segment wins, as in Slicer's own export to a label map. Errors say what to paint.
    """
    if not segments:
        raise ValueError("the segmentation has no segments: paint the structure on a few slices first")
    shape = segments[0].mask.shape
    for segment in segments:
        if segment.mask.shape != shape:
            raise ValueError(f"segment '{segment.name}' is not on the volume's grid")
    names = [s.name.strip().lower() for s in segments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two segments are named '{duplicates[0]}'; give each segment its own name")
    kept = [s for s in segments if np.any(s.mask)]
    skipped = [s.name for s in segments if not np.any(s.mask)]
    structures = [s for s in kept if not s.background]
    if not structures:
        raise ValueError("no structure is painted (only background or empty segments): paint the structure on a few slices")
    ordered = [s for s in kept if s.background] + structures
    dtype = np.uint8 if len(ordered) < 256 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    infos = []
    for value, segment in enumerate(ordered, start=1):
        labels[np.asarray(segment.mask) > 0] = value
        infos.append({"value": value, "id": segment.segment_id, "name": segment.name, "color": [float(c) for c in segment.color[:3]],
                      "terminology": segment.terminology})
    return PaintedLabels(labels, infos, [s.name for s in structures], skipped)


def write_painted_segmentation(path: Path, painted: PaintedLabels, ijk_to_ras: np.ndarray) -> Path:
    """Write the merged painted labels as a Slicer `.seg.nrrd` on the volume's geometry (the library's writer)."""
    from Med3DFMLib.io.segmentations import SegmentInfo, is_seg_nrrd, write_seg_nrrd_voxels
    from Med3DFMLib.io.terminology import terminology_from_string

    path = Path(path)
    if not is_seg_nrrd(path):
        raise ValueError(f"the painted labels must be written as .seg.nrrd: {path}")
    segments = [SegmentInfo(int(info["value"]), info["name"], info["color"], terminology_from_string(info.get("terminology", "")), info["id"])
                for info in painted.segments]
    voxels = np.ascontiguousarray(painted.labels.transpose(2, 1, 0))  # (k, j, i) -> (i, j, k), as the file stores them
    write_seg_nrrd_voxels(path, voxels, LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float), segments)
    return path


# --- the result -> the painted node -------------------------------------------------------------------

@dataclass
class SegmentUpdate:
    """One segment of the result and where it goes: an existing segment (replaced) or a new one."""

    result_name: str
    target_id: Optional[str]  # None: add as a new segment


def segments_to_update(result_names: Iterable[str], existing: Mapping[str, str], learned: Iterable[str]) -> List[SegmentUpdate]:
    """Which result segments replace which segments of the painted node.

    `existing` maps segment id -> name in the painted node; `learned` are the structure names the job
    learned. Only those come back (background is never replaced; other segments are not touched);
    names are matched case-insensitively.
    """
    wanted = {n.strip().lower() for n in learned if not is_background(n)}
    by_name: Dict[str, str] = {}
    for segment_id, name in existing.items():
        by_name.setdefault(name.strip().lower(), segment_id)
    updates = []
    for name in result_names:
        key = name.strip().lower()
        if key not in wanted or is_background(name):
            continue
        updates.append(SegmentUpdate(name, by_name.get(key)))
    return updates


# --- a result -> a segmentation the user chose (Segment output, Learn from labels) --------------------

def same_structure(name_a: str, terminology_a: str, name_b: str, terminology_b: str) -> bool:
    """One segment name for the other: the same name (case-insensitive, as Slicer's
    GetSegmentIdBySegmentName) and, where both carry a terminology entry, the same codes."""
    from Med3DFMLib.io.terminology import terminology_codes

    if name_a.strip().lower() != name_b.strip().lower():
        return False
    codes_a, codes_b = terminology_codes(terminology_a), terminology_codes(terminology_b)
    return codes_a is None or codes_b is None or codes_a == codes_b


def plan_segment_merge(result: Sequence[Tuple[str, str]], existing: Sequence[Tuple[str, str, str]]) -> List[SegmentUpdate]:
    """Where each result segment goes in a segmentation that already has segments.

    `result`: (name, terminology) of each result segment, in order; `existing`: (id, name,
    terminology) of the node's segments, in order. A result segment replaces the first segment not
    yet replaced that is the same structure (`same_structure`); otherwise it is added (target None).
    Every segment not named in the plan is kept as it is.
    """
    claimed: set = set()
    updates = []
    for name, terminology in result:
        target = next((segment_id for segment_id, other, other_terminology in existing
                       if segment_id not in claimed and same_structure(name, terminology, other, other_terminology)), None)
        if target is not None:
            claimed.add(target)
        updates.append(SegmentUpdate(name, target))
    return updates


@dataclass
class SegmentMerge:
    """What loading a result into a segmentation node did to its segments (names, in order)."""

    replaced: List[str] = field(default_factory=list)  # result segments that replaced a segment of the node
    added: List[str] = field(default_factory=list)  # result segments added as new segments
    kept: List[str] = field(default_factory=list)  # the node's other segments, not touched
    segment_ids: List[str] = field(default_factory=list)  # the ids of the replaced and added segments, in result order

    def summary(self) -> str:
        """One line for the status label, e.g. "replaced anterior hippocampus; added tumour; kept 2 other segments"."""
        parts = []
        if self.replaced:
            parts.append("replaced " + ", ".join(self.replaced))
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.kept:
            parts.append(f"kept {len(self.kept)} other segment{'' if len(self.kept) == 1 else 's'}")
        return "; ".join(parts) or "no segments"


class SegmentOutputs(tuple):
    """What a Segment run made: unpacks as (segmentation node, table node), as it always did, and
    carries `.report`, the SegmentMerge of the segmentation node."""

    report: SegmentMerge
    confidence_node: Any = None  # the confidence overlay, when one was asked for
    flags: str = ""  # one line: the segments holding most low-confidence voxels

    def __new__(cls, segmentation_node: Any, table_node: Any, report: SegmentMerge, confidence_node: Any = None, flags: str = "") -> "SegmentOutputs":
        outputs = super().__new__(cls, (segmentation_node, table_node))
        outputs.report = report
        outputs.confidence_node = confidence_node
        outputs.flags = flags
        return outputs


def adapter_record(adapter: Path) -> Dict[str, Any]:
    """The job record `adapt` writes beside the adapter (`x.safetensors` -> `x.json`)."""
    adapter = Path(adapter)
    path = adapter.with_name(adapter.name[: -len(".safetensors")] + ".json") if adapter.name.endswith(".safetensors") else adapter.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"the job record {path.name} was not written; the job did not finish")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("command") != "adapt":
        raise ValueError(f"{path.name} is not the record of an adapt job")
    return record


def keep_adapter(learned: Path, folder: Path) -> Tuple[Path, Dict[str, Any]]:
    """Copy a job's adapter and its record out of the job folder (deleted afterwards) into `folder`;
    (the kept adapter, its record)."""
    import shutil

    learned = Path(learned)
    record = adapter_record(learned)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = folder / learned.name
    shutil.copyfile(learned, adapter)
    (folder / (learned.name[: -len(".safetensors")] + ".json")).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return adapter, record


# --- installed adapters for the Segment model list ---------------------------------------------------

def installed_models(models_home: Path, task: str = "adapter") -> List[Dict[str, Any]]:
    """Models of one task installed in the model folder (`<home>/models/<id>/<version>/model.json`),
    read without importing the library; newest version of each id only."""
    root = Path(models_home) / "models"
    found: Dict[str, Dict[str, Any]] = {}
    if not root.is_dir():
        return []
    for entry_file in sorted(root.glob("*/*/model.json")):
        try:
            entry = json.loads(entry_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(entry, dict) or entry.get("task") != task or not entry.get("id"):
            continue
        files = entry.get("files") or []
        if not files or not all((entry_file.parent / str(f.get("name", ""))).is_file() for f in files):
            continue
        previous = found.get(entry["id"])
        if previous is None or _version_key(str(entry.get("version", ""))) > _version_key(str(previous.get("version", ""))):
            found[entry["id"]] = entry
    return [found[k] for k in sorted(found)]


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.\-+]", version))


def is_classifier(entry: Mapping[str, Any]) -> bool:
    """A classification adapter (`adapt --task classify`), as opposed to a few-shot segmentation adapter."""
    return entry.get("task") == "adapter" and entry.get("kind") == "classify"


def segment_model_choices(registry_models: Sequence[Mapping[str, Any]], adapters: Sequence[Mapping[str, Any]],
                          all_versions: bool = False) -> List[Tuple[str, str]]:
    """(label, model spec) for the Segment model list: the registry's segmentation models, then learned
    segmentation adapters (classification adapters have their own list).

    The newest version of each id is listed by its id (what `--model ID` runs); `all_versions` adds each
    older one after it as `id@version`, so the newest stays chosen when the list changes."""
    versions: Dict[str, List[Mapping[str, Any]]] = {}  # id -> its entries, ids in registry order
    for entry in registry_models:
        if entry.get("task") == "segment":
            versions.setdefault(str(entry["id"]), []).append(entry)
    choices = []
    for model_id, entries in versions.items():
        entries = sorted(entries, key=lambda e: _version_key(str(e.get("version", ""))), reverse=True)
        title = entries[0].get("title") or model_id
        newest = f", newest: {entries[0].get('version')}" if all_versions else ""
        choices.append((f"{title} ({model_id}{newest})", model_id))
        for older in entries[1:] if all_versions else []:
            spec = f"{model_id}@{older.get('version')}"
            choices.append((f"{older.get('title') or model_id} ({spec}, older version)", spec))
    seen = set(versions)
    for entry in adapters:
        if entry["id"] not in seen and not is_classifier(entry):
            seen.add(entry["id"])
            choices.append((f"{entry.get('title') or entry['id']} (learned: {entry['id']})", str(entry["id"])))
    return choices


def classifier_choices(models: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """(label, model id) for the Classify model list: classification adapters, with their classes."""
    choices = []
    for entry in models:
        if is_classifier(entry):
            classes = " / ".join(str(c) for c in entry.get("classes", []))
            choices.append((f"{entry.get('title') or entry['id']} ({classes})", str(entry["id"])))
    return choices


def segment_names(entry: Optional[Mapping[str, Any]]) -> List[str]:
    """What `explain --target` accepts for a segmentation model or adapter: its label names, in order."""
    if not entry:
        return []
    return [str(label["name"]) for label in sorted(entry.get("labels", []), key=lambda label: int(label.get("value", 0))) if label.get("name")]


def region_labels(segments: Sequence[PaintedSegment]) -> PaintedLabels:
    """The union of the given (visible) segments as one region for `classify --roi`: value 1 inside."""
    kept = [s for s in segments if np.any(s.mask)]
    if not kept:
        raise ValueError("the region segmentation is empty: paint the region, or classify the whole volume")
    mask = np.zeros(kept[0].mask.shape, dtype=np.uint8)
    for segment in kept:
        if segment.mask.shape != mask.shape:
            raise ValueError(f"segment '{segment.name}' is not on the volume's grid")
        mask[np.asarray(segment.mask) > 0] = 1
    info = {"value": 1, "id": "region", "name": "region", "color": [1.0, 1.0, 0.0], "terminology": ""}
    return PaintedLabels(mask, [info], ["region"], [s.name for s in segments if not np.any(s.mask)])


# --- classification and heatmaps -------------------------------------------------------------------

@dataclass
class HeatmapResult:
    """A heatmap file (float .nrrd on the input grid, values 0..1) and the JSON note beside it."""

    path: Path
    note: Dict[str, Any]

    @classmethod
    def from_file(cls, path: Path) -> "HeatmapResult":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"the heatmap {path.name} was not written; the job did not finish")
        return cls(path, read_job_record(record_path_for(path), required="method", what="heatmap note"))

    @property
    def method(self) -> str:
        return str(self.note.get("method", ""))

    @property
    def target(self) -> str:
        return str(self.note.get("target", ""))

    def title(self) -> str:
        """Short text for the node name and the status line, e.g. "gradcam: tumour"."""
        return f"{self.method}: {self.target}" if self.target else self.method


@dataclass
class ClassifyResult(_ModelOfRecord):
    """A finished classify job: one scan's class probabilities, the calibration note, provenance."""

    table: Path
    record: Dict[str, Any]
    comments: List[str]
    classes: List[str]
    probabilities: List[float]
    prediction: str
    heatmap: Optional[HeatmapResult] = None

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, str], table: Path) -> "ClassifyResult":
        table = Path(outputs.get("table") or table)
        comments, columns, rows = read_tsv(table)
        prefix = "probability_"
        classes = [c[len(prefix):] for c in columns if c.startswith(prefix)]
        if not rows or "prediction" not in columns or not classes:
            raise ValueError(f"{table.name} has no classification result")
        row = rows[0]
        prediction = str(row[columns.index("prediction")])
        if prediction.startswith("ERROR"):
            raise ValueError(prediction)
        probabilities = [float(row[columns.index(prefix + c)]) for c in classes]
        heatmap = HeatmapResult.from_file(Path(outputs["heatmap"])) if outputs.get("heatmap") else None
        return cls(table, read_job_record(record_path_for(table)), comments, classes, probabilities, prediction, heatmap)

    @property
    def calibrated(self) -> bool:
        return bool(self.record.get("calibration", {}).get("calibrated"))

    def table_columns(self) -> List[Tuple[str, List[Any]]]:
        """(column name, values) for the table node: one row per class, the prediction marked."""
        return [
            ("class", list(self.classes)),
            ("probability", [round(p, 4) for p in self.probabilities]),
            ("predicted", ["yes" if c == self.prediction else "" for c in self.classes]),
            ("calibrated", ["yes" if self.calibrated else "no"] * len(self.classes)),
            ("model", [self.model_id] * len(self.classes)),
            ("model version", [self.model_version] * len(self.classes)),
        ]

    def summary(self) -> str:
        """One line for the status label, e.g. "mass 0.83 (calibrated)"."""
        best = max(self.probabilities)
        return f"{self.prediction} {best:.2f} ({'calibrated' if self.calibrated else 'not calibrated'})"
