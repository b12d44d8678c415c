"""Background jobs: the `med3dfm` command line of each job, a runner, and its JSON progress lines.

A job is one `PythonSlicer -m Med3DFMLib.cli ...` process. Its stdout carries one JSON object per line
(`--progress json`): {"stage", "fraction", "message", ...}, ending with {"stage": "done", "outputs": ...}
or {"stage": "error", "message": ...}; `models download/import` also print {"result": ...} lines.
Reader threads put the lines on queues; the caller drains them with `poll()` (the Slicer panel from a
QTimer, so the UI never blocks) or waits with `wait()` (scripts and tests).

Each command (segment, adapt, classify, explain, models) has a command builder and a stage table; the
runner, parsing, cancel and clean-up are shared.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

CLI_MODULE = "Med3DFMLib.cli"
DEVICES = ("auto", "cpu", "cuda")
ADAPT_MODES = ("adapter", "prototype")  # adapter: a small trained MLP; prototype: the training-free instant guess
# "Other patients": `adapt --mode decoder --dense --budget-minutes N` on several labelled volumes.
DECODER_KIND = "adapt-decoder"  # the Job kind (its stage table below)
BUDGET_MINUTES_DEFAULT = 3.0
BUDGET_MINUTES_RANGE = (0.5, 120.0)  # what the panel's spin box offers
# Cancel of a job that can stop early: how long it may take to write its best model before it is killed.
STOP_GRACE_S = 60.0
# Windows: start jobs without a console window popping up.
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)

# Where each stage of a command sits in the overall progress bar: stage -> (start, end).
STAGE_SPANS: Dict[str, Dict[str, Tuple[float, float]]] = {
    "segment": {
        "load": (0.0, 0.05),
        "model": (0.05, 0.10),
        "download": (0.10, 0.30),
        "preprocess": (0.30, 0.35),
        "infer": (0.35, 0.90),
        "postprocess": (0.90, 0.95),
        "write": (0.95, 1.0),
        "done": (1.0, 1.0),
    },
    "models": {"download": (0.0, 1.0), "import": (0.0, 1.0), "done": (1.0, 1.0)},  # also `models sample` (a download)
    # `adapt`: encoder features are computed once per image (then cached), training takes most of a
    # CPU run, segmenting the image with the new adapter is quick.
    "adapt": {
        "load": (0.0, 0.05),
        "download": (0.0, 0.05),
        "features": (0.05, 0.30),
        "train": (0.30, 0.92),
        "segment": (0.92, 0.99),
        "done": (1.0, 1.0),
    },
    # `adapt --mode decoder`: training runs for the whole time budget; preparing the volumes and
    # writing the model are short.
    DECODER_KIND: {
        "load": (0.0, 0.04),
        "download": (0.0, 0.04),
        "prepare": (0.04, 0.08),
        "train": (0.08, 0.97),
        "segment": (0.97, 0.99),
        "done": (1.0, 1.0),
    },
    # `classify` (one scan): encoder features dominate; the adapter and the heatmap are quick
    # (occlusion, the slow reference, reports as "explain").
    "classify": {
        "load": (0.0, 0.05),
        "download": (0.0, 0.05),
        "features": (0.05, 0.85),
        "classify": (0.05, 0.9),
        "explain": (0.3, 0.98),
        "done": (1.0, 1.0),
    },
    "explain": {
        "load": (0.0, 0.05),
        "download": (0.0, 0.05),
        "features": (0.05, 0.5),
        "explain": (0.05, 0.98),
        "done": (1.0, 1.0),
    },
}
CLASSIFY_HEATMAPS = ("attention", "gradcam", "occlusion")  # classification adapters
EXPLAIN_METHODS = ("gradcam", "occlusion")  # segmentation models and few-shot adapters


def segment_command(
    python: str,
    input_path: Path,
    output: Path,
    model: str,
    device: str = "auto",
    table: Optional[Path] = None,
    labelmap: Optional[Path] = None,
    registry: Optional[str] = None,
    overwrite: bool = False,
    confidence: Optional[Path] = None,
    flag_below: Optional[float] = None,
    raw_label_names: bool = False,
    lower_resolution: float = 1.0,
) -> List[str]:
    """`PythonSlicer -m Med3DFMLib.cli segment INPUT -o OUT.seg.nrrd ... --progress json`."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if not str(output).lower().endswith(".seg.nrrd"):
        raise ValueError(f"the segmentation output must end in .seg.nrrd: {output}")
    command = [python, "-m", CLI_MODULE, "segment", str(input_path), "-o", str(output), "--model", model, "--device", device]
    if table is not None:
        command += ["--table", str(table)]
    if labelmap is not None:
        command += ["--labelmap", str(labelmap)]
    if confidence is not None:
        command += ["--confidence", str(confidence)]
        if flag_below is not None:
            command += ["--flag-below", f"{flag_below:g}"]
    if raw_label_names:
        command.append("--raw-label-names")
    if lower_resolution != 1.0:
        command += ["--lower-resolution", f"{lower_resolution:g}"]
    if registry:
        command += ["--registry", str(registry)]
    if not overwrite:
        command.append("--no-overwrite")
    return command + ["--progress", "json"]


