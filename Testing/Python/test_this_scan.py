"""This scan: the painted outlines, the adapter's evidence and the image's edges combined
(Med3DFMLib.fewshot.propagate), on real MR from the fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from Med3DFMLib.cli import main
from Med3DFMLib.fewshot.labels import IGNORE
from Med3DFMLib.fewshot.propagate import PropagationParams, channel_argmax, random_walk_with_prior, segment_this_scan, slice_shape_prior
from Med3DFMLib.preprocess import probabilities_on
from Med3DFMLib.weights import read_weights


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


@pytest.fixture(scope="module")
def hippocampus(data_dir):
    """hippocampus_014: image array, whole-hippocampus truth (anterior + posterior), spacing (z, y, x)."""
    image = sitk.ReadImage(str(data_dir / "hippocampus" / "images" / "hippocampus_014.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / "hippocampus_014.nii.gz"))) > 0
    return sitk.GetArrayFromImage(image).astype(np.float32), truth, list(image.GetSpacing())[::-1]


def _painted_targets(truth: np.ndarray, slices) -> np.ndarray:
    targets = np.full(truth.shape, IGNORE, dtype=np.int16)
    targets[slices] = truth[slices]
    return targets


def _extent(truth: np.ndarray):
    z = np.nonzero(truth.any(axis=(1, 2)))[0]
    return int(z.min()), int(z.max())


def test_outlines_are_interpolated_between_painted_slices_and_shrink_past_them(data_dir):
    """The liver on a CT (TotalSegmentator's label map of the fixture series, 20 slices of 2 mm)."""
    labels = sitk.ReadImage(str(data_dir / "totalseg" / "example_seg_dicom.nii.gz"))
    truth = sitk.GetArrayFromImage(labels) == 5  # liver in TotalSegmentator's "total" classes
    spacing = list(labels.GetSpacing())[::-1]
    low, high = _extent(truth)
    a, b = low + (high - low) // 4, low + 3 * (high - low) // 4
    logits = slice_shape_prior(_painted_targets(truth, [a, b]), 0, 1, spacing, PropagationParams())
    inside = logits[1] > logits[0]
    for z in (a, b):  # on a painted slice the prior is the painted outline
        assert _dice(inside[z], truth[z]) > 0.97
    middle = (a + b) // 2
    # between them the interpolated outline fits better than either painted one (0.976 against 0.954 / 0.965)
    assert _dice(inside[middle], truth[middle]) > max(_dice(truth[a], truth[middle]), _dice(truth[b], truth[middle]))
    areas = [int(inside[z].sum()) for z in range(b, truth.shape[0])]
    assert all(x > y for x, y in zip(areas, areas[1:]))  # past the last painted slice: a shrinking cone, not a copy


def test_random_walker_keeps_the_seeds_and_weighs_the_evidence(hippocampus):
    image, truth, spacing = hippocampus
    low, high = _extent(truth)
    slices = [low + (high - low) * i // 4 for i in (1, 2, 3)]
    targets = _painted_targets(truth, slices)
    from scipy import ndimage

    # Evidence: the truth with a tenth of its voxels flipped, blurred (an imperfect but informative adapter).
    noisy = truth ^ (np.random.default_rng(0).random(truth.shape) < 0.1)
    p = np.clip(ndimage.gaussian_filter(noisy.astype(np.float32), 1.0), 0.02, 0.98)
    evidence = np.stack([1 - p, p])
    unpainted = [z for z in range(truth.shape[0]) if z not in slices]
    results = {}
    for gamma in (PropagationParams().gamma, 100.0):
        probabilities, info = random_walk_with_prior(image, spacing, targets, evidence, PropagationParams(gamma=gamma))
        labels = probabilities.argmax(0)
        assert np.array_equal(labels[slices], truth[slices].astype(labels.dtype))  # painted voxels keep their class
        assert 0 < info["solved_voxels"] < truth.size  # only the uncertain band around the evidence's boundaries
        results[gamma] = _dice(labels[unpainted] == 1, truth[unpainted])
        if gamma == 100.0:  # a strong data term reproduces the evidence
            assert _dice(labels == 1, p > 0.5) > 0.97
    assert results[PropagationParams().gamma] > 0.8, results  # the default leans on seeds and edges, still close


def test_outlines_and_edges_alone_segment_the_unpainted_slices(hippocampus):
    """No adapter at all (dense-label fallback path off): three painted slices, shape prior + random walker."""
    image, truth, spacing = hippocampus
    low, high = _extent(truth)
    slices = [low + (high - low) * i // 4 for i in (1, 2, 3)]
    labels, info = segment_this_scan(image, spacing, _painted_targets(truth, slices), 0, None)
    unpainted = [z for z in range(truth.shape[0]) if z not in slices]
    assert _dice(labels[unpainted] == 1, truth[unpainted]) > 0.6
    assert info["params"]["beta"] == PropagationParams().beta


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, data_dir, hippocampus):
    """`adapt --segment` on three painted slices of a plain one-label map, with and without propagation."""
    _, truth, _ = hippocampus
    folder = tmp_path_factory.mktemp("this-scan")
    low, high = _extent(truth)
    slices = [low + (high - low) * i // 4 for i in (1, 2, 3)]
    reference = sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / "hippocampus_014.nii.gz"))
    sparse = np.zeros(truth.shape, dtype=np.uint8)
    sparse[slices] = truth[slices]
    painted = sitk.GetImageFromArray(sparse)
    painted.CopyInformation(reference)
    labels_path = folder / "painted.nii.gz"
    sitk.WriteImage(painted, str(labels_path))
    image_path = data_dir / "hippocampus" / "images" / "hippocampus_014.nii.gz"
    outputs = {}
    for variant, extra in (("propagated", []), ("adapter", ["--no-propagate"])):
        out = folder / f"{variant}.safetensors"
        assert main(["adapt", "--image", str(image_path), "--labels", str(labels_path), "--name", "left hippocampus", "-o", str(out),
                     "--segment", str(folder / f"{variant}.seg.nrrd"), "--progress", "none", "--device", "cpu", *extra]) == 0
        outputs[variant] = out
    return folder, outputs, slices


def test_this_scan_beats_the_adapter_alone(adapted, hippocampus):
    _, truth, _ = hippocampus
    folder, _, slices = adapted
    unpainted = [z for z in range(truth.shape[0]) if z not in slices]
    scores = {}
    for variant in ("propagated", "adapter"):
        seg = slicerio.read_segmentation(str(folder / f"{variant}.seg.nrrd"))
        predicted = seg["voxels"].transpose(2, 1, 0) == 1
        assert np.array_equal(predicted[slices], truth[slices]) or variant == "adapter"  # the painted slices come back as painted
        scores[variant] = _dice(predicted[unpainted], truth[unpainted])
    assert scores["propagated"] > scores["adapter"] + 0.05, scores
    record = json.loads((folder / "propagated.json").read_text())
    assert record["parameters"]["propagate"] is True and record["propagation"]["solved_voxels"] > 0
    assert "propagation" not in json.loads((folder / "adapter.json").read_text())


def test_a_single_structure_takes_the_name_given(adapted):
    """A plain label map only says 'label 1'; `--name` names the structure (and `explain --target` finds it)."""
    folder, outputs, _ = adapted
    _, card = read_weights(outputs["propagated"])
    assert [label["name"] for label in card["labels"]] == ["left hippocampus"]
    seg = slicerio.read_segmentation(str(folder / "propagated.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["left hippocampus"]


@pytest.mark.parametrize("values, band", [((17, 53), 12), ((4, 43, 17), 5), ((2,), 3)])
def test_the_solved_band_is_found_on_a_box_exactly_as_on_the_whole_volume(data_dir, values, band):
    """The voxels near a label change are looked for only around the non-background labels (a whole
    MR costs less); on a real label map (FreeSurfer aseg: hippocampi, ventricles, white matter) the
    answer is the whole-volume dilation's, voxel for voxel."""
    from scipy import ndimage

    from Med3DFMLib.fewshot.propagate import _near_boundaries

    aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "brain" / "aseg_4mm.nii.gz")))
    label = np.zeros(aseg.shape, dtype=np.int64)
    for index, value in enumerate(values, start=1):
        label[aseg == value] = index
    assert label.any()
    whole = np.zeros(label.shape, dtype=bool)
    for cls in np.unique(label):
        inside = label == cls
        whole |= ndimage.binary_dilation(inside, iterations=band) & ~inside
    found = _near_boundaries(label, band)
    assert np.array_equal(found, whole) and 0 < found.sum() < found.size
    assert not _near_boundaries(np.zeros((5, 6, 7), dtype=np.int64), band).any()


