"""What every training loop of the library shares: the torchrun process group, the AdamW state as
flat named tensors (safetensors stores flat tensors only, and checkpoints are never pickles), and
the stop request (Ctrl-C, SIGTERM, Slicer's Cancel) that ends a run cleanly with its best model."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


def distributed() -> Tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment, initialising the process group
    (NCCL on GPUs, gloo on CPU) when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def flatten_optimizer(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, Any]]]:
    """An optimiser's `state_dict()` as ({"<param index>.<key>": tensor}, param_groups)."""
    tensors: Dict[str, torch.Tensor] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def unflatten_optimizer(tensors: Dict[str, torch.Tensor], groups: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The inverse of `flatten_optimizer`: a dict `Optimizer.load_state_dict` accepts."""
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}


class StopRequest:
    """True once the user asked training to stop: SIGINT / SIGTERM (then the loop saves and stops
    instead of dying mid-step), a `should_stop()` callback, or a stop file (what Slicer's Cancel
    writes, so the job ends with the best model so far; removed on exit)."""

    def __init__(self, stop_file: Optional[Path] = None, callback: Optional[Callable[[], bool]] = None) -> None:
        self.stop_file, self.callback = stop_file, callback
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(number).name

    def __exit__(self, *_exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        if self.stop_file is not None:
            try:
                self.stop_file.unlink()
            except FileNotFoundError:
                pass

    def __call__(self) -> bool:
        return (self.signal_name is not None or (self.callback is not None and self.callback())
                or (self.stop_file is not None and self.stop_file.exists()))