def devices_command(python: str, as_json: bool = False) -> List[str]:
    """`PythonSlicer -m Med3DFMLib.cli devices [--json]`: torch build, CUDA GPUs (memory from
    torch.cuda.mem_get_info) and driver, Apple MPS, CPU, RAM."""
    return [python, "-m", CLI_MODULE, "devices"] + (["--json"] if as_json else [])


def models_command(python: str, action: str, arguments: Sequence[str] = (), registry: Optional[str] = None) -> List[str]:
    """`PythonSlicer -m Med3DFMLib.cli models ACTION ...`: list --json, download, import, remove, verify, sample."""
    if action not in ("list", "download", "import", "remove", "verify", "sample"):
        raise ValueError(f"unknown models action {action!r}")
    command = [python, "-m", CLI_MODULE, "models", action, *[str(a) for a in arguments]]
    if action in ("list", "verify"):
        command.append("--json")
    if action in ("download", "import", "sample"):
        command += ["--progress", "json"]
    if registry:
        command += ["--registry", str(registry)]
    return command


def adapt_command(
    python: str,
    image: Path,
    labels: Path,
    name: str,
    output: Path,
    mode: str = "adapter",
    device: str = "auto",
    segment: Optional[Path] = None,
    encoder: Optional[str] = None,
    registry: Optional[str] = None,
    seed: Optional[int] = None,
) -> List[str]:
    """`PythonSlicer -m Med3DFMLib.cli adapt --image IMG --labels SEG --name NAME -o ADAPTER ... --progress json`."""
    _check_adapt(name, device, output)
    if mode not in ADAPT_MODES:
        raise ValueError(f"mode must be one of {', '.join(ADAPT_MODES)}, not {mode!r}")
    if not str(labels).lower().endswith(".seg.nrrd"):
        raise ValueError(f"the painted labels must be a .seg.nrrd: {labels}")
    command = [python, "-m", CLI_MODULE, "adapt", "--image", str(image), "--labels", str(labels), "--name", name.strip(),
               "-o", str(output), "--mode", mode, "--device", device]
    if segment is not None:
        if not str(segment).lower().endswith(".seg.nrrd"):
            raise ValueError(f"the segmentation output must end in .seg.nrrd: {segment}")
        command += ["--segment", str(segment)]
    return command + _adapt_options(encoder, registry, seed)


def _check_adapt(name: str, device: str, output: Path) -> None:
    if not name or not name.strip():
        raise ValueError("the new structure needs a name")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if not str(output).endswith(".safetensors"):
        raise ValueError(f"the adapter file must end in .safetensors: {output}")


