"""Where things are (library, resources, models.json, PythonSlicer), how long a job takes, and the
diagnostics text. What must be installed is in dependencies.py."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

# Seconds one 64³ window of the demo-sized encoder takes on two CPU threads (measured with
# `med3dfm segment --device cpu` on hippocampus_014, first window included), and the fixed cost of a
# job: starting Python, importing torch and MONAI, reading the model.
SECONDS_PER_64CUBE_WINDOW_2_THREADS = 2.0
JOB_OVERHEAD_SECONDS = 6.0


def library_root(module_dir: Path) -> Path:
    """The folder that holds `Med3DFMLib/` and `Resources/`.

    Installed extension: the module's own folder (qt-scripted-modules/ holds Med3DFM.py, Med3DFMLib/
    and Resources/). Source checkout (Developer mode, module path = <repo>/Med3DFM): the repository.
    """
    module_dir = Path(module_dir).resolve()
    for candidate in (module_dir, module_dir.parent):
        if (candidate / "Med3DFMLib" / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError(f"Med3DFMLib not found beside {module_dir} or in its parent folder")


def resources_dir(root: Path) -> Path:
    return Path(root) / "Resources"


def ensure_library_importable(module_dir: Path) -> Path:
    """Put the library's parent folder on sys.path (a source checkout needs it) and return it."""
    root = library_root(module_dir)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def python_executable(slicer_home: Optional[str] = None, which: Callable[[str], Optional[str]] = shutil.which) -> str:
    """The interpreter that runs jobs: Slicer's `PythonSlicer` (same packages as Slicer itself).

    Slicer puts its bin folder on PATH, so `which` finds it; otherwise look in <slicerHome>/bin. Outside
    Slicer (tests, a plain Python) the current interpreter is used.
    """
    found = which("PythonSlicer")
    if found:
        return found
    if slicer_home:
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        candidate = Path(slicer_home) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def job_environment(base: Mapping[str, str], root: Path, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a job: the library importable, output unbuffered and UTF-8."""
    env = dict(base)
    paths = [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update(extra)
    return env


def read_registry(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def registry_entry(registry: Mapping[str, Any], model_id: str) -> Optional[Dict[str, Any]]:
    """The newest entry of `model_id` (or `id@version`) in a models.json document."""
    wanted_id, _, wanted_version = model_id.partition("@")
    entries = [m for m in registry.get("models", []) if m.get("id") == wanted_id and (not wanted_version or m.get("version") == wanted_version)]
    if not entries:
        return None

    def version_key(entry: Mapping[str, Any]) -> tuple:
        return tuple(int(p) if p.isdigit() else 0 for p in str(entry.get("version", "0")).split("."))

    return dict(max(entries, key=version_key))


def estimate_cpu_seconds(size: Sequence[int], spacing: Sequence[float], model_input: Mapping[str, Any], overlap: float = 0.25, threads: Optional[int] = None) -> float:
    """Rough CPU run time of a segment job: windows on the model grid × seconds per window + start-up.

    `size`/`spacing` are the volume's (i, j, k) and mm; `model_input` is the registry's `input` block
    (spacing, window). Shown to the user before a CPU run, so it errs on the long side.
    """
    window = model_input.get("window") or [96, 96, 96]
    shape = model_grid_shape(size, spacing, model_input)
    from Med3DFMLib.windows import count_windows  # torch-free; the library sits beside the module

    windows = count_windows(shape, window, overlap)
    threads = threads or os.cpu_count() or 2
    speedup = max(1.0, min(threads, 16) / 2.0) ** 0.8  # threads help, but far from linearly
    per_window = SECONDS_PER_64CUBE_WINDOW_2_THREADS * (float(window[0]) * window[1] * window[2] / 64.0 ** 3) / speedup
    return JOB_OVERHEAD_SECONDS + windows * per_window


def model_grid_shape(size: Sequence[int], spacing: Sequence[float], model_input: Mapping[str, Any]) -> List[int]:
    """The volume's shape on the model's grid (the model resamples every scan to its own spacing)."""
    model_spacing = model_input.get("spacing") or spacing
    return [max(1, int(round(n * s / ms))) for n, s, ms in zip(size, spacing, model_spacing)]


def memory_check(size: Sequence[int], spacing: Sequence[float], model_input: Mapping[str, Any], num_classes: int, on_cpu: bool,
                 available: Optional[int] = None) -> Tuple[int, Optional[int], bool]:
    """(bytes a segment job needs in main memory, bytes available or None if unknown, fits).

    The same arithmetic as the job's own guard (Med3DFMLib.inference.plan_memory): input, class scores
    and count map on the model grid, plus one window's activations when it runs on the CPU. Cropping
    or running the model coarser than its spacing (`lower_resolution_to_fit`) lowers it: the model resamples
    any scan to its own spacing, so a coarser input does not.
    """
    from Med3DFMLib.windows import host_bytes_needed, window_bytes_needed  # torch-free

    needed = host_bytes_needed(model_grid_shape(size, spacing, model_input), num_classes)
    if on_cpu:
        needed += window_bytes_needed(model_input.get("window") or [96, 96, 96])
    if available is None:
        try:
            import psutil
        except ImportError:  # installed with the other requirements on the first run
            return needed, None, True
        available = int(psutil.virtual_memory().available)
    return needed, available, needed <= available


def lower_resolution_to_fit(size: Sequence[int], spacing: Sequence[float], model_input: Mapping[str, Any], num_classes: int, on_cpu: bool,
                            available: int) -> Optional[float]:
    """The factor (× the model's spacing) at which a scan that does not fit in `available` bytes of main
    memory would, as `segment --lower-resolution` runs it; None if even the coarsest does not."""
    from Med3DFMLib.windows import lower_resolution_to_fit as factor_to_fit, window_bytes_needed  # torch-free

    extra = window_bytes_needed(model_input.get("window") or [96, 96, 96]) if on_cpu else 0
    return factor_to_fit(model_grid_shape(size, spacing, model_input), num_classes, available, extra)


def gpu_memory_check(model_input: Mapping[str, Any], report: Mapping[str, Any]) -> Optional[Tuple[int, Optional[int], int, str, bool]]:
    """(bytes one window needs on the GPU, bytes free or None, total bytes, GPU name, fits) for the first
    CUDA GPU of a `med3dfm devices --json` report (free/total from torch.cuda.mem_get_info); None without one.

    The job's own guard (Med3DFMLib.inference.plan_memory): one window's activations must fit in what is
    free; the window batch then grows to what fits, so one window is the need. The scan's size does not
    change it (windows stream through the GPU; the volume stays in main memory)."""
    from Med3DFMLib.windows import window_bytes_needed  # torch-free

    gpus = report.get("cuda_devices") or []
    if not gpus:
        return None
    gpu = gpus[0]
    needed = window_bytes_needed(model_input.get("window") or [96, 96, 96])
    free = None if gpu.get("free_gib") is None else int(float(gpu["free_gib"]) * 1024 ** 3)
    return needed, free, int(float(gpu["memory_gib"]) * 1024 ** 3), str(gpu.get("name", "GPU")), free is None or needed <= free


def describe_bytes(count: int) -> str:
    return f"{count / 1024 ** 3:.1f} GiB" if count >= 1024 ** 3 / 10 else f"{count / 1024 ** 2:.0f} MiB"


def describe_duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {int(round(max(seconds, 1) / 5.0) * 5) or 5} s"
    if seconds < 90 * 60:
        return f"about {int(round(seconds / 60.0))} min"
    return f"about {seconds / 3600.0:.1f} h"


def diagnostics_text(info: Mapping[str, Any], last_job: Optional[Mapping[str, Any]] = None, package_versions: Optional[Mapping[str, Optional[str]]] = None,
                     devices: str = "") -> str:
    """Plain text for the clipboard: what a maintainer needs to understand a problem report.

    `devices`: what `med3dfm devices` printed in the job interpreter (torch build, GPUs, driver, RAM)."""
    lines = ["Med3DFM diagnostics", "==================="]
    base = {
        "platform": platform.platform(),
        "python (Slicer)": sys.version.split()[0],
        "python executable": sys.executable,
    }
    base.update(info)
    width = max(len(k) for k in base)
    lines += [f"{key.ljust(width)} : {value}" for key, value in base.items()]
    if package_versions:
        lines += ["", "Python packages (Slicer's environment)"]
        lines += [f"  {name}: {version or 'not installed'}" for name, version in package_versions.items()]
    if devices:
        lines += ["", "Devices (med3dfm devices, in the job interpreter)"] + ["  " + line for line in devices.rstrip().splitlines()]
    if last_job:
        lines += ["", "Last job"]
        lines.append(f"  command    : {' '.join(str(a) for a in last_job.get('command', []))}")
        lines.append(f"  exit code  : {last_job.get('returncode')}")
        if last_job.get("error"):
            lines.append(f"  error      : {last_job['error']}")
        stderr = (last_job.get("stderr") or "").rstrip()
        if stderr:
            lines += ["  stderr (last lines):"] + ["    " + line for line in stderr.splitlines()[-60:]]
    return "\n".join(lines) + "\n"
