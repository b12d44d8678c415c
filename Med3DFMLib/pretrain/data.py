"""The unlabelled archive: volumes normalised once, cached compactly, cropped at random per step.

`build_archive` reads every scan (files, DICOM folders, or a list file) with the library's own
reader, resamples it to the pretraining spacing and normalises it by robust percentiles (one rule
for CT and MR, so an archive can mix them), and stores it as 8-bit codes in one `.npz` (no
pickles). Loading runs in a MONAI `CacheDataset` (threads, in memory). Training then draws random
crops with zoom, flips and intensity changes on the training device, seeded by the step number, so
a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from Med3DFMLib.errors import Med3DFMError

# z-scored intensities in [LOW, HIGH] are stored as 0..255
CODE_LOW, CODE_HIGH = -4.0, 6.0
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def find_volumes(source: Path) -> List[Path]:
    """Scan files and DICOM folders under `source` (or listed, one per line, in a text file)."""
    if source.is_file() and source.suffix in (".txt", ".lst", ".csv"):
        base = source.parent
        entries = [line.split(",")[0].strip() for line in source.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return [p if p.is_absolute() else base / p for p in map(Path, entries)]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.lower().endswith(".seg.nrrd"))
        dicom_dirs = sorted(d for d in [source, *(p for p in source.rglob("*") if p.is_dir())] if _is_dicom_folder(d))
        return files + dicom_dirs
    raise Med3DFMError(f"pretraining data must be a folder, a list file or a prepared .npz archive: {source}")


def _is_dicom_folder(folder: Path) -> bool:
    """DICOM files often have no extension: look for the 'DICM' marker at byte 128."""
    for path in sorted(p for p in folder.iterdir() if p.is_file())[:3]:
        with open(path, "rb") as handle:
            handle.seek(128)
            if handle.read(4) == b"DICM":
                return True
    return False


def _looks_like_labels(array: np.ndarray) -> bool:
    """Label maps (few integer values) are not scans; an archive folder often holds both."""
    if not np.issubdtype(array.dtype, np.integer):
        return False
    sample = array.ravel()[:: max(1, array.size // 200_000)]
    return np.unique(sample).size <= 64 and sample.max() - sample.min() < 1000


def _load_normalised(path: Path, spacing: Sequence[float]) -> Dict[str, Any]:
    import SimpleITK as sitk

    from Med3DFMLib.io.volumes import read_volume
    from Med3DFMLib.preprocess import InputSpec, to_model_input

    image = read_volume(path, kind="labels")  # a constant file in the folder is skipped as a label map below, not an error
    if _looks_like_labels(sitk.GetArrayViewFromImage(image)):
        return {"path": str(path), "codes": None}
    spec = InputSpec(spacing=tuple(spacing), intensity={"method": "percentile", "lower": 0.5, "upper": 99.5})
    array, _ = to_model_input(image, spec)
    codes = np.clip(np.round((array - CODE_LOW) / (CODE_HIGH - CODE_LOW) * 255.0), 0, 255).astype(np.uint8)
    return {"path": str(path), "codes": codes}


def build_archive(sources: Sequence[Path], out: Path, spacing: Sequence[float], workers: int = 2) -> Dict[str, Any]:
    """Normalise every scan under `sources` into one `.npz`; returns a summary for the model card."""
    from monai.data import CacheDataset

    from Med3DFMLib.io.atomic import atomic_path

    paths = [p for source in sources for p in find_volumes(Path(source))]
    if not paths:
        raise Med3DFMError(f"no volumes found in {', '.join(map(str, sources))}")
    dataset = CacheDataset(data=paths, transform=lambda p: _load_normalised(Path(p), spacing), num_workers=workers, progress=False)
    items = [dataset[i] for i in range(len(dataset))]
    volumes = [item for item in items if item["codes"] is not None]
    skipped = [item["path"] for item in items if item["codes"] is None]
    if not volumes:
        raise Med3DFMError("none of the files found is a scan (all looked like label maps)")
    shapes = np.array([v["codes"].shape for v in volumes], dtype=np.int64)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                codes=np.concatenate([v["codes"].ravel() for v in volumes]),
                shapes=shapes,
                names=np.array([v["path"] for v in volumes]),
                spacing=np.array(spacing, dtype=np.float64),
            )
    return {"volumes": len(volumes), "skipped_label_maps": len(skipped), "voxels": int(shapes.prod(axis=1).sum()), "spacing_mm": list(spacing)}


@dataclass
class Archive:
    volumes: List[np.ndarray]  # uint8 codes, (z, y, x)
    names: List[str]
    spacing: Tuple[float, float, float]

    @classmethod
    def load(cls, path: Path) -> "Archive":
        if not path.is_file():
            raise Med3DFMError(f"archive not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            shapes = data["shapes"]
            offsets = np.concatenate([[0], np.cumsum(shapes.prod(axis=1))])
            codes = data["codes"]
            volumes = [codes[offsets[i] : offsets[i + 1]].reshape(shapes[i]) for i in range(len(shapes))]
            return cls(volumes, [str(n) for n in data["names"]], tuple(float(s) for s in data["spacing"]))  # type: ignore[arg-type]

    def weights(self, window: int) -> np.ndarray:
        """Sampling weights ∝ the voxels a `window`³ crop of each scan can hold.

        A scan smaller than the window is mostly padding in its crops, so it is drawn in proportion
        to the content it brings (with √voxels, the 200 small hippocampus crops made two thirds of
        the draws, each a 128³ crop of ~99 % padding)."""
        sizes = np.array([min(v.size, window**3) for v in self.volumes], dtype=np.float64)
        return sizes / sizes.sum()


def random_batch(archive: Archive, batch: int, window: int, generator: torch.Generator, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch, 1, window³): augmented random crops determined by `generator`.

    The targets are the crops before the noise is added: noise cannot be predicted from context,
    and per-patch normalisation would blow it up to unit variance in flat patches."""
    probabilities = torch.from_numpy(archive.weights(window))
    inputs, targets = [], []
    for index in torch.multinomial(probabilities, batch, replacement=True, generator=generator).tolist():
        volume = archive.volumes[index]
        zoom = float(torch.empty(1).uniform_(0.8, 1.25, generator=generator))
        size = [max(8, int(round(window * zoom)))] * 3
        starts = [int(torch.randint(0, max(n - s, 0) + 1, (1,), generator=generator)) for n, s in zip(volume.shape, size)]
        crop = volume[tuple(slice(st, st + s) for st, s in zip(starts, size))]
        tensor = torch.from_numpy(np.ascontiguousarray(crop)).to(device).float()
        tensor = tensor / 255.0 * (CODE_HIGH - CODE_LOW) + CODE_LOW
        pad = [p for n, s in zip(reversed(tensor.shape), reversed(size)) for p in (0, max(s - n, 0))]
        tensor = F.pad(tensor, pad, value=float(tensor.min()))
        tensor = F.interpolate(tensor[None, None], size=(window,) * 3, mode="trilinear", align_corners=False)[0]
        for axis in (1, 2, 3):
            if bool(torch.rand(1, generator=generator) < 0.5):
                tensor = tensor.flip(axis)
        scale = float(torch.empty(1).uniform_(0.8, 1.2, generator=generator))
        shift = float(torch.empty(1).uniform_(-0.2, 0.2, generator=generator))
        noise = float(torch.empty(1).uniform_(0.0, 0.1, generator=generator))
        noise_field = torch.randn(tensor.shape, generator=generator).to(device)
        clean = tensor * scale + shift
        targets.append(clean)
        inputs.append(clean + noise * noise_field)
    return torch.stack(inputs), torch.stack(targets)