def _adapt_options(encoder: Optional[str], registry: Optional[str], seed: Optional[int]) -> List[str]:
    """The optional tail both adapt commands share, and JSON progress."""
    options = []
    if encoder:
        options += ["--encoder", str(encoder)]
    if registry:
        options += ["--registry", str(registry)]
    if seed is not None:
        options += ["--seed", str(int(seed))]
    return options + ["--progress", "json"]


def stop_file_for(output: Path) -> Path:
    """The file whose appearance asks a running `adapt --mode decoder` to stop training and write the best
    model so far (the library's rule: the output's name + ".stop")."""
    return Path(str(output) + ".stop")


def decoder_adapt_command(
    python: str,
    pairs: Sequence[Tuple[Path, Path]],
    name: str,
    output: Path,
    budget_minutes: float = BUDGET_MINUTES_DEFAULT,
    device: str = "auto",
    encoder: Optional[str] = None,
    registry: Optional[str] = None,
    seed: Optional[int] = None,
) -> List[str]:
    """"Other patients": `... adapt --image A --labels A.seg.nrrd --image B --labels B.seg.nrrd ... --mode decoder
    --dense --budget-minutes N --name NAME -o ADAPTER --progress json` (labels cover whole volumes)."""
    _check_adapt(name, device, output)
    if not pairs:
        raise ValueError("learning for other patients needs at least one labelled volume")
    try:
        budget = float(budget_minutes)
    except (TypeError, ValueError):
        raise ValueError(f"the time budget must be a number of minutes, not {budget_minutes!r}") from None
    if not budget > 0:
        raise ValueError(f"the time budget must be above 0 minutes (got {budget_minutes})")
    command = [python, "-m", CLI_MODULE, "adapt"]
    for image, labels in pairs:
        if not str(labels).lower().endswith(".seg.nrrd"):
            raise ValueError(f"the labels must be a .seg.nrrd: {labels}")
        command += ["--image", str(image), "--labels", str(labels)]
    command += ["--mode", "decoder", "--dense", "--budget-minutes", f"{budget:g}", "--name", name.strip(), "-o", str(output),
                "--device", device]
    return command + _adapt_options(encoder, registry, seed)


