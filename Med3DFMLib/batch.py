"""Batch jobs: `segment` or `classify` over a list of scans (`--list FILE.csv --output-dir DIR`).

The model is loaded once per process. Every scan's outputs are written atomically, then a sidecar
`<output>.done.json` records their sha256, the input's size and mtime and the request; a re-run
skips a scan only when that sidecar, the input and every output still agree and the outputs read
back, and redoes it otherwise (a killed run never leaves a result that looks finished). A scan
that fails (corrupt file, 2D image, outside the model's domain, ...) gets one line in the summary
and the others go on.

Under `torchrun` (one node or several: the global RANK and WORLD_SIZE) rank r takes rows r, r+W,
r+2W, ...; each rank appends its rows to `DIR/.summary.rank<R>.tsv` as it goes (a killed run
leaves a record), and at the end the rows are gathered through the process group and rank 0
writes `DIR/summary.tsv`, one row per scan in list order. The group is gloo even when the scans run
on GPUs (rank r on GPU LOCAL_RANK): it carries only those few rows, and gloo, unlike NCCL, also
works with more processes than GPUs on a node.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
import csv
import datetime as _dt
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from Med3DFMLib.confidence import DEFAULT_MEASURE, DEFAULT_THRESHOLD
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import write_text_atomic
from Med3DFMLib.io.tables import format_tsv, read_list_text, resolve_listed_path
from Med3DFMLib.progress import Progress

SUMMARY = "summary.tsv"
DONE_SUFFIX = ".done.json"
FAILED_EXIT = 3  # the exit code when any scan failed (1 stays "the batch could not run at all")
BARRIER_TIMEOUT_H = 72.0  # ranks wait this long at the end for the slowest one (its shard may be long)
BASE_COLUMNS = ["row", "id", "input", "output", "status", "seconds", "rank", "model"]
TAIL_COLUMNS = ["error", "note", "sha256"]  # note: why a finished scan was redone
_VOLUME_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".tsv", ".json")
CONFIDENCE_ENDING = "_confidence.nii.gz"  # segment --list --confidence: NAME_confidence.nii.gz beside NAME.seg.nrrd
_RANK_FILE = re.compile(r"^\.summary\.rank(\d+)\.tsv$")


# --- the list ------------------------------------------------------------------------------------


@dataclass
class BatchRow:
    index: int  # 0-based position in the list
    where: str  # "scans.csv line 3": what an error names
    id: str
    given: str  # the input as written in the list
    input: Path  # resolved against the list's folder
    relative: str  # the output under the output folder, as a relative POSIX path
    output: Path  # output folder / relative
    roi: Optional[Path] = None


def stem_of(path: Path) -> str:
    """`case_001.nii.gz` → `case_001`; a DICOM folder keeps its name."""
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def read_batch_list(path: Path, output_dir: Path, suffix: str, roi: bool = False) -> List[BatchRow]:
    """Rows of a CSV with a header: `input` (or `image`), optional `output`, `id` (and `roi` for
    classify); other columns are ignored. Blank lines and lines starting with # are skipped.

    Input paths are relative to the CSV's folder; outputs are relative to `output_dir`, end in
    `suffix` and default to the input's stem + `suffix`. Refused (one line, before any work): a
    missing column, an empty list, an empty input cell, an output that does not end in `suffix`,
    leaves `output_dir` or is named twice.
    """
    path = Path(path)
    text = read_list_text(path)
    numbered = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise Med3DFMError(f"{path.name} is empty; it needs a header line (input[,output][,id]) and one row per scan")
    dialect = csv.excel_tab if "\t" in numbered[0][1] and "," not in numbered[0][1] else csv.excel
    reader = csv.reader([line for _, line in numbered], dialect)
    header = [h.strip().lower() for h in next(reader)]
    if "input" in header and "image" in header:
        raise Med3DFMError(f"{path.name} has both an input and an image column; give one")
    column = "input" if "input" in header else "image"
    if column not in header:
        found = ", ".join(h for h in header if h) or "none"
        raise Med3DFMError(f"{path.name} needs an input column in its header line (input[,output][,id]; found: {found})")
    base = path.resolve().parent
    root = Path(output_dir).resolve()
    rows: List[BatchRow] = []
    seen: Dict[str, str] = {}
    for (number, _), cells in zip(numbered[1:], reader):
        where = f"{path.name} line {number}"
        values = {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)}
        given = values.get(column, "")
        if not given:
            raise Med3DFMError(f"{where}: the {column} column is empty")
        source = resolve_listed_path(given, base)
        relative = values.get("output") or stem_of(source) + suffix
        if not relative.lower().endswith(suffix):
            raise Med3DFMError(f"{where}: the output {relative!r} must end in {suffix}")
        if Path(relative).is_absolute() or Path(relative).drive:
            raise Med3DFMError(f"{where}: the output {relative!r} must be a name relative to the output folder, not an absolute path")
        target = (root / relative).resolve()
        if root not in target.parents:
            raise Med3DFMError(f"{where}: the output {relative!r} leaves the output folder {output_dir}")
        relative = target.relative_to(root).as_posix()
        if relative.casefold() == SUMMARY or _RANK_FILE.match(relative):
            raise Med3DFMError(f"{where}: the output {relative!r} is the batch summary's own name")
        key = relative.casefold()  # two names one case-insensitive disk would merge are one output
        if key in seen:
            raise Med3DFMError(f"{where}: the output {relative} is also the output of {seen[key]}; give each row its own output name (an output column)")
        seen[key] = where
        row_roi = resolve_listed_path(values["roi"], base) if roi and values.get("roi") else None
        row_id = values.get("id") or relative[: len(relative) - len(suffix)]
        rows.append(BatchRow(len(rows), where, row_id, given, source, relative, target, row_roi))
    if not rows:
        raise Med3DFMError(f"{path.name} has a header but no rows")
    return rows


# --- what a batch runs -----------------------------------------------------------------------------


class BatchTask(ABC):
    """One command over many scans: `prepare` loads what is shared, `run` does one scan and returns
    its outputs (role → path) and its summary cells, `verify` reads an output back (Med3DFMError)."""

    name = ""
    suffix = ""
    result_columns: List[str] = []
    roi = False

    def prepare(self, progress: Progress) -> None:
        pass

    def request(self) -> Dict[str, Any]:
        """What must be unchanged for a finished scan to be skipped."""
        return {}

    @abstractmethod
    def run(self, row: BatchRow) -> Tuple[Dict[str, Path], Dict[str, str]]:
        """Process one scan: its outputs (role -> path) and its summary cells."""

    def verify(self, path: Path) -> None:
        verify_output(path)

    def files(self, row: BatchRow) -> List[Path]:
        """Every file the row writes: its output, the job record beside it, the completion record."""
        from Med3DFMLib.record import record_path_for

        return [row.output, record_path_for(row.output), done_path(row.output)]


def check_collisions(task: BatchTask, rows: Sequence[BatchRow]) -> None:
    """No two rows may write the same file (`a.seg.nrrd`'s record is `a.json`, ...)."""
    owners: Dict[str, str] = {}
    for row in rows:
        for path in task.files(row):
            key = str(path).casefold()
            if owners.get(key, row.where) != row.where:
                raise Med3DFMError(f"{row.where}: its output {row.relative} would write {path.name}, which {owners[key]} writes too; rename one")
            owners[key] = row.where


def verify_output(path: Path) -> None:
    """Read an output back by its kind; Med3DFMError when it does not read."""
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        from Med3DFMLib.io.segmentations import read_labels

        read_labels(path)
    elif name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise Med3DFMError(f"{path.name} does not read as JSON: {err}") from None
    elif name.endswith(".tsv"):
        if not _tsv_rows(path):
            raise Med3DFMError(f"{path.name} holds no table rows")
    elif name.endswith(".csv"):
        from Med3DFMLib.io.color_table import read_color_table

        try:
            rows = read_color_table(path)
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as err:
            raise Med3DFMError(f"{path.name} does not read as a colour table: {err}") from None
        if len(rows) < 2:
            raise Med3DFMError(f"{path.name} holds no labels")
    else:  # label maps and confidence volumes ("labels": a constant confidence, one certain class, is still a result)
        from Med3DFMLib.io.volumes import read_volume

        read_volume(path, kind="labels")


def _tsv_rows(path: Path) -> List[Dict[str, str]]:
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as err:
        raise Med3DFMError(f"cannot read {path.name}: {err}") from None
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


class SegmentTask(BatchTask):
    name = "segment"
    suffix = ".seg.nrrd"
    result_columns = ["segments"]

    def __init__(self, model: Optional[str], device: str = "auto", overlap: float = 0.25, registry: Optional[str] = None,
                 force: bool = False, labelmaps: bool = False, overwrite: bool = True, accept_licence: bool = False,
                 confidence: bool = False, confidence_measure: str = DEFAULT_MEASURE, flag_below: float = DEFAULT_THRESHOLD,
                 color_table: bool = False, raw_label_names: bool = False, lower_resolution: float = 1.0) -> None:
        """`confidence`, `color_table`: also NAME_confidence.nii.gz and NAME.csv beside each NAME.seg.nrrd
        (what `--confidence FILE` and `--color-table FILE` write for one scan). `lower_resolution`: every
        scan at that many times the model's spacing (run_segment)."""
        self.model, self.device, self.overlap, self.registry = model, device, overlap, registry
        self.force, self.labelmaps, self.overwrite, self.accept_licence = force, labelmaps, overwrite, accept_licence
        self.confidence, self.confidence_measure, self.flag_below = confidence, confidence_measure, flag_below
        self.color_table, self.raw_label_names, self.lower_resolution = color_table, raw_label_names, lower_resolution
        self.segmenters: Dict[Tuple[str, str, float, float], Any] = {}
        self.model_sha256: Optional[str] = None

    def prepare(self, progress: Progress) -> None:
        from Med3DFMLib.inference import choose_device

        choose_device(self.device)  # "--device cuda" without a GPU: refused before any scan
        if self.model is not None:  # an unknown model is refused once, not once per scan
            from Med3DFMLib.registry import resolve_model

            resolved = resolve_model(self.model, registry=self.registry, progress=progress)
            if resolved.card.get("task") not in ("segment", "adapter") or resolved.card.get("kind") == "classify":
                raise Med3DFMError(f"model {resolved.id} is a {resolved.card.get('kind') or resolved.card.get('task')!r} model; `segment` needs a segmentation model or a segmentation adapter")
            self.model_sha256 = resolved.sha256

    def request(self) -> Dict[str, Any]:
        request = {"model": self.model, "model_sha256": self.model_sha256, "overlap": self.overlap, "force": self.force, "labelmaps": self.labelmaps}
        # only what is asked for, so the records of batches run before these options existed still match
        if self.confidence:
            request.update(confidence=self.confidence_measure, flag_below=self.flag_below)
        if self.color_table:
            request["color_table"] = True
        if self.raw_label_names:
            request["raw_label_names"] = True
        if self.lower_resolution != 1.0:
            request["lower_resolution"] = self.lower_resolution
        return request

    def _beside(self, row: BatchRow, ending: str) -> Path:
        return row.output.with_name(row.output.name[: -len(self.suffix)] + ending)

    def labelmap_of(self, row: BatchRow) -> Optional[Path]:
        return self._beside(row, ".nii.gz") if self.labelmaps else None

    def extras_of(self, row: BatchRow) -> Dict[str, Path]:
        """The optional outputs of a row by role: labelmap, confidence, color_table."""
        extras = {"labelmap": self.labelmap_of(row), "confidence": self._beside(row, CONFIDENCE_ENDING) if self.confidence else None,
                  "color_table": self._beside(row, ".csv") if self.color_table else None}
        return {role: path for role, path in extras.items() if path is not None}

    def files(self, row: BatchRow) -> List[Path]:
        return super().files(row) + list(self.extras_of(row).values())

    def run(self, row: BatchRow) -> Tuple[Dict[str, Path], Dict[str, str]]:
        from Med3DFMLib.record import record_path_for
        from Med3DFMLib.segment import run_segment

        extras = self.extras_of(row)
        record = run_segment(row.input, row.output, self.model, device=self.device, labelmap=extras.get("labelmap"), overlap=self.overlap,
                             registry=self.registry, overwrite=self.overwrite, force=self.force, segmenters=self.segmenters,
                             accept_licence=self.accept_licence, confidence=extras.get("confidence"), confidence_measure=self.confidence_measure,
                             flag_below=self.flag_below, color_table=extras.get("color_table"), raw_label_names=self.raw_label_names,
                             lower_resolution=self.lower_resolution)
        outputs = {"segmentation": row.output, "record": record_path_for(row.output), **extras}
        model = f"{record['model']['id']}@{record['model']['version']}"
        return outputs, {"model": model, "segments": ";".join(f"{s['name']}={s['volume_ml']}" for s in record["segments"])}


class ClassifyTask(BatchTask):
    name = "classify"
    suffix = ".tsv"
    result_columns = ["prediction", "probabilities"]
    roi = True

    def __init__(self, model: str, device: str = "auto", registry: Optional[str] = None, prevalence: Optional[Dict[str, float]] = None) -> None:
        self.model, self.device, self.registry, self.prevalence = model, device, registry, prevalence
        self.classifier: Any = None

    def prepare(self, progress: Progress) -> None:
        from Med3DFMLib.classify.job import Classifier

        self.classifier = Classifier.load(self.model, self.registry, self.device, progress)
        if self.prevalence:
            self.classifier.set_prevalence(self.prevalence)  # an impossible prior fails before any scan

    def request(self) -> Dict[str, Any]:
        return {"model_sha256": self.classifier.provenance["sha256"] if self.classifier is not None else None, "prevalence": self.prevalence or None}

    def run(self, row: BatchRow) -> Tuple[Dict[str, Path], Dict[str, str]]:
        from Med3DFMLib.classify.data import ListRow
        from Med3DFMLib.classify.job import run_classify
        from Med3DFMLib.record import record_path_for

        record, _ = run_classify([ListRow(row.where, row.input, roi=row.roi)], self.model, row.output, device_name=self.device, registry=self.registry,
                                 classifier=self.classifier, prevalence=self.prevalence)
        table = _tsv_rows(row.output)  # the summary says what the output holds
        if len(table) != 1:
            raise Med3DFMError(f"{row.output.name} holds {len(table)} rows, expected 1")
        probabilities = ";".join(f"{k[len('probability_'):]}={v}" for k, v in table[0].items() if k.startswith("probability_"))
        model = f"{record['model']['id']}@{record['model']['version']}"
        return {"table": row.output, "record": record_path_for(row.output)}, {"model": model, "prediction": table[0]["prediction"], "probabilities": probabilities}


# --- resuming ------------------------------------------------------------------------------------


def done_path(output: Path) -> Path:
    return output.with_name(output.name + DONE_SUFFIX)


def fingerprint(path: Optional[Path]) -> Optional[Dict[str, Any]]:
    """Path, size and mtime of an input file (a DICOM folder: its files' count, total size, newest mtime)."""
    if path is None:
        return None
    try:
        if path.is_dir():
            stats = [p.stat() for p in path.iterdir() if p.is_file()]
            return {"path": str(path.resolve()), "files": len(stats), "size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
        stat = path.stat()
        return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        return None


def finished(task: BatchTask, row: BatchRow) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the sidecar, "") when the row's outputs are complete and verified, else (None, why not)."""
    from Med3DFMLib.weights import sha256_of

    sidecar = done_path(row.output)
    if not sidecar.is_file():
        return None, ""
    try:
        done = json.loads(sidecar.read_text(encoding="utf-8"))
        outputs = done["outputs"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None, "its record of completion does not read"
    if done.get("command") != task.name or done.get("request") != task.request():
        return None, "the model or settings changed"
    if done.get("input") != fingerprint(row.input) or done.get("roi") != fingerprint(row.roi):
        return None, "the input changed"
    for role, entry in outputs.items():
        path = row.output.parent / entry["path"]
        if not path.is_file():
            return None, f"its {role} output is missing"
        if sha256_of(path) != entry["sha256"]:
            return None, f"its {role} output changed since it was written"
        try:
            task.verify(path)
        except Med3DFMError:
            return None, f"its {role} output does not read"
    return done, ""


def _write_done(task: BatchTask, row: BatchRow, outputs: Dict[str, Path], result: Dict[str, str]) -> Dict[str, Any]:
    from Med3DFMLib.weights import sha256_of

    done = {
        "command": task.name,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": fingerprint(row.input),
        "roi": fingerprint(row.roi),
        "request": task.request(),
        "outputs": {role: {"path": os.path.relpath(path, row.output.parent), "sha256": sha256_of(path)} for role, path in outputs.items()},
        "result": result,
    }
    write_text_atomic(done_path(row.output), json.dumps(done, indent=2) + "\n")
    return done


def process_row(task: BatchTask, row: BatchRow, rank: int) -> Dict[str, Any]:
    """One summary row; a scan that fails is reported, never raised (except a cancel)."""
    started = time.perf_counter()
    cells: Dict[str, Any] = {"row": row.index + 1, "id": row.id, "input": row.given, "output": row.relative, "rank": rank, "note": ""}
    try:
        done, why = finished(task, row)
        if done is not None:
            status = "skipped"
        else:
            cells["note"] = why
            done_path(row.output).unlink(missing_ok=True)  # stale: the outputs no longer look finished
            row.output.parent.mkdir(parents=True, exist_ok=True)
            outputs, result = task.run(row)
            done = _write_done(task, row, outputs, result)
            status = "done"
        cells.update(done["result"], status=status, sha256=next(iter(done["outputs"].values()))["sha256"])
    except Med3DFMError as err:
        cells.update(status="failed", error=_one_line(str(err)))
    except Exception as err:  # a bug or an odd environment on one scan must not lose the others
        cells.update(status="failed", error=_one_line(f"unexpected {type(err).__name__}: {err}"))
    cells["seconds"] = round(time.perf_counter() - started, 2)
    return cells


def _one_line(message: str) -> str:
    return (message.splitlines() or ["failed"])[0]


# --- torchrun --------------------------------------------------------------------------------------


def torchrun_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Group:
    rank: int
    world: int
    owned: bool = False  # this batch initialised the process group (and ends it)

    def gather(self, value: Any) -> List[Any]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values: List[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            self.gather(None)

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def start_group(device_name: str) -> Group:
    """The process group under torchrun (gloo: see the module's note); a rank that runs on CUDA uses
    GPU LOCAL_RANK (modulo the GPUs it sees)."""
    rank, world, local = torchrun_env()
    if world == 1:
        return Group(0, 1)
    if not 0 <= rank < world:
        raise Med3DFMError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    import torch
    import torch.distributed as dist

    from Med3DFMLib.inference import choose_device

    if choose_device(device_name).type == "cuda":
        torch.cuda.set_device(local % torch.cuda.device_count())  # "cuda" in the jobs now means this rank's GPU
    if dist.is_initialized():  # a caller's group (NCCL too: its device is set above)
        return Group(dist.get_rank(), dist.get_world_size())
    dist.init_process_group("gloo", timeout=_dt.timedelta(hours=BARRIER_TIMEOUT_H))
    return Group(rank, world, owned=True)


# --- the batch -------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    rows: List[Dict[str, Any]] = field(default_factory=list)  # every row, in list order (on every rank)
    summary: Optional[Path] = None
    rank: int = 0
    world: int = 1

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    def counts(self) -> str:
        """`4 scans by 2 processes: 3 done, 0 skipped, 1 failed`"""
        ranks = f" by {self.world} processes" if self.world > 1 else ""
        return f"{len(self.rows)} scans{ranks}: " + ", ".join(f"{self.count(s)} {s}" for s in ("done", "skipped", "failed"))

    def line(self) -> str:
        return f"{self.counts()}; summary in {self.summary}"


def columns_of(task: BatchTask) -> List[str]:
    return BASE_COLUMNS + task.result_columns + TAIL_COLUMNS


def run_batch(task: BatchTask, list_path: Path, output_dir: Path, progress: Optional[Progress] = None) -> BatchResult:
    """Run `task` over every row of `list_path` (this rank's share under torchrun); every rank
    returns all rows, rank 0 having written them to `output_dir/summary.tsv`."""
    progress = progress or Progress("none")
    output_dir = Path(output_dir)
    rows = read_batch_list(list_path, output_dir, task.suffix, task.roi)
    check_collisions(task, rows)
    if output_dir.exists() and not output_dir.is_dir():
        raise Med3DFMError(f"--output-dir is a file, not a folder: {output_dir}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Med3DFMError(f"cannot create the output folder {output_dir}: {err.strerror or err}") from None
    if not os.access(output_dir, os.W_OK):
        raise Med3DFMError(f"output folder is not writable: {output_dir}")
    group = start_group(getattr(task, "device", "auto"))
    try:
        return _run_shard(task, rows, output_dir, group, progress if group.rank == 0 else Progress("none"), list_path)
    finally:
        group.close()


def _run_shard(task: BatchTask, rows: List[BatchRow], output_dir: Path, group: Group, progress: Progress, list_path: Path) -> BatchResult:
    problem = ""
    try:
        progress.update("load", 0.0, f"loading the model for {len(rows)} scans")
        task.prepare(progress)
    except Med3DFMError as err:
        problem = str(err)
    problems = [p for p in group.gather(problem) if p]  # one rank unable to start stops them all, with its reason
    if problems:
        raise Med3DFMError(problem or f"another process could not start: {problems[0]}")
    columns = columns_of(task)
    mine = rows[group.rank :: group.world]
    rank_file = output_dir / f".summary.rank{group.rank}.tsv"
    write_text_atomic(rank_file, format_tsv(columns, [], [f"med3dfm {task.name} --list {list_path}: rank {group.rank} of {group.world}, {len(mine)} of {len(rows)} scans"]))
    results: List[Dict[str, Any]] = []
    prefix = f"[rank {group.rank}/{group.world}] " if group.world > 1 else ""
    with open(rank_file, "a", encoding="utf-8") as log:
        for count, row in enumerate(mine):
            progress.update("batch", count / len(mine), f"scan {count + 1} of {len(mine)}: {row.id}")
            cells = process_row(task, row, group.rank)
            results.append(cells)
            log.write(format_tsv(columns, [[cells.get(c, "") for c in columns]]).splitlines()[-1] + "\n")  # the row alone
            log.flush()
            os.fsync(log.fileno())  # a killed run keeps every row finished before it
            progress.update("batch", (count + 1) / len(mine), f"{row.id}: {_describe(cells)}")
            if progress.mode != "json":
                print(f"{prefix}{row.id}: {_describe(cells)}", flush=True)
    gathered = [cells for part in group.gather(results) for cells in part]
    merged = sorted(gathered, key=lambda c: int(c["row"]))
    result = BatchResult(merged, output_dir / SUMMARY, group.rank, group.world)
    if group.rank == 0:
        for stale in output_dir.iterdir():  # rank files of an earlier run with more processes
            match = _RANK_FILE.match(stale.name)
            if match and int(match.group(1)) >= group.world:
                stale.unlink(missing_ok=True)
        comments = [f"med3dfm {task.name} --list {list_path}: {result.counts()}",
                    f"finished {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}"]
        write_text_atomic(result.summary, format_tsv(columns, [[c.get(k, "") for k in columns] for c in merged], comments))
    group.barrier()  # no rank ends (and lets torchrun stop the others) before the summary is written
    progress.update("done", 1.0, result.line(), outputs={"summary": str(result.summary)})
    return result


def _describe(cells: Dict[str, Any]) -> str:
    if cells["status"] == "failed":
        return f"failed: {cells['error']}"
    what = cells.get("segments") or cells.get("prediction") or ""
    note = f" (redone: {cells['note']})" if cells.get("note") and cells["status"] == "done" else ""
    return f"{cells['status']} in {cells['seconds']:.1f} s{note}" + (f": {what}" if what else "")


# --- the command line --------------------------------------------------------------------------------


def add_output_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, help=f"with --list: the folder for every output, {SUMMARY} and the resume records; "
                        "a re-run skips the scans already done (torchrun shares the list among its processes)")


def run_batch_command(task: BatchTask, args: argparse.Namespace, progress: Progress) -> int:
    """`--list FILE.csv --output-dir DIR`: the batch, a one-line count, exit 3 when any scan failed."""
    result = run_batch(task, args.list, args.output_dir, progress)
    failed = result.count("failed")
    if result.rank == 0:
        if progress.mode != "json":
            print(result.line())
        if failed:
            print(f"med3dfm: error: {failed} of {len(result.rows)} scans failed (status failed in {result.summary})", file=sys.stderr)
    return FAILED_EXIT if failed else 0


def check_batch_arguments(args: argparse.Namespace, single_only: Sequence[str], list_alone: bool = False) -> bool:
    """True for a batch (`--list` with `--output-dir`); refuses mixtures with one line. `list_alone`:
    `--list` without `--output-dir` is the command's own (non-batch) list mode."""
    if args.output_dir is None:
        if args.list is not None and not list_alone:
            raise Med3DFMError("--list needs --output-dir DIR (the folder for the outputs and summary.tsv)")
        return False
    if args.list is None:
        raise Med3DFMError("--output-dir goes with --list FILE.csv; for one scan use -o")
    if args.input is not None:
        raise Med3DFMError("give either one scan or --list FILE.csv, not both")
    given = [name for name in single_only if getattr(args, name.lstrip("-").replace("-", "_"), None) not in (None, False)]
    if given:
        raise Med3DFMError(f"{given[0]} is for one scan; with --list every output goes under --output-dir")
    return True