def test_channel_argmax_is_numpys_argmax_with_its_tie_rule():
    rng = np.random.default_rng(0)
    for channels in (2, 3, 5):
        p = rng.random((channels, 7, 9, 11)).astype(np.float32)
        p[:, 0] = 0.25  # a whole slab of ties: the first channel wins, as with numpy
        p[1:, 1, 0, 0] = p[:, 1, 0, 0].max() + 1.0
        labels = channel_argmax(p)
        assert labels.dtype == np.uint8 and np.array_equal(labels, p.argmax(0))
        assert (labels[0] == 0).all()
    assert channel_argmax(np.zeros((300, 2, 2, 2), np.float32)).dtype == np.uint16


def test_probabilities_on_the_image_grid_sum_to_one_and_match_each_channel(hippocampus):
    """The background channel is one minus the resampled classes: it must equal resampling it."""
    image_array, truth, spacing = hippocampus
    reference = sitk.GetImageFromArray(image_array)
    reference.SetSpacing(spacing[::-1])
    grid = sitk.Image([int(n) // 2 for n in reference.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing([s * 2 for s in reference.GetSpacing()])
    grid.SetOrigin([o + s / 2 for o, s in zip(reference.GetOrigin(), reference.GetSpacing())])
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, *grid.GetSize()[::-1])).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    on_image = probabilities_on(probabilities, grid, reference)
    assert on_image.shape == (3, *image_array.shape)
    np.testing.assert_allclose(on_image.sum(0), 1.0, atol=1e-5)
    background = sitk.GetImageFromArray(probabilities[0])
    background.CopyInformation(grid)
    direct = sitk.GetArrayFromImage(sitk.Resample(background, reference, sitk.Transform(), sitk.sitkLinear, 1.0, sitk.sitkFloat32))
    np.testing.assert_allclose(on_image[0], direct, atol=1e-5)
