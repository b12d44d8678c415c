"""Whole-volume encoder features, computed once per (volume, encoder) and cached on disk.

The encoder runs on windows whose corners sit on the 16-voxel grid, so every window's feature maps
line up exactly with the whole-volume maps at every stride; overlapping windows are averaged. The
result is a feature pyramid for the whole volume (strides 2, 4, 8, 16 plus the ViT tokens at 16).

The cache key is the sha256 of the normalised model-grid volume (so content, spacing and
normalisation all count) and of the encoder weights. Files are written atomically, so two jobs on
the same volume at once both end with a complete file; the folder is pruned to a size bound,
least recently used first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from Med3DFMLib.inference import autocast_for
from Med3DFMLib.progress import Progress

DEFAULT_CACHE_MB = 2048


@dataclass
class VolumeFeatures:
    """Feature maps (C, d, h, w) per stride for a (D, H, W) model-grid volume padded to `padded`.

    float32 in memory (sampled many times while training); float16 in the disk cache."""

    maps: Dict[int, torch.Tensor]  # stride → features; stride 16 has graph and token channels
    shape: Sequence[int]  # model-grid volume shape before padding
    padded: Sequence[int]


def cache_dir() -> Path:
    from Med3DFMLib.registry import models_home

    return models_home() / "features"


def cache_key(volume: np.ndarray, encoder_sha256: str, window: int) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(volume, dtype=np.float32).tobytes())
    digest.update(str(volume.shape).encode())
    digest.update(encoder_sha256.encode())
    digest.update(str(window).encode())
    digest.update(b"windows fit the volume")  # features of small volumes changed with the shrinking window
    return digest.hexdigest()


def _window_starts(size: int, window: int, step: int) -> List[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def compute_features(encoder: torch.nn.Module, volume: np.ndarray, window: int, device: torch.device, progress: Optional[Progress] = None) -> VolumeFeatures:
    """Run the encoder over the whole (D, H, W) volume with 16-aligned, half-overlapping windows.

    Along an axis shorter than `window` the window shrinks to the volume (rounded up to the
    encoder's multiple): a 35×50×35 mm crop is one 32×48×32 window, not a mostly padded 128³ one.
    """
    multiple = encoder.config.window_multiple
    padded = [int(np.ceil(s / multiple) * multiple) for s in volume.shape]
    windows = [min(window, p) for p in padded]
    padded = [max(p, w) for p, w in zip(padded, windows)]
    data = np.full(padded, float(volume.min()), dtype=np.float32)
    data[tuple(slice(0, s) for s in volume.shape)] = volume
    step = max(multiple, (window // 2) // multiple * multiple)
    starts = [_window_starts(size, w, step) for size, w in zip(padded, windows)]
    corners = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, torch.Tensor] = {}
    encoder = encoder.to(device).eval()
    tensor = torch.from_numpy(data)
    with torch.inference_mode():
        for index, (z, y, x) in enumerate(corners):
            crop = tensor[z : z + windows[0], y : y + windows[1], x : x + windows[2]][None, None].to(device)
            with autocast_for(device):
                out = encoder(crop)
            levels = dict(zip((2, 4, 8, 16), out.pyramid))
            token_map = out.tokens.transpose(1, 2).reshape(1, -1, *out.token_grid)
            levels[16] = torch.cat([levels[16], token_map], dim=1)
            for stride, feature in levels.items():
                feature = feature[0].float().cpu()
                if stride not in sums:
                    sums[stride] = torch.zeros(feature.shape[0], *(p // stride for p in padded))
                    counts[stride] = torch.zeros(1, *(p // stride for p in padded))
                region = (slice(None), slice(z // stride, (z + windows[0]) // stride), slice(y // stride, (y + windows[1]) // stride), slice(x // stride, (x + windows[2]) // stride))
                sums[stride][region] += feature
                counts[stride][region] += 1
            if progress is not None:
                progress.update("features", (index + 1) / len(corners), f"encoder window {index + 1} of {len(corners)}")
    maps = {stride: sums[stride] / counts[stride] for stride in sums}
    return VolumeFeatures(maps, list(volume.shape), padded)


def cached_features(encoder: torch.nn.Module, encoder_sha256: str, volume: np.ndarray, window: int, device: torch.device, progress: Optional[Progress] = None) -> tuple:
    """(features, hit) — from the disk cache when this volume was seen with this encoder."""
    from safetensors.torch import load_file, save_file

    folder = cache_dir()
    key = cache_key(volume, encoder_sha256, window)
    path = folder / f"{key}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            meta = json.loads((folder / f"{key}.json").read_text())
            os.utime(path)  # most recently used
            return VolumeFeatures({int(k): v.float() for k, v in tensors.items()}, meta["shape"], meta["padded"]), True
        except (OSError, ValueError, KeyError):
            pass  # damaged or half-pruned entry: recompute below
    features = compute_features(encoder, volume, window, device, progress)
    # The cache holds float16: round now, so a first round and a cached second round see the same
    # numbers and a fixed seed gives the same adapter.
    features.maps = {stride: m.half().float() for stride, m in features.maps.items()}
    folder.mkdir(parents=True, exist_ok=True)
    from Med3DFMLib.io.atomic import atomic_path, write_text_atomic

    write_text_atomic(folder / f"{key}.json", json.dumps({"shape": list(features.shape), "padded": list(features.padded), "encoder_sha256": encoder_sha256, "window": window, "created": time.time()}))
    with atomic_path(path) as tmp:
        save_file({str(k): v.half().contiguous() for k, v in features.maps.items()}, str(tmp))  # half the disk
    prune_cache(folder)
    return features, False


def prune_cache(folder: Path, limit_mb: Optional[float] = None) -> None:
    """Delete least recently used entries until the folder is under its size bound."""
    limit = float(os.environ.get("MED3DFM_FEATURE_CACHE_MB", DEFAULT_CACHE_MB)) if limit_mb is None else limit_mb
    entries = []
    for path in folder.glob("*.safetensors"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # pruned by another job meanwhile
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit * 1024 * 1024:
            break
        for victim in (path, path.with_suffix(".json")):
            try:
                victim.unlink()
            except FileNotFoundError:
                pass
        total -= size
