"""What compute this machine offers a job, asked of PyTorch itself (not guessed from `nvidia-smi` on the PATH).

`med3dfm devices` prints it (the Slicer panel's Copy diagnostics includes it): the torch build (CUDA
version it was built for, cuDNN), each CUDA GPU with its memory, the NVIDIA driver, Apple MPS, the
CPU threads and the RAM. `auto` picks CUDA, then MPS, then the CPU. On MPS, operations that Metal
lacks run on the CPU instead of failing: Med3DFMLib sets PYTORCH_ENABLE_MPS_FALLBACK=1 before torch
is imported (a user's own setting is kept).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

GIB = 1024**3
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")  # Linux; elsewhere torch gives no driver version


def mps_available() -> bool:
    """Apple's Metal backend is built into this torch and usable on this machine."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def best_device_name() -> str:
    """What `--device auto` runs on: CUDA, else Apple MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def nvidia_driver_version(path: Path = NVIDIA_DRIVER_FILE) -> Optional[str]:
    """The loaded NVIDIA kernel driver's version (Linux), e.g. '550.54.15'; None where it cannot be read."""
    try:
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    words = first.split()
    for index, word in enumerate(words):
        if word == "Module" and index + 1 < len(words):  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
            return words[index + 1]
    return None


def _cuda_devices() -> List[Dict[str, Any]]:
    import torch

    devices = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError:  # a GPU another process holds exclusively
            free, total = None, properties.total_memory
        devices.append({"index": index, "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                        "memory_gib": round(total / GIB, 2), "free_gib": None if free is None else round(free / GIB, 2),
                        "bf16": bool(torch.cuda.is_bf16_supported()) if index == 0 else None})
    return devices


def device_report() -> Dict[str, Any]:
    """Everything a user or a bug report needs to know about where a job can run."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    cuda = torch.cuda.is_available()
    return {
        "auto": best_device_name(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,  # None: a CPU-only (or ROCm) build of torch
        "torch_hip_build": getattr(torch.version, "hip", None),
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "cuda_devices": _cuda_devices() if cuda else [],
        "nvidia_driver": nvidia_driver_version(),
        "mps_built": bool(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_built()),
        "mps_available": mps_available(),
        "mps_fallback": os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == "1",
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(memory.total / GIB, 2),
        "ram_available_gib": round(memory.available / GIB, 2),
    }


def describe(report: Dict[str, Any]) -> str:
    """The report as lines a person reads."""
    build = f"CUDA {report['torch_cuda_build']}" if report["torch_cuda_build"] else ("ROCm " + report["torch_hip_build"] if report.get("torch_hip_build") else "CPU only")
    lines = [f"torch {report['torch']} ({build} build" + (f", cuDNN {report['cudnn']})" if report.get("cudnn") else ")")]
    if report["cuda_devices"]:
        for gpu in report["cuda_devices"]:
            free = f", {gpu['free_gib']:.1f} GiB free" if gpu["free_gib"] is not None else ""
            lines.append(f"GPU {gpu['index']}: {gpu['name']} (compute {gpu['capability']}), {gpu['memory_gib']:.1f} GiB{free}")
    else:
        lines.append("no CUDA GPU visible to torch" + (" (this torch was built without CUDA)" if not report["torch_cuda_build"] else ""))
    lines.append(f"NVIDIA driver: {report['nvidia_driver'] or 'not found'}")
    if report["mps_built"]:
        lines.append(f"Apple MPS: {'available' if report['mps_available'] else 'built but not available'}"
                     + (" (CPU fallback for missing operations on)" if report["mps_fallback"] else ""))
    lines.append(f"CPU: {report['cpu']}, {report['cpu_threads']} threads ({report['torch_threads']} used by torch)")
    lines.append(f"RAM: {report['ram_gib']:.1f} GiB, {report['ram_available_gib']:.1f} GiB available")
    lines.append(f"--device auto runs on: {report['auto']}")
    return "\n".join(lines)
