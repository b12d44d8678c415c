"""Whole-volume inference: device choice, memory guard, sliding windows with Gaussian blending.

Windows are blended with MONAI's `sliding_window_inference` (Gaussian importance, overlap 0.25 by
default). Before a run, the memory the run will need is estimated and compared with what is free:
a batch of windows is shrunk first, and if even one window does not fit, the run is refused with a
message instead of being killed by the operating system half-way through.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np
import psutil
import torch
from torch import nn

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress
from Med3DFMLib.windows import count_windows, host_bytes_needed, window_bytes_needed

GIB = 1024**3


def choose_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple MPS (Med3DFMLib.devices); asking for a device that is not
    there is an error, not a silent fallback."""
    from Med3DFMLib.devices import best_device_name, mps_available

    if name == "auto":
        return torch.device(best_device_name())
    if name == "cuda":
        if not torch.cuda.is_available():
            raise Med3DFMError("--device cuda was asked for, but no CUDA GPU is available to PyTorch (`med3dfm devices` shows what is)")
        return torch.device("cuda")
    if name == "mps":
        if not mps_available():
            raise Med3DFMError("--device mps was asked for, but Apple's Metal backend is not available to PyTorch here (`med3dfm devices` shows what is)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise Med3DFMError(f"unknown device {name!r}; use auto, cpu, cuda or mps")


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def plan_memory(
    volume_shape: Sequence[int],
    num_classes: int,
    window: Sequence[int],
    device: torch.device,
    batch_size: int = 4,
    host_available: Optional[int] = None,
    device_available: Optional[int] = None,
) -> int:
    """The window batch size that fits, or a Med3DFMError saying how much memory is missing.

    Host memory holds the input, the blended class scores and the count map (float32 each);
    the device holds a batch of windows' activations (and, on CPU, shares the host's memory).
    """
    host_needed = host_bytes_needed(volume_shape, num_classes)
    host_free = available_memory(torch.device("cpu")) if host_available is None else host_available
    if device.type == "cpu":
        device_free = host_free - host_needed
    else:
        device_free = available_memory(device) if device_available is None else device_available
    per_window = window_bytes_needed(window)
    if host_needed > host_free or per_window > device_free:
        where = "GPU" if device.type == "cuda" and host_needed <= host_free else "main"
        needed = host_needed + (per_window if device.type == "cpu" else 0)
        if where == "GPU":
            needed = per_window
        available = host_free if where == "main" else device_free
        coarser = None
        if where == "main":
            from Med3DFMLib.windows import lower_resolution_to_fit

            coarser = lower_resolution_to_fit(volume_shape, num_classes, host_free, per_window if device.type == "cpu" else 0)
        offer = (f", or segment at a coarser resolution, which fits: --lower-resolution {coarser:g} (Slicer offers it)"
                 if coarser else "")
        raise Med3DFMError(
            f"not enough {where} memory for a volume of {tuple(volume_shape)} voxels at the model's spacing: "
            f"needs about {needed / GIB:.1f} GiB, {max(available, 0) / GIB:.1f} GiB available "
            f"(crop the volume, close other programs, or use a machine with more memory{offer})"
        )
    return max(1, min(batch_size, int(device_free // per_window)))


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs that support it (fp16 otherwise); full precision on CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def predict_volume(
    model: nn.Module,
    array: np.ndarray,
    window: Sequence[int],
    device: torch.device,
    overlap: float = 0.25,
    batch_size: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> np.ndarray:
    """Class probabilities (C, z, y, x) for a normalised (z, y, x) volume.

    `window` is in (z, y, x) order. `batch_size` windows go through the model at once (the memory
    plan may lower it); default 16 on a GPU, 4 on the CPU.
    """
    from monai.inferers import sliding_window_inference

    num_classes = int(getattr(model, "num_classes"))
    if batch_size is None:
        batch_size = 16 if device.type == "cuda" else 4
    batch_size = plan_memory(array.shape, num_classes, window, device, batch_size)
    # Blend on the GPU when the class scores fit there with room to spare (much faster than moving
    # every window back to the host); on the host otherwise.
    blend_bytes = int(np.prod(array.shape)) * 4 * (num_classes + 2)
    blend_device = device if device.type == "cuda" and blend_bytes < 0.5 * available_memory(device) else torch.device("cpu")
    total = count_windows(array.shape, window, overlap)
    done = [0]
    model = model.to(device).eval()

    def run_windows(batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(device):
            logits = model(batch.to(device))
        done[0] += batch.shape[0]
        if progress is not None:
            progress.update("infer", done[0] / total, f"window {min(done[0], total)} of {total}")
        return logits.float().softmax(1)

    inputs = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    with torch.inference_mode():
        probabilities = sliding_window_inference(
            inputs,
            roi_size=tuple(int(w) for w in window),
            sw_batch_size=batch_size,
            predictor=run_windows,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=float(array.min()) if array.size else 0.0,
            sw_device=device,
            device=blend_device,
        )
    return probabilities[0].cpu().numpy()