def classify_command(
    python: str,
    image: Path,
    output: Path,
    model: str,
    device: str = "auto",
    roi: Optional[Path] = None,
    heatmap: Optional[Path] = None,
    heatmap_method: str = "attention",
    target: Optional[str] = None,
    registry: Optional[str] = None,
    prevalence: str = "",
) -> List[str]:
    """`PythonSlicer -m Med3DFMLib.cli classify IMG --model M -o OUT.tsv [--roi R] [--heatmap H.nrrd]
    [--prevalence CLASS=P ...] --progress json`; `prevalence` is the panel's text (see parse_prevalence_text)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if not str(output).lower().endswith(".tsv"):
        raise ValueError(f"the result table must end in .tsv: {output}")
    command = [python, "-m", CLI_MODULE, "classify", str(image), "--model", model, "-o", str(output), "--device", device]
    if roi is not None:
        command += ["--roi", str(roi)]
    if heatmap is not None:
        if heatmap_method not in CLASSIFY_HEATMAPS:
            raise ValueError(f"heatmap method must be one of {', '.join(CLASSIFY_HEATMAPS)}, not {heatmap_method!r}")
        if not str(heatmap).lower().endswith(".nrrd") or str(heatmap).lower().endswith(".seg.nrrd"):
            raise ValueError(f"the heatmap must be a float volume ending in .nrrd: {heatmap}")
        command += ["--heatmap", str(heatmap), "--heatmap-method", heatmap_method]
    if target:
        command += ["--target", target]
    for share in parse_prevalence_text(prevalence):
        command += ["--prevalence", share]
    if registry:
        command += ["--registry", str(registry)]
    return command + ["--progress", "json"]


def parse_prevalence_text(text: str) -> List[str]:
    """['mass=0.2'] from the panel's "mass=0.2" (several: "mass=0.2, cyst=0.1"; empty: the training
    prevalence). Checked here so a typing slip is named before any job starts; the classifier
    itself says when a class is not one of its own."""
    shares = []
    for part in re.split(r"[,;]", text or ""):
        if not part.strip():
            continue
        name, sep, number = part.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = float("nan")
        if not sep or not name.strip() or not 0.0 < value < 1.0:
            raise ValueError(f"prevalence {part.strip()!r}: write CLASS=P with P between 0 and 1, e.g. mass=0.2")
        shares.append(f"{name.strip()}={number.strip()}")
    return shares


def explain_command(
    python: str,
    image: Path,
    output: Path,
    model: str,
    target: str,
    method: str = "gradcam",
    device: str = "auto",
    registry: Optional[str] = None,
) -> List[str]:
    """`PythonSlicer -m Med3DFMLib.cli explain IMG --model M --target NAME -o HEAT.nrrd --method ... --progress json`."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if method not in EXPLAIN_METHODS + ("attention",):
        raise ValueError(f"method must be one of {', '.join(EXPLAIN_METHODS)} (or attention for classifiers), not {method!r}")
    if not target or not target.strip():
        raise ValueError("explain needs the name of the segment or class to explain")
    if not str(output).lower().endswith(".nrrd") or str(output).lower().endswith(".seg.nrrd"):
        raise ValueError(f"the heatmap must be a float volume ending in .nrrd: {output}")
    command = [python, "-m", CLI_MODULE, "explain", str(image), "--model", model, "--target", target.strip(), "-o", str(output),
               "--method", method, "--device", device]
    if registry:
        command += ["--registry", str(registry)]
    return command + ["--progress", "json"]


