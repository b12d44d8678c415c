"""Synthetic MR images from label maps alone, on the fly: the SynthSeg recipe (Billot et al.,
Medical Image Analysis 2023) written in torch.

One `SynthGenerator.sample()` draws, from one of the label maps held in memory:

1. space: a random affine (per-axis scaling, rotation, shear, translation), a left/right flip that
   also swaps the sided labels, and an elastic deformation (a stationary velocity field drawn on a
   coarse grid, upsampled and integrated by scaling and squaring, so it is smooth and invertible),
   all as one sampling grid over a random crop; the label map is resampled through it by nearest
   neighbour (`grid_sample`);
2. optionally a skull-stripped look: the extra-cerebral labels become background, and the image is
   0 outside the brain at the end;
3. contrast: a Gaussian per intensity class, its mean and std drawn at random (uniform ranges,
   classes shared by e.g. left and right white matter) or, for a share of the samples, from the T1
   priors (a normal prior per T1 tissue class); each voxel gets mean + std * N(0, 1) of its label;
4. acquisition: a small partial-volume blur, a smooth multiplicative bias field (a coarse 4^3
   normal field, exponentiated), a random acquisition resolution (isotropic, or one thick axis):
   blur by the slice thickness (FWHM), resample down to that spacing, add noise there, resample
   back; then clip at 0, normalise to [0, 1] and apply a random gamma;
5. optionally a partial field of view (a slab along one axis; image and labels 0 outside);
6. labels mapped to the output label set (everything else 0).

Everything happens at the target spacing (e.g. 2 mm): the label maps are resampled once at load
(block mode for integer factors, else nearest neighbour) and kept as uint8 indices, in LPS
orientation, arrays in (z, y, x) order like the rest of the library. Deterministic given the seed:
scalars come from one numpy Generator and fields from one torch Generator, both seeded from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from Med3DFMLib.synth.labels import (
    SYNTHSEG_OUTPUT_LABELS,
    SYNTHSEG_OUTPUT_MERGES,
    LabelTable,
    load_label_table,
    make_label_table,
)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.355

Triple = Tuple[float, float, float]
LabelMapInput = Union[str, Path, sitk.Image, np.ndarray]


@dataclass(frozen=True)
class SynthConfig:
    """The ranges of the random draws. Defaults follow SynthSeg's (`brain_generator.py`,
    `labels_to_image_model.py`) where it has one. Lengths in mm, arrays in (z, y, x) order.
    Setting a range's upper end to 0 (or a probability to 0) turns that step off; `no_augmentation()`
    gives a config with every step off."""

    # grid
    target_spacing: Union[float, Triple] = 2.0
    """mm of the output voxels; the label maps are resampled to it once, at load."""
    crop_shape: Optional[Union[int, Tuple[int, int, int]]] = 96
    """output size in voxels (a random crop over the head); None = the whole resampled map."""

    # space
    flip_probability: float = 0.5
    """left/right mirror (array axis x of the LPS grid), sided labels swapped."""
    scaling: float = 0.2
    """per-axis anatomy scale factor drawn in U(1 - scaling, 1 + scaling) (SynthSeg 0.2)."""
    rotation_deg: float = 15.0
    """per-axis rotation angle in U(-r, r) degrees."""
    shear: float = 0.012
    """the 6 off-diagonal shear coefficients in U(-shear, shear)."""
    translation_mm: float = 0.0
    """extra shift in U(-t, t) mm per axis, on top of the random crop's own placement."""
    elastic_std_mm: float = 4.0
    """the elastic velocity field's std is drawn in U(0, this) mm (SynthSeg nonlin_std 4 voxels at 1 mm)."""
    elastic_spacing_mm: float = 16.0
    """node spacing of the coarse velocity field (SynthSeg: 1/16 of a 1 mm map)."""
    elastic_steps: int = 7
    """scaling-and-squaring steps of the integration."""

    # contrast
    mean_range: Tuple[float, float] = (25.0, 225.0)
    """random contrast: a class's mean in U(lo, hi) (SynthSeg's default prior_means)."""
    std_range: Tuple[float, float] = (5.0, 25.0)
    """random contrast: a class's std in U(lo, hi) (SynthSeg's default prior_stds)."""
    t1_prior_probability: float = 0.2
    """share of samples whose contrast comes from the T1 priors (when the label table has them)."""
    prior_truncation: float = 3.0
    """T1 draws are the prior mean + prior std * N(0,1) clipped to +-this, and then to >= 0."""

    # acquisition
    partial_volume_sigma: Tuple[float, float] = (0.0, 0.5)
    """isotropic Gaussian blur, sigma in U(lo, hi) output voxels (partial volume at the output grid)."""
    bias_std: float = 0.5
    """bias field: N(0, s) on a coarse grid, s in U(0, bias_std), upsampled, exp (SynthSeg 0.5)."""
    bias_shape: int = 4
    """coarse bias grid, nodes per axis."""
    resolution_probability: float = 0.95
    """share of samples acquired at a coarser resolution (SynthSeg: 1 - prob_min = 0.95)."""
    isotropic_probability: float = 0.1
    """of those: an isotropic spacing in U(target, max_spacing_iso) (SynthSeg prob_iso 0.1); else one
    random axis gets U(target, max_spacing_aniso) and the others stay at the target spacing."""
    max_spacing_iso: float = 4.0
    max_spacing_aniso: float = 8.0
    """slice thickness is drawn in U(target, spacing) per axis; the blur's FWHM is that thickness."""
    noise_std: float = 5.0
    """white noise, std in U(0, noise_std) on the 0-255 intensity scale, added at the acquisition grid."""
    gamma_std: float = 0.5
    """after normalising to [0, 1]: x ** exp(N(0, gamma_std)) (SynthSeg 0.5)."""
    normalise: bool = True
    """clip at 0 and divide by the maximum; gamma needs it. False keeps the raw 0-255-like scale,
    negative values (a dark class's Gaussian tail, noise) included."""

    # field of view and brain extraction
    skull_strip_probability: float = 0.5
    """extra-cerebral labels become background and the image is 0 outside the brain."""
    fov_probability: float = 0.0
    """a partial field of view: only a slab along one random axis is imaged (image, labels 0 outside)."""
    fov_min_fraction: float = 0.5
    """the slab covers U(min, 1) of the crop along that axis."""

    # targets
    output_labels: Optional[Tuple[int, ...]] = SYNTHSEG_OUTPUT_LABELS
    """label values kept in the returned label map (others 0 unless merged); None keeps all."""
    output_merges: Mapping[int, int] = field(default_factory=lambda: dict(SYNTHSEG_OUTPUT_MERGES))
    """generation label -> output label, for labels not in output_labels (lesions -> white matter)."""

    def __post_init__(self) -> None:
        spacing = _triple(self.target_spacing, "target_spacing")
        if min(spacing) <= 0:
            raise ValueError("target_spacing must be positive")
        if self.crop_shape is not None:
            crop = _triple(self.crop_shape, "crop_shape")
            if min(crop) < 2 or any(int(c) != c for c in crop):
                raise ValueError("crop_shape must be whole numbers of voxels, at least 2")
        probabilities = ("flip_probability", "t1_prior_probability", "resolution_probability",
                         "isotropic_probability", "skull_strip_probability", "fov_probability")
        for name in probabilities:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        non_negative = ("scaling", "rotation_deg", "shear", "translation_mm", "elastic_std_mm", "bias_std",
                        "noise_std", "gamma_std", "prior_truncation")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scaling >= 1:
            raise ValueError("scaling must be < 1 (a scale factor must stay positive)")
        for name in ("mean_range", "std_range", "partial_volume_sigma"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        if self.elastic_spacing_mm <= 0 or self.elastic_steps < 0 or self.bias_shape < 2:
            raise ValueError("elastic_spacing_mm > 0, elastic_steps >= 0 and bias_shape >= 2 are required")
        if not 0 < self.fov_min_fraction <= 1:
            raise ValueError("fov_min_fraction must lie in (0, 1]")

    @classmethod
    def no_augmentation(cls, **overrides: Any) -> "SynthConfig":
        """Every random step off: labels go through unchanged (bar the crop) and each class's
        voxels are its Gaussian, nothing else. Pass keyword overrides to turn steps back on."""
        off: Dict[str, Any] = dict(
            flip_probability=0.0, scaling=0.0, rotation_deg=0.0, shear=0.0, translation_mm=0.0,
            elastic_std_mm=0.0, t1_prior_probability=0.0, partial_volume_sigma=(0.0, 0.0), bias_std=0.0,
            resolution_probability=0.0, noise_std=0.0, gamma_std=0.0, normalise=False,
            skull_strip_probability=0.0, fov_probability=0.0,
        )
        off.update(overrides)
        return cls(**off)

    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["output_merges"] = dict(self.output_merges)
        return out


def _triple(value: Union[float, Sequence[float]], name: str) -> Triple:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (float(value),) * 3  # type: ignore[return-value]
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or three (z, y, x), got {value!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------- loading


def _as_lps_array(item: LabelMapInput, array_spacing: Triple) -> Tuple[np.ndarray, Triple, str]:
    """(z, y, x) array in LPS orientation, its spacing (z, y, x), and a name for messages."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"label map not found: {path}")
        item, name = sitk.ReadImage(str(path)), path.name
    else:
        name = type(item).__name__
    if isinstance(item, sitk.Image):
        if item.GetDimension() != 3 or item.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{name}: a label map must be a 3-D scalar image, got {item.GetDimension()}-D")
        direction = np.array(item.GetDirection()).reshape(3, 3)
        if not np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=1e-3):
            raise ValueError(f"{name}: oblique label maps are not supported (the direction is not axis-aligned)")
        oriented = sitk.DICOMOrient(item, "LPS")
        array = sitk.GetArrayFromImage(oriented)
        spacing = tuple(float(s) for s in reversed(oriented.GetSpacing()))
        return array, spacing, name  # type: ignore[return-value]
    if isinstance(item, np.ndarray):
        if item.ndim != 3:
            raise ValueError(f"a label map must be a 3-D array (z, y, x), got shape {item.shape}")
        if item.dtype.kind not in "iuf":
            raise ValueError(f"a label map must hold integers, got dtype {item.dtype}")
        return item, array_spacing, f"array {item.shape}"
    raise ValueError(f"a label map must be a path, a SimpleITK image or a 3-D numpy array, got {type(item).__name__}")


def _block_mode(index: np.ndarray, factors: Tuple[int, int, int], n_labels: int) -> np.ndarray:
    """Most frequent index in each factors-sized block (ties: the lowest index); pads with 0."""
    shape = [int(math.ceil(s / f)) * f for s, f in zip(index.shape, factors)]
    padded = np.zeros(shape, dtype=np.uint8)
    padded[: index.shape[0], : index.shape[1], : index.shape[2]] = index
    out_shape = [s // f for s, f in zip(shape, factors)]
    fz, fy, fx = factors
    out = np.empty(out_shape, dtype=np.uint8)
    rows_per_chunk = max(1, 4_000_000 // max(1, out_shape[1] * out_shape[2] * n_labels))  # ~32 MB of counts
    for z0 in range(0, out_shape[0], rows_per_chunk):
        z1 = min(out_shape[0], z0 + rows_per_chunk)
        block = padded[z0 * fz: z1 * fz].reshape(z1 - z0, fz, out_shape[1], fy, out_shape[2], fx)
        block = block.transpose(0, 2, 4, 1, 3, 5).reshape(-1, fz * fy * fx).astype(np.int64)
        rows = np.arange(block.shape[0])[:, None]
        counts = np.bincount((rows * n_labels + block).ravel(), minlength=block.shape[0] * n_labels)
        out[z0:z1] = counts.reshape(-1, n_labels).argmax(axis=1).reshape(z1 - z0, out_shape[1], out_shape[2])
    return out


def resample_index_map(index: np.ndarray, spacing: Triple, target: Triple, n_labels: int) -> np.ndarray:
    """A label-index map from `spacing` to `target` spacing (mm, z y x), same field of view:
    block mode where target/spacing is a whole number on every axis, else nearest neighbour."""
    ratios = [t / s for s, t in zip(spacing, target)]
    if all(abs(r - 1) < 1e-6 for r in ratios):
        return index
    if all(r >= 1 and abs(r - round(r)) < 1e-6 for r in ratios):
        return _block_mode(index, tuple(int(round(r)) for r in ratios), n_labels)  # type: ignore[arg-type]
    axes = []
    for n, s, t in zip(index.shape, spacing, target):
        n_out = max(1, int(round(n * s / t)))
        centres = (np.arange(n_out) + 0.5) * t / s - 0.5  # voxel centres, same field of view
        axes.append(np.clip(np.floor(centres + 0.5).astype(np.int64), 0, n - 1))
    return index[np.ix_(*axes)]


@dataclass
class _LabelMap:
    index: torch.Tensor   # (D, H, W) uint8 indices into the label table, at the target spacing
    centre_mm: np.ndarray  # (3,) head bounding-box centre, mm from the array centre (z, y, x)
    extent_mm: np.ndarray  # (3,) head bounding-box size, mm
    name: str


# --------------------------------------------------------------------------- image operations


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, D, H, W) tensor, sigma per axis in voxels (edges
    replicated, kernel cut at 3 sigma). Shift-and-add along each axis: on one CPU thread several
    times faster than conv3d with a (k, 1, 1) kernel."""
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.05:
            continue
        kernel = _gaussian_kernel(float(sigma)).tolist()
        radius = (len(kernel) - 1) // 2
        length = volume.shape[2 + axis]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        padded = F.pad(volume, pad, mode="replicate")
        out = padded.narrow(2 + axis, 0, length) * kernel[0]
        for k in range(1, len(kernel)):
            out.add_(padded.narrow(2 + axis, k, length), alpha=kernel[k])
        volume = out
    return volume


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------- the generator


class SynthGenerator:
    """Synthetic (image, labels) pairs from whole-head label maps, on the fly.

    `label_maps`: paths, SimpleITK images or 3-D numpy arrays (z, y, x; assumed LPS, at
    `array_spacing` mm). `table`: the label table (`load_label_table`); without one, every value
    found in the maps is its own intensity class, with no T1 priors and no sides. A value that is
    not in the table, a map that is not 3-D, or an empty list raises ValueError.
    """

    def __init__(self, label_maps: Sequence[LabelMapInput], config: Optional[SynthConfig] = None, seed: int = 0,
                 *, table: Optional[LabelTable] = None, array_spacing: Union[float, Triple] = 1.0) -> None:
        self.config = config or SynthConfig()
        if isinstance(label_maps, (str, Path, sitk.Image, np.ndarray)):
            label_maps = [label_maps]  # type: ignore[list-item]
        if len(label_maps) == 0:
            raise ValueError("SynthGenerator needs at least one label map")
        spacing_in = _triple(array_spacing, "array_spacing")
        loaded = [_as_lps_array(item, spacing_in) for item in label_maps]
        if table is None:
            values = np.unique(np.concatenate([np.unique(a) for a, _, _ in loaded])).astype(np.int64)
            if values.min() < 0:
                raise ValueError("label values must be non-negative")
            values = np.union1d([0], values)
            table = make_label_table(values, np.arange(values.size), n_neutral=values.size)
        if table.labels.size > 255:
            raise ValueError("at most 255 generation labels are supported")
        self.table = table
        self.target_spacing = np.array(_triple(self.config.target_spacing, "target_spacing"))
        self.maps: List[_LabelMap] = []
        for array, spacing, name in loaded:
            try:
                index = table.lookup(array)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            index = resample_index_map(index, spacing, tuple(self.target_spacing), table.labels.size)  # type: ignore[arg-type]
            self.maps.append(self._describe(index, name))
        self._flip = torch.from_numpy(table.flip_permutation())
        self._extra = torch.from_numpy(table.extra_cerebral)
        self._output = torch.from_numpy(table.output_lut(self.config.output_labels, self.config.output_merges))
        self._identity: Dict[Tuple[int, int, int], torch.Tensor] = {}
        self.reseed(seed)

    @classmethod
    def from_folder(cls, folder: Union[str, Path], config: Optional[SynthConfig] = None, seed: int = 0,
                    pattern: str = "training_seg_*.nii.gz", limit: Optional[int] = None) -> "SynthGenerator":
        """The label maps matching `pattern` in a SynthSeg-style folder, with its label table."""
        folder = Path(folder)
        paths = sorted(folder.glob(pattern))[:limit]
        if not paths:
            raise ValueError(f"no label maps matching {pattern!r} in {folder}")
        return cls(paths, config, seed, table=load_label_table(folder))

    def reseed(self, seed: int) -> None:
        """Restart the random stream (e.g. one seed per DataLoader worker)."""
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._torch = torch.Generator().manual_seed(self.seed)

    def _describe(self, index: np.ndarray, name: str) -> _LabelMap:
        shape = np.array(index.shape)
        foreground = np.nonzero(index)
        if foreground[0].size:
            low = np.array([f.min() for f in foreground], dtype=float)
            high = np.array([f.max() for f in foreground], dtype=float)
        else:
            low, high = np.zeros(3), shape - 1.0
        centre = ((low + high) / 2 - (shape - 1) / 2) * self.target_spacing
        extent = (high - low + 1) * self.target_spacing
        return _LabelMap(torch.from_numpy(np.ascontiguousarray(index)), centre, extent, name)

    # ----------------------------------------------------------------------- public

    def output_shape(self, map_index: int = 0) -> Tuple[int, int, int]:
        if self.config.crop_shape is None:
            return tuple(int(s) for s in self.maps[map_index].index.shape)  # type: ignore[return-value]
        return tuple(int(s) for s in _triple(self.config.crop_shape, "crop_shape"))  # type: ignore[return-value]

    def sample(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image float32 (1, Z, Y, X), labels int64 (Z, Y, X)) of one random draw."""
        image, labels, _ = self.sample_with_info()
        return image, labels

    def sample_with_info(self) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """As `sample`, plus what was drawn (for tests and inspection)."""
        cfg, rng, gen = self.config, self._rng, self._torch
        info: Dict[str, Any] = {}
        map_index = int(rng.integers(len(self.maps)))
        label_map = self.maps[map_index]
        shape = self.output_shape(map_index)
        info["map"], info["map_name"] = map_index, label_map.name

        # 1. space
        index, jacobian, flipped, offset = self._warp_labels(label_map, shape, info)
        info.update(jacobian=jacobian, flipped=flipped, crop_offset=offset)

        # 2. skull stripping (labels now, the image at the end)
        stripped = bool(rng.random() < cfg.skull_strip_probability)
        if stripped:
            index = torch.where(self._extra[index], torch.zeros_like(index), index)
        info["skull_stripped"] = stripped

        # 3. contrast
        means, stds, use_t1 = self._draw_gmm()
        info.update(t1_priors=use_t1, label_means=means, label_stds=stds)
        means_t, stds_t = torch.from_numpy(means).float(), torch.from_numpy(stds).float()
        image = means_t[index] + stds_t[index] * torch.randn(shape, generator=gen)
        image = image[None, None]

        # 4. acquisition
        pv = float(rng.uniform(*cfg.partial_volume_sigma)) if cfg.partial_volume_sigma[1] > 0 else 0.0
        if pv > 0:
            image = gaussian_blur(image, (pv, pv, pv))
        info["partial_volume_sigma"] = pv
        if cfg.bias_std > 0:
            bias_std = float(rng.uniform(0, cfg.bias_std))
            coarse = torch.randn((1, 1) + (cfg.bias_shape,) * 3, generator=gen) * bias_std
            image = image * torch.exp(F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True))
            info["bias_std"] = bias_std
        image = self._acquire(image, shape, info)
        if stripped:  # masked after acquisition, as brain extraction is; normalised within the brain
            image = image * (index > 0)
        if cfg.normalise:
            image = image.clamp_min_(0)
            top = float(image.max())
            image = image / top if top > 0 else image
            if cfg.gamma_std > 0:
                gamma = float(np.exp(rng.normal(0, cfg.gamma_std)))
                image = image.pow_(gamma)
                info["gamma"] = gamma
        image = image[0]

        # 5. field of view
        labels = self._output[index.long()]
        if cfg.fov_probability > 0 and rng.random() < cfg.fov_probability:
            axis = int(rng.integers(3))
            length = max(1, int(round(shape[axis] * rng.uniform(cfg.fov_min_fraction, 1.0))))
            start = int(rng.integers(0, shape[axis] - length + 1))
            outside = torch.ones(shape[axis], dtype=torch.bool)
            outside[start: start + length] = False
            view = [1, 1, 1]
            view[axis] = shape[axis]
            outside = outside.view(view).expand(shape)
            image = image.masked_fill(outside[None], 0.0)
            labels = labels.masked_fill(outside, 0)
            info["fov"] = (axis, start, length)
        return image.float().contiguous(), labels.contiguous(), info

    # ----------------------------------------------------------------------- steps

    def _identity_grid(self, shape: Tuple[int, int, int]) -> torch.Tensor:
        """(D*H*W, 3) normalised output coordinates in grid_sample's (x, y, z) order."""
        if shape not in self._identity:
            theta = torch.eye(3, 4, dtype=torch.float32)[None]
            self._identity[shape] = F.affine_grid(theta, [1, 1, *shape], align_corners=True).reshape(-1, 3)
        return self._identity[shape]

    def _warp_labels(self, label_map: _LabelMap, shape: Tuple[int, int, int],
                     info: Dict[str, Any]) -> Tuple[torch.Tensor, float, bool, Tuple[int, int, int]]:
        cfg, rng, gen = self.config, self._rng, self._torch
        spacing = self.target_spacing
        in_shape = np.array(label_map.index.shape, dtype=float)
        out_shape = np.array(shape, dtype=float)

        # forward anatomy transform M (z, y, x): scale, then shear, then rotate; sampled through inv(M)
        scale = rng.uniform(1 - cfg.scaling, 1 + cfg.scaling, 3) if cfg.scaling > 0 else np.ones(3)
        angles = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3) if cfg.rotation_deg > 0 else np.zeros(3)
        shear = np.eye(3)
        if cfg.shear > 0:
            shear[~np.eye(3, dtype=bool)] = rng.uniform(-cfg.shear, cfg.shear, 6)
        forward = _rotation(angles) @ shear @ np.diag(scale)
        flipped = bool(rng.random() < cfg.flip_probability)
        mirror = np.diag([1.0, 1.0, -1.0 if flipped else 1.0])  # LPS x (left/right) is array axis 2
        sample_matrix = np.linalg.inv(forward) @ mirror

        # crop centre: over the head, snapped so that with no deformation voxels land on voxels
        if cfg.crop_shape is None:
            centre = np.zeros(3)
        else:
            margin = np.maximum(0.0, (label_map.extent_mm - out_shape * spacing) / 2)
            centre = label_map.centre_mm + rng.uniform(-1, 1, 3) * margin
        if cfg.translation_mm > 0:
            centre = centre + rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
        offset = np.round(centre / spacing + (in_shape - 1) / 2 - (out_shape - 1) / 2)
        centre = (offset - (in_shape - 1) / 2 + (out_shape - 1) / 2) * spacing

        # output normalised -> mm -> input mm -> input normalised, all in (z, y, x), then reversed
        half_out = np.maximum((out_shape - 1) / 2, 0.5) * spacing
        half_in = np.maximum((in_shape - 1) / 2, 0.5) * spacing
        linear = np.diag(1 / half_in) @ sample_matrix @ np.diag(half_out)
        shift = centre / half_in
        linear_xyz = torch.from_numpy(linear[::-1, ::-1].copy()).float()
        shift_xyz = torch.from_numpy(shift[::-1].copy()).float()

        if cfg.elastic_std_mm > 0:
            # the whole sampling grid on the coarse integration grid, then one trilinear upsampling:
            # exact for the affine part, which is linear
            sigma = float(rng.uniform(0, cfg.elastic_std_mm))
            coarse_grid = self._elastic(shape, sigma, half_out)  # (1, d, h, w, 3) output-normalised, x y z
            coarse_grid = coarse_grid @ linear_xyz.T + shift_xyz
            grid = F.interpolate(coarse_grid.permute(0, 4, 1, 2, 3).contiguous(), size=shape, mode="trilinear", align_corners=True)
            grid = grid.permute(0, 2, 3, 4, 1)
            info["elastic_std_mm"] = sigma
        else:  # affine only: a sum of one row per axis, broadcast
            axes = [torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1) for n in shape]  # z, y, x
            columns = linear_xyz.T  # row j: the grid change per unit of output coordinate j (x, y, z)
            grid = (axes[0].view(-1, 1, 1, 1) * columns[2] + axes[1].view(1, -1, 1, 1) * columns[1]
                    + (axes[2].view(1, 1, -1, 1) * columns[0] + shift_xyz))
            grid = grid[None]
        source = label_map.index[None, None].float()
        warped = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        index = warped[0, 0].to(torch.uint8).long()
        if flipped:
            index = self._flip[index]
        return index, float(np.linalg.det(forward)), flipped, tuple(int(o) for o in offset)  # type: ignore[return-value]

    def _elastic(self, shape: Tuple[int, int, int], sigma_mm: float, half_out: np.ndarray) -> torch.Tensor:
        """Identity plus an integrated stationary velocity field, on a grid of half the field's node
        spacing: (1, d, h, w, 3) output-normalised coordinates (x y z) of each node's source."""
        cfg, gen = self.config, self._torch
        extent = np.array(shape) * self.target_spacing
        nodes = [max(2, int(round(e / cfg.elastic_spacing_mm)) + 1) for e in extent]
        fine = [min(s, max(n, int(round(2 * e / cfg.elastic_spacing_mm)) + 1)) for n, s, e in zip(nodes, shape, extent)]
        velocity = torch.randn((1, 3, *nodes), generator=gen) * sigma_mm  # mm, channels z y x
        velocity = velocity / torch.from_numpy(half_out).float().view(1, 3, 1, 1, 1)  # -> normalised
        velocity = velocity.flip(1)  # channels x y z, as grid_sample wants
        field = F.interpolate(velocity, size=fine, mode="trilinear", align_corners=True)
        steps = cfg.elastic_steps
        field = field / (2 ** steps)
        identity = self._identity_grid(tuple(fine)).view(1, *fine, 3)  # type: ignore[arg-type]
        for _ in range(steps):  # scaling and squaring: u <- u + u o (id + u)
            moved = identity + field.permute(0, 2, 3, 4, 1)
            field = field + F.grid_sample(field, moved, mode="bilinear", padding_mode="border", align_corners=True)
        return identity + field.permute(0, 2, 3, 4, 1)

    def _draw_gmm(self) -> Tuple[np.ndarray, np.ndarray, bool]:
        """Per-label (mean, std) for this sample, and whether the T1 priors gave them."""
        cfg, rng, table = self.config, self._rng, self.table
        use_t1 = table.has_t1_priors and bool(rng.random() < cfg.t1_prior_probability)
        if use_t1:
            k = table.n_prior_classes
            cut = cfg.prior_truncation
            pm, ps = table.prior_means, table.prior_stds
            class_means = pm[0] + pm[1] * np.clip(rng.standard_normal(k), -cut, cut)  # type: ignore[index]
            class_stds = ps[0] + ps[1] * np.clip(rng.standard_normal(k), -cut, cut)  # type: ignore[index]
            classes = table.prior_classes
        else:
            k = table.n_classes
            class_means = rng.uniform(cfg.mean_range[0], cfg.mean_range[1], k)
            class_stds = rng.uniform(cfg.std_range[0], cfg.std_range[1], k)
            classes = table.classes
        class_means, class_stds = np.maximum(class_means, 0.0), np.maximum(class_stds, 0.0)
        return class_means[classes], class_stds[classes], use_t1

    def _acquire(self, image: torch.Tensor, shape: Tuple[int, int, int], info: Dict[str, Any]) -> torch.Tensor:
        """Random acquisition resolution and slice thickness, with the noise added on that grid."""
        cfg, rng, gen = self.config, self._rng, self._torch
        target = self.target_spacing
        spacing = target.copy()
        if cfg.resolution_probability > 0 and rng.random() < cfg.resolution_probability:
            if rng.random() < cfg.isotropic_probability:
                iso = rng.uniform(target.max(), max(target.max(), cfg.max_spacing_iso))
                spacing = np.maximum(target, iso)
            else:
                axis = int(rng.integers(3))
                spacing[axis] = rng.uniform(target[axis], max(target[axis], cfg.max_spacing_aniso))
        thickness = rng.uniform(target, spacing)
        info["acquisition_spacing"], info["slice_thickness"] = spacing.copy(), thickness.copy()
        noise = float(rng.uniform(0, cfg.noise_std)) if cfg.noise_std > 0 else 0.0
        info["noise_std"] = noise
        coarse = spacing > target * 1.01
        if not coarse.any():
            if noise > 0:
                image = image + torch.randn(image.shape, generator=gen) * noise
            return image
        # blur: the thickness as FWHM, less what the target grid already implies
        sigmas = np.sqrt(np.maximum(thickness ** 2 - target ** 2, 0.0)) / FWHM_PER_SIGMA / target
        image = gaussian_blur(image, sigmas.tolist())
        low = [max(2, int(round(s * t / a))) for s, t, a in zip(shape, target, spacing)]
        image = F.interpolate(image, size=low, mode="trilinear", align_corners=True)
        if noise > 0:
            image = image + torch.randn(image.shape, generator=gen) * noise
        return F.interpolate(image, size=shape, mode="trilinear", align_corners=True)
