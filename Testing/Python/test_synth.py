"""The SynthSeg-style generator (Med3DFMLib/synth) on two real whole-head label maps (SynthSeg's
training_seg_01/02 at 2 mm, Testing/Data/synthseg): labels survive the deformation (volumes follow
the affine's Jacobian, no structure lost, none with no deformation), each class's voxels carry the
Gaussian that was drawn, the T1 priors give T1 contrast, skull stripping, determinism, the output
label set, the resolution simulation, and clear errors on bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from Med3DFMLib.synth import (
    SYNTHSEG_OUTPUT_LABELS,
    SynthConfig,
    SynthGenerator,
    gaussian_blur,
    load_label_table,
    read_labels_table,
    resample_index_map,
)

torch.set_num_threads(1)

WM, GM = (2, 41), (3, 42)           # cerebral white matter, cortex (left, right)
CSF = (4, 43, 24)                   # lateral ventricles, CSF


@pytest.fixture(scope="module")
def folder(data_dir):
    return data_dir / "synthseg"


@pytest.fixture(scope="module")
def table(folder):
    return load_label_table(folder)


@pytest.fixture(scope="module")
def maps(folder):
    """The two label maps as the generator holds them: LPS, (z, y, x), label values."""
    paths = sorted(folder.glob("training_seg_*_2mm.nii.gz"))
    assert len(paths) == 2
    arrays = [sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(p)), "LPS")).astype(np.int64) for p in paths]
    return paths, arrays


def _generator(maps, table, config, seed=0, which=(0, 1)):
    paths, _ = maps
    return SynthGenerator([paths[i] for i in which], config, seed, table=table)


def _crop(array: np.ndarray, offset, shape) -> np.ndarray:
    """array[offset : offset + shape], zero outside the array."""
    out = np.zeros(shape, dtype=array.dtype)
    src, dst = [], []
    for o, s, n in zip(offset, shape, array.shape):
        lo, hi = max(o, 0), min(o + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = array[tuple(src)]
    return out


# --------------------------------------------------------------------------- data and table


def test_the_shipped_table_is_synthseg_s(folder, table):
    assert table.labels.size == 54 and table.labels[0] == 0
    assert table.n_classes == 48 and table.n_prior_classes == 25
    assert table.prior_means.shape == table.prior_stds.shape == (2, 25)
    assert sorted(read_labels_table(folder / "labels_table.txt")) == sorted(SYNTHSEG_OUTPUT_LABELS)
    assert table.labels[table.extra_cerebral].tolist() == [502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530]
    # left i pairs with right i: flipping swaps 2 <-> 41 and leaves the brain stem alone
    index, perm = table.index_of(), table.flip_permutation()
    assert table.labels[perm[index[2]]] == 41 and table.labels[perm[index[41]]] == 2
    assert table.labels[perm[index[16]]] == 16
    assert np.array_equal(perm[perm], np.arange(54))


def test_maps_are_held_in_lps_so_the_flip_axis_is_left_right(maps, table):
    _, arrays = maps
    for array in arrays:
        x = np.arange(array.shape[2])
        # LPS: x grows towards the patient's left, so the left hemisphere has the larger x
        assert (x * (array == 2).sum(axis=(0, 1))).sum() / (array == 2).sum() > (x * (array == 41).sum(axis=(0, 1))).sum() / (array == 41).sum() + 10
    mirror = SynthConfig.no_augmentation(crop_shape=None, output_labels=None, flip_probability=1.0)
    _, labels, info = _generator(maps, table, mirror, which=(0,)).sample_with_info()
    assert info["flipped"]
    swapped = table.labels[table.flip_permutation()][table.lookup(arrays[0][:, :, ::-1])]
    assert np.array_equal(labels.numpy(), swapped)


# --------------------------------------------------------------------------- (a) labels under deformation


def test_zero_deformation_returns_the_labels_exactly(maps, table):
    _, arrays = maps
    whole = SynthConfig.no_augmentation(crop_shape=None, output_labels=None)
    generator = _generator(maps, table, whole, which=(0,))
    image, labels, info = generator.sample_with_info()
    assert image.shape == (1, 128, 128, 128) and image.dtype == torch.float32
    assert labels.shape == (128, 128, 128) and labels.dtype == torch.int64
    assert np.array_equal(labels.numpy(), arrays[0])
    assert info["jacobian"] == pytest.approx(1.0) and not info["flipped"]

    cropped = _generator(maps, table, replace(whole, crop_shape=(80, 72, 64)), seed=5)
    for _ in range(3):
        _, labels, info = cropped.sample_with_info()
        expected = _crop(arrays[info["map"]], info["crop_offset"], (80, 72, 64))
        assert np.array_equal(labels.numpy(), expected)


def test_deformed_labels_keep_their_volumes_within_the_jacobian(maps, table):
    """Affine (scaling +-20 %, rotation +-15 deg, shear) and flips on a crop that holds the whole
    head: each structure's volume is the input's times det(affine) within +-15 % (nearest neighbour
    at 2 mm); with the elastic field on (SynthSeg's strength, which changes small structures' volumes
    by up to about a half) within +-35 % for structures of >= 1000 voxels (8 ml). Every structure
    of >= 200 voxels in the input is still there, on its mirrored side when flipped."""
    _, arrays = maps
    partner = {int(a): int(b) for a, b in zip(table.labels, table.labels[table.flip_permutation()])}
    for elastic, (min_voxels, tolerance) in ((0.0, (200, 0.15)), (4.0, (1000, 0.35))):
        config = SynthConfig.no_augmentation(crop_shape=144, output_labels=None, scaling=0.2, rotation_deg=15.0,
                                             shear=0.012, elastic_std_mm=elastic, flip_probability=0.5)
        generator = _generator(maps, table, config, seed=11)
        jacobians, flips, checked = [], [], 0
        for _ in range(4):
            _, labels, info = generator.sample_with_info()
            source = arrays[info["map"]]
            values_in, counts_in = np.unique(source, return_counts=True)
            counts_out = dict(zip(*np.unique(labels.numpy(), return_counts=True)))
            jacobians.append(info["jacobian"])
            flips.append(info["flipped"])
            for value, count in zip(values_in.tolist(), counts_in.tolist()):
                if value == 0 or count < 200:
                    continue
                out_value = partner[value] if info["flipped"] else value
                assert out_value in counts_out, (elastic, value, count)
                if count >= min_voxels:
                    checked += 1
                    ratio = counts_out[out_value] / (count * info["jacobian"])
                    assert abs(ratio - 1) < tolerance, (elastic, value, count, counts_out[out_value], info["jacobian"])
            # the warp did something: many voxels of the unwarped crop changed label
            unwarped = _crop(source, info["crop_offset"], labels.shape)
            assert np.mean(unwarped != labels.numpy()) > 0.05
        assert checked >= 40
        assert max(abs(j - 1) for j in jacobians) > 0.1  # the scaling was exercised
        assert any(flips) and not all(flips)


# --------------------------------------------------------------------------- (b) intensities as drawn


def test_each_label_carries_the_gaussian_that_was_drawn(maps, table):
    config = SynthConfig.no_augmentation(crop_shape=None, output_labels=None)
    generator = _generator(maps, table, config, seed=3)
    for _ in range(2):
        image, _, info = generator.sample_with_info()
        source = maps[1][info["map"]]
        flat, values = image[0].numpy().ravel().astype(np.float64), source.ravel()
        means, stds = info["label_means"], info["label_stds"]
        assert not info["t1_priors"]
        # drawn in the configured ranges, one Gaussian per class
        assert np.all((means >= 25) & (means <= 225)) and np.all((stds >= 5) & (stds <= 25))
        for cls in range(table.n_classes):
            members = np.nonzero(table.classes == cls)[0]
            assert np.all(means[members] == means[members[0]]) and np.all(stds[members] == stds[members[0]])
        index = table.index_of()
        # SynthSeg's classes: a lateral ventricle with its inferior horn, a hippocampus with its amygdala
        for a, b in ((4, 5), (43, 44), (17, 18), (53, 54)):
            assert means[index[a]] == means[index[b]] and stds[index[a]] == stds[index[b]]
            in_a, in_b = flat[values == a], flat[values == b]
            assert abs(in_a.mean() - in_b.mean()) < 5 * stds[index[a]] * np.sqrt(1 / in_a.size + 1 / in_b.size)
        assert means[index[2]] != means[index[41]]  # left and right white matter are drawn apart
        checked = 0
        for i, value in enumerate(table.labels.tolist()):
            voxels = flat[values == value]
            if voxels.size < 200:
                continue
            checked += 1
            assert abs(voxels.mean() - means[i]) < 5 * stds[i] / np.sqrt(voxels.size) + 1e-3, value
            assert voxels.std() == pytest.approx(stds[i], rel=0.15), value
        assert checked >= 35  # of the 54 labels, those with >= 200 voxels at 2 mm
    # the random contrast differs between draws
    other = generator.sample_with_info()[2]["label_means"]
    assert not np.allclose(other, means)


# --------------------------------------------------------------------------- (c) T1 priors


def test_t1_priors_give_t1_contrast(maps, table):
    config = SynthConfig.no_augmentation(crop_shape=8, output_labels=None, t1_prior_probability=1.0)
    generator = _generator(maps, table, config, seed=7)
    index = table.index_of()
    pm, ps = table.prior_means, table.prior_stds
    draws = []
    for _ in range(150):
        _, _, info = generator.sample_with_info()
        assert info["t1_priors"]
        draws.append(info["label_means"])
        class_means = np.zeros(table.n_prior_classes)
        class_means[table.prior_classes] = info["label_means"]
        assert np.all(class_means >= np.maximum(pm[0] - 3 * pm[1], 0) - 1e-9)
        assert np.all(class_means <= pm[0] + 3 * pm[1] + 1e-9)
        class_stds = np.zeros(table.n_prior_classes)
        class_stds[table.prior_classes] = info["label_stds"]
        assert np.all(class_stds >= 0) and np.all(class_stds <= ps[0] + 3 * ps[1] + 1e-9)
    draws = np.array(draws)
    wm, gm, csf = draws[:, index[2]], draws[:, index[3]], draws[:, index[24]]
    # T1 order: white matter brighter than grey matter, CSF darkest, in (nearly) every draw
    assert np.mean((wm > gm) & (gm > csf)) >= 0.95
    # the draws centre on the priors (WM 160, cortex 96, CSF 44)
    for value, column in ((2, 2), (3, 3), (24, 1)):
        assert abs(draws[:, index[value]].mean() - pm[0, column]) < 4 * pm[1, column] / np.sqrt(len(draws))
    # structures sharing a T1 class share its mean: caudate and hippocampus are grey matter
    assert np.array_equal(draws[:, index[11]], draws[:, index[3]]) and np.array_equal(draws[:, index[17]], draws[:, index[3]])

    # in an image: the voxels of white matter are brighter than cortex, brighter than the ventricles
    whole = _generator(maps, table, replace(config, crop_shape=None), seed=1, which=(0,))
    image, labels, _ = whole.sample_with_info()
    voxel_mean = {v: float(image[0][torch.isin(labels, torch.tensor(v))].mean()) for v in (WM, GM, CSF[:2])}
    assert voxel_mean[WM] > voxel_mean[GM] > voxel_mean[CSF[:2]]

    # and by default about a fifth of the samples use them
    mixed = _generator(maps, table, replace(config, t1_prior_probability=0.2), seed=2)
    share = np.mean([mixed.sample_with_info()[2]["t1_priors"] for _ in range(200)])
    assert 0.12 < share < 0.28


# --------------------------------------------------------------------------- (d) skull stripping


def test_skull_stripping_blanks_the_extra_cerebral_tissues(maps, table):
    """Same seed with and without stripping gives the same warp: the voxels that would be skull,
    skin, eyes, ... are 0 in the stripped image and its labels, whatever blur, bias and noise do."""
    base = SynthConfig(crop_shape=80, output_labels=None, resolution_probability=1.0, t1_prior_probability=0.0)
    for seed in (0, 1, 2):
        kept_image, kept_labels, kept_info = _generator(maps, table, replace(base, skull_strip_probability=0.0), seed).sample_with_info()
        image, labels, info = _generator(maps, table, replace(base, skull_strip_probability=1.0), seed).sample_with_info()
        assert info["skull_stripped"] and not kept_info["skull_stripped"]
        extra = torch.isin(kept_labels, torch.from_numpy(table.labels[table.extra_cerebral]))
        assert extra.sum() > 1000  # the crop holds extra-cerebral tissue
        assert torch.all(image[0][extra] == 0) and torch.all(labels[extra] == 0)
        assert torch.all(image[0][labels == 0] == 0)
        assert not torch.isin(labels, torch.from_numpy(table.labels[table.extra_cerebral])).any()
        brain = labels > 0
        assert torch.equal(brain, (kept_labels > 0) & ~extra)
        assert float((image[0][brain] > 0).float().mean()) > 0.99
        assert float(kept_image[0][extra].abs().mean()) > 0.01  # not stripped: the tissue is imaged


def test_a_partial_field_of_view_blanks_image_and_labels_outside_a_slab(maps, table):
    base = SynthConfig(crop_shape=64, output_labels=None, skull_strip_probability=0.0)
    for seed in (0, 1):
        full_image, full_labels, _ = _generator(maps, table, base, seed).sample_with_info()
        image, labels, info = _generator(maps, table, replace(base, fov_probability=1.0, fov_min_fraction=0.5), seed).sample_with_info()
        axis, start, length = info["fov"]
        assert 32 <= length <= 64
        inside = [slice(None)] * 3
        inside[axis] = slice(start, start + length)
        outside = torch.ones(64, 64, 64, dtype=torch.bool)
        outside[tuple(inside)] = False
        assert torch.equal(labels[tuple(inside)], full_labels[tuple(inside)])
        assert torch.equal(image[0][tuple(inside)], full_image[0][tuple(inside)])
        assert torch.all(labels[outside] == 0) and torch.all(image[0][outside] == 0)
        assert (full_labels[outside] > 0).any() or length == 64


# --------------------------------------------------------------------------- (e) determinism


def test_same_seed_same_sample_and_different_seeds_differ(maps, table):
    config = SynthConfig(crop_shape=64, resolution_probability=1.0, fov_probability=0.5)
    first = _generator(maps, table, config, seed=42)
    a = [first.sample() for _ in range(2)]
    b = _generator(maps, table, config, seed=42).sample()
    assert torch.equal(a[0][0], b[0]) and torch.equal(a[0][1], b[1])
    assert not torch.equal(a[0][0], a[1][0])  # the stream moves on
    first.reseed(42)
    again = first.sample()
    assert torch.equal(again[0], a[0][0]) and torch.equal(again[1], a[0][1])
    other = _generator(maps, table, config, seed=43).sample()
    assert not torch.equal(other[0], a[0][0])
    # the default config's output: [0, 1] floats, finite
    assert float(a[0][0].min()) >= 0 and float(a[0][0].max()) <= 1 and torch.isfinite(a[0][0]).all()


# --------------------------------------------------------------------------- (f) output labels


def test_only_the_output_labels_appear(maps, table):
    _, arrays = maps
    default = _generator(maps, table, SynthConfig(crop_shape=96), seed=4)
    seen = set()
    for _ in range(3):
        seen |= set(torch.unique(default.sample()[1]).tolist())
    assert seen <= set(SYNTHSEG_OUTPUT_LABELS) and len(seen) >= 30

    # no deformation: lesions fold into white matter, extra-cerebral tissue and vessels into background
    plain = _generator(maps, table, SynthConfig.no_augmentation(crop_shape=None), which=(0,))
    labels = plain.sample()[1].numpy()
    source = arrays[0]
    assert set(np.unique(labels).tolist()) <= set(SYNTHSEG_OUTPUT_LABELS)
    assert (source == 25).any() and np.all(labels[source == 25] == 2) and np.all(labels[source == 57] == 41)
    assert np.all(labels[source >= 500] == 0) and np.all(labels[source == 30] == 0)
    kept = np.isin(source, SYNTHSEG_OUTPUT_LABELS)
    assert np.array_equal(labels[kept], source[kept])

    # a chosen list: the hippocampi only
    chosen = _generator(maps, table, SynthConfig.no_augmentation(crop_shape=None, output_labels=(0, 17, 53)), which=(0,))
    labels = chosen.sample()[1].numpy()
    assert set(np.unique(labels).tolist()) == {0, 17, 53}
    assert np.array_equal(labels == 17, source == 17) and np.array_equal(labels == 53, source == 53)


# --------------------------------------------------------------------------- (g) resolution


def test_a_thick_axis_loses_its_high_frequencies(maps, table):
    sharp_config = SynthConfig.no_augmentation(crop_shape=96)
    thick_config = replace(sharp_config, resolution_probability=1.0, isotropic_probability=0.0, max_spacing_aniso=8.0)
    for seed in (0, 1, 2):
        sharp, _, _ = _generator(maps, table, sharp_config, seed).sample_with_info()
        thick, _, info = _generator(maps, table, thick_config, seed).sample_with_info()
        spacing = info["acquisition_spacing"]
        axis = int(np.argmax(spacing))
        assert spacing[axis] > 2.5 and np.count_nonzero(spacing > 2.0) == 1
        grad = lambda image, a: float(torch.diff(image[0], dim=a).abs().mean())  # noqa: E731
        drop = grad(thick, axis) / grad(sharp, axis)
        assert drop < 0.7, (seed, spacing, drop)
        thin = [grad(thick, a) / grad(sharp, a) for a in range(3) if a != axis]
        assert min(thin) > drop  # the other axes keep more of theirs
        # the intensities stay those of the image (no global change): blur preserves the mean
        assert float(thick.mean()) == pytest.approx(float(sharp.mean()), rel=0.05)


def test_the_slice_thickness_blur_is_a_gaussian_of_that_width():
    delta = torch.zeros(1, 1, 41, 41, 41)
    delta[0, 0, 20, 20, 20] = 1.0
    blurred = gaussian_blur(delta, (3.0, 0.0, 1.5))[0, 0]
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-4)
    x = torch.arange(41.0) - 20
    for axis, sigma in ((0, 3.0), (1, 0.0), (2, 1.5)):
        profile = blurred.sum(dim=[a for a in range(3) if a != axis])
        assert float((profile * x**2).sum()).__pow__(0.5) == pytest.approx(sigma, rel=0.05, abs=1e-3)


def test_label_maps_are_resampled_to_the_target_spacing_once(maps, table):
    # block mode for whole factors: each 2x2x2 block keeps its most frequent label
    index = np.zeros((4, 4, 4), dtype=np.uint8)
    index[:2, :2, :2] = 1
    index[0, 0, 0] = 2                    # 7 x label 1 vs 1 x label 2
    index[2:, 2:, 2:].flat[:5] = 3        # 5 x label 3 vs 3 x background
    out = resample_index_map(index, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 4)
    assert out.shape == (2, 2, 2) and out[0, 0, 0] == 1 and out[1, 1, 1] == 3 and out[0, 1, 1] == 0
    # nearest neighbour otherwise; the field of view is kept
    assert resample_index_map(np.zeros((30, 30, 30), np.uint8), (1.0,) * 3, (1.5,) * 3, 4).shape == (20, 20, 20)
    # the 2 mm maps at 4 mm: 64^3, all large structures still there
    coarse = _generator(maps, table, SynthConfig.no_augmentation(crop_shape=None, output_labels=None, target_spacing=4.0), which=(0,))
    labels = coarse.sample()[1].numpy()
    assert labels.shape == (64, 64, 64)
    values, counts = np.unique(maps[1][0], return_counts=True)
    assert set(values[counts >= 400].tolist()) <= set(np.unique(labels).tolist())


# --------------------------------------------------------------------------- (h) bad input


def test_bad_input_is_a_clear_value_error(maps, table):
    _, arrays = maps
    unknown = arrays[0].copy()
    unknown[0, 0, :3] = (999, 1000, 77)
    with pytest.raises(ValueError, match="not generation labels: 77, 999, 1000"):
        SynthGenerator([unknown], SynthConfig(), table=table, array_spacing=2.0)
    with pytest.raises(ValueError, match="3-D"):
        SynthGenerator([arrays[0][64]], SynthConfig(), table=table)
    with pytest.raises(ValueError, match="3-D"):
        SynthGenerator([sitk.GetImageFromArray(arrays[0][64].astype(np.uint16))], SynthConfig(), table=table)
    with pytest.raises(ValueError, match="integer"):
        SynthGenerator([arrays[0] + 0.5], SynthConfig(), table=table)
    with pytest.raises(ValueError, match="at least one"):
        SynthGenerator([], SynthConfig(), table=table)
    with pytest.raises(ValueError, match="not found"):
        SynthGenerator([maps[0][0].parent / "missing.nii.gz"], SynthConfig(), table=table)
    with pytest.raises(ValueError, match="skull_strip_probability"):
        SynthConfig(skull_strip_probability=1.5)
    with pytest.raises(ValueError, match="crop_shape"):
        SynthConfig(crop_shape=(96, 96))
    with pytest.raises(ValueError, match="mean_range"):
        SynthConfig(mean_range=(200.0, 100.0))