_DICE = re.compile(r"held-out dice\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def held_out_dice(message: str, data: Optional[Mapping[str, Any]] = None) -> Optional[float]:
    """The held-out Dice a "train" progress line reports (a number field, else the message), if it is one."""
    for key in ("held_out_dice", "dice", "val_dice"):
        value = (data or {}).get(key)
        if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
            return float(value)
    match = _DICE.search(message or "")
    if match:
        value = float(match.group(1))
        if 0.0 <= value <= 1.0:  # anything else is not a Dice (e.g. a negative loss score)
            return value
    return None



@dataclass
class JobEvent:
    """One line of a job's stdout, understood."""

    kind: str  # "progress" | "done" | "error" | "result" | "text"
    stage: str = ""
    fraction: float = 0.0
    overall: float = 0.0
    message: str = ""
    data: Dict[str, Any] = field(default_factory=dict)


def parse_progress_line(line: str, command: str = "segment") -> JobEvent:
    """Understand one stdout line; anything that is not a JSON progress object is kept as text."""
    text = line.strip()
    try:
        data = json.loads(text) if text.startswith("{") else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return JobEvent("text", message=text)
    if "stage" not in data:
        if "result" in data:
            return JobEvent("result", stage=str(data["result"]), message=str(data.get("id", "")), data=data)
        return JobEvent("text", message=text, data=data)
    stage = str(data["stage"])
    try:
        fraction = min(max(float(data.get("fraction", 0.0)), 0.0), 1.0)
    except (TypeError, ValueError):
        fraction = 0.0
    message = str(data.get("message", ""))
    if stage == "error":
        return JobEvent("error", stage, 1.0, 1.0, message, data)
    if stage == "done":
        return JobEvent("done", stage, 1.0, 1.0, message, data)
    start, end = STAGE_SPANS.get(command, {}).get(stage, (0.0, 1.0))
    return JobEvent("progress", stage, fraction, start + (end - start) * fraction, message, data)


class Med3DFMJobError(RuntimeError):
    """A job failed or was refused: a one-line message for the user, the job's error output as details."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


@dataclass
class JobResult:
    command: List[str]
    returncode: Optional[int]
    cancelled: bool
    outputs: Dict[str, str]
    error: Optional[str]
    stderr: str
    stdout_text: List[str]
    results: List[Dict[str, Any]]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled and self.error is None

    def as_dict(self) -> Dict[str, Any]:
        return {"command": self.command, "returncode": self.returncode, "cancelled": self.cancelled,
                "error": self.error, "stderr": self.stderr, "outputs": self.outputs, "seconds": round(self.seconds, 2)}


class Job:
    """One background process running the library's CLI, with progress, cancel and a temporary folder.

    `temp_dir` (created by the caller, holding the job's inputs and outputs) is removed by `cleanup()`.
    `stop_file`: a job that can end early and still write its result (`adapt --mode decoder`): Cancel
    (`stop_or_cancel()`) creates this file and gives the job `stop_grace_s` seconds to finish on its own;
    `poll()` kills it only if it has not ended by then.
    """

    STDERR_LINES_KEPT = 400

    def __init__(self, command: Sequence[str], kind: str = "segment", env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, temp_dir: Optional[Path] = None, stop_file: Optional[Path] = None,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
        self.command = [str(c) for c in command]
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.stop_grace_s = float(stop_grace_s)
        self.stop_requested_at: Optional[float] = None
        self.kind = kind
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.temp_dir = Path(temp_dir) if temp_dir is not None else None
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self.events: List[JobEvent] = []
        self.context: Dict[str, Any] = {}  # what the caller needs to turn outputs into nodes
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._stderr: Deque[str] = collections.deque(maxlen=self.STDERR_LINES_KEPT)
        self._threads: List[threading.Thread] = []
        self._stdout_closed = False
        self._started = 0.0
        self._finished_at: Optional[float] = None
        self._outputs: Dict[str, str] = {}
        self._error: Optional[str] = None
        self._results: List[Dict[str, Any]] = []
        self._text: List[str] = []

    # --- running ---------------------------------------------------------------------------

    def start(self) -> "Job":
        kwargs: Dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1)
        if os.name == "nt":
            # no console window; own process group so that Cancel reaches the whole tree
            kwargs["creationflags"] = NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        self._started = time.monotonic()
        self.process = subprocess.Popen(self.command, **kwargs)
        self._threads = [
            threading.Thread(target=self._read_stdout, name="Med3DFM job stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="Med3DFM job stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line.rstrip("\r\n"))

    @property
    def running(self) -> bool:
        return self.process is not None and (self.process.poll() is None or not self._stdout_closed)

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.poll() is not None and self._stdout_closed

    def poll(self) -> List[JobEvent]:
        """Events that arrived since the last call; never blocks."""
        new: List[JobEvent] = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._stdout_closed = True
                continue
            if not line.strip():
                continue
            event = parse_progress_line(line, self.kind)
            if event.kind == "done":
                self._outputs = {str(k): str(v) for k, v in (event.data.get("outputs") or {}).items()}
            elif event.kind == "error":
                self._error = event.message or "the job failed"
            elif event.kind == "result":
                self._results.append(event.data)
            elif event.kind == "text":
                self._text.append(event.message)
            new.append(event)
        self.events.extend(new)
        if self.stop_overdue:
            self.cancel()
            self._error = f"the job did not stop within {self.stop_grace_s:.0f} s and was ended"
        if self.finished and self._finished_at is None:
            for thread in self._threads:
                thread.join(timeout=5)
            self._finished_at = time.monotonic()
        return new

    def wait(self, timeout: Optional[float] = None, on_event: Optional[Callable[[JobEvent], None]] = None, interval: float = 0.1) -> "JobResult":
        """Block until the job ends (scripts, tests); a timeout cancels it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self.finished:
                self.poll()
                return self.result()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                self._error = f"the job took longer than {timeout:.0f} s and was stopped"
            time.sleep(interval)

    @property
    def can_stop_early(self) -> bool:
        """Whether Cancel keeps the best result so far (the job has a stop file)."""
        return self.stop_file is not None

    @property
    def stopping(self) -> bool:
        """A stop was asked for and the job is still finishing on its own."""
        return self.stop_requested_at is not None and not self.cancelled and not self.finished

    @property
    def stop_overdue(self) -> bool:
        """A stop was asked for more than `stop_grace_s` ago and the process still runs."""
        return (self.stop_requested_at is not None and not self.cancelled and self.process is not None
                and self.process.poll() is None and time.monotonic() - self.stop_requested_at > self.stop_grace_s)

    def request_stop(self) -> bool:
        """Create the stop file (the job ends early and writes its best result); False if the job has none."""
        if self.stop_file is None:
            return False
        if self.process is None or self.process.poll() is not None:
            return True  # already ended: nothing to ask
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.touch()
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        return True

    def stop_or_cancel(self) -> bool:
        """What Cancel does: a job with a stop file is asked to stop and keep its best result (True); any
        other job, or one asked before (a second Cancel), is killed (False)."""
        if self.stop_requested_at is None and self.request_stop():
            return True
        self.cancel()
        return False

    def cancel(self) -> None:
        """End the process and everything it started."""
        if self.process is None or self.process.poll() is not None:
            return
        self.cancelled = True
        kill_process_tree(self.process)

    # --- outcome ---------------------------------------------------------------------------

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr)

    def error_message(self) -> Optional[str]:
        if self.cancelled:
            return self._error or "cancelled"
        if self._error:
            return self._error
        code = self.process.returncode if self.process is not None else None
        if code not in (0, None):
            for line in reversed(self._stderr):
                if "error:" in line:
                    return line.split("error:", 1)[1].strip()
            tail = [line for line in self._stderr if line.strip()]
            return tail[-1].strip() if tail else f"the job ended with exit code {code}"
        return None

    def result(self) -> JobResult:
        code = self.process.returncode if self.process is not None else None
        end = self._finished_at or time.monotonic()
        return JobResult(list(self.command), code, self.cancelled, dict(self._outputs), self.error_message(),
                         self.stderr, list(self._text), list(self._results), end - self._started)

    def cleanup(self) -> None:
        """Remove the job's temporary folder (inputs, outputs, record)."""
        if self.temp_dir is not None and self.temp_dir.exists():
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def run_to_end(command: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = 120.0) -> Tuple[subprocess.CompletedProcess, Dict[str, Any]]:
    """Run a short job to its end without progress (`models list/remove/import`): the finished process,
    and what diagnostics remember of it (command, exit code, error output, its last line as the error)."""
    kwargs: Dict[str, Any] = {"creationflags": NO_WINDOW} if os.name == "nt" else {}
    completed = subprocess.run(list(command), env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout, **kwargs)
    error = None if completed.returncode == 0 else (completed.stderr.strip().splitlines() or ["failed"])[-1]
    return completed, {"command": list(command), "returncode": completed.returncode, "stderr": completed.stderr, "error": error}


def device_report(lines: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The report of a finished `devices --json` job from its stdout lines; None when they are not one."""
    try:
        report = json.loads("\n".join(lines))
    except ValueError:
        return None
    return report if isinstance(report, dict) and "cuda_devices" in report else None


def imported_model_path(stdout: str) -> Optional[Path]:
    """Where `models import` installed the model, from its {"result": "imported", "path": ...} line."""
    for line in stdout.splitlines():
        event = parse_progress_line(line, "models")
        if event.kind == "result" and event.stage == "imported" and event.data.get("path"):
            return Path(event.data["path"])
    return None


def kill_process_tree(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """Kill a process and all its descendants (psutil if present, else the process group)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(process.pid)
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    if os.name != "nt":
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        process.kill()
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
