"""Preprocessing on real scans: the model grid covers the scan, results return exactly to the
input grid, and intensities are normalised by the card's rule."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.segmentations import read_labels, resample_labels_to
from Med3DFMLib.io.volumes import read_volume
from Med3DFMLib.preprocess import InputSpec, intensity_stats, labels_to_model_grid, model_grid, probabilities_to_labels, to_model_input

MR = InputSpec(spacing=(1.0, 1.0, 1.0))
CT = InputSpec(modality="CT", spacing=(1.5, 1.5, 1.5), intensity={"method": "ct", "window": [-1000, 1000]})


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    return 2 * np.sum((a == label) & (b == label)) / (np.sum(a == label) + np.sum(b == label))


def test_model_grid_is_axis_aligned_and_covers_the_scan(dicom_series):
    image = read_volume(dicom_series)
    grid = model_grid(image, (1.5, 1.5, 1.5))
    assert np.allclose(grid.GetDirection(), np.eye(3).ravel())
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    assert np.all(np.array(grid.GetSize()) * 1.5 >= extent - 1e-3)
    assert np.all(np.array(grid.GetSize()) * 1.5 < extent + 1.5)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.0)])
def test_labels_survive_the_round_trip_to_the_model_grid_and_back(hippocampus_case, spacing):
    """Labels → model grid → one-hot probabilities → input grid gives the labels back.
    The hippocampus crops have a (-1, -1, 1) direction, so this also checks reorientation."""
    image = read_volume(hippocampus_case[0])
    labels = resample_labels_to(read_labels(hippocampus_case[1]).image, image)
    _, grid = to_model_input(image, InputSpec(spacing=spacing))
    on_grid = labels_to_model_grid(labels, grid)
    probabilities = np.stack([(on_grid == c).astype(np.float32) for c in range(3)])
    back = probabilities_to_labels(probabilities, grid, image)
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetOrigin(), image.GetOrigin()) and np.allclose(back.GetDirection(), image.GetDirection())
    original = sitk.GetArrayFromImage(labels)
    result = sitk.GetArrayFromImage(back)
    threshold = 0.99 if spacing == (1.0, 1.0, 1.0) else 0.8
    for label in (1, 2):
        assert _dice(original, result, label) > threshold


def test_flipped_axes_come_back_in_place(dicom_series, data_dir):
    """A Y-flipped label grid resampled to the model grid and back onto the DICOM series
    lands where physical matching puts it."""
    image = read_volume(dicom_series)
    labels = read_labels(data_dir / "totalseg" / "example_seg_dicom.nii.gz").image
    expected = sitk.GetArrayFromImage(resample_labels_to(labels, image))
    _, grid = to_model_input(image, CT)
    on_grid = labels_to_model_grid(labels, grid)
    liver = 5
    probabilities = np.stack([(on_grid != liver).astype(np.float32), (on_grid == liver).astype(np.float32)])
    back = sitk.GetArrayFromImage(probabilities_to_labels(probabilities, grid, image))
    assert _dice((expected == liver).astype(int), back, 1) > 0.9


def test_mr_normalisation_ignores_the_intensity_scale(hippocampus_case):
    """MR has no absolute scale (the hippocampus cases differ by 10⁴): normalised inputs match."""
    image = read_volume(hippocampus_case[0])
    scaled = sitk.Cast(image, sitk.sitkFloat32) * 1e4
    a, _ = to_model_input(image, MR)
    b, _ = to_model_input(scaled, MR)
    assert np.allclose(a, b, atol=1e-3)
    assert abs(float(a.mean())) < 1.0 and 0.5 < float(a.std()) < 2.0


def test_percentiles_that_collapse_fall_back_to_the_range():
    """A small structure in an empty volume (a binary mask as input) must not normalise to zeros."""
    array = np.zeros((40, 40, 40), dtype=np.uint8)
    array[18:21, 18:21, 18:21] = 255  # 0.04 % of the voxels, far below the 99.5th percentile
    image = sitk.GetImageFromArray(array)
    normalised, _ = to_model_input(image, MR)
    assert normalised.max() - normalised.min() > 1.0


def test_ct_normalisation_uses_fixed_hounsfield_window(dicom_series):
    image = read_volume(dicom_series)
    low, high, shift, scale = intensity_stats(image, CT.intensity)
    assert (low, high, shift, scale) == (-1000.0, 1000.0, 0.0, 1000.0)
    array, _ = to_model_input(image, CT)
    assert array.min() >= -1.0 and array.max() <= 1.0
    assert np.isclose(array.min(), -1.0)  # air


def test_unknown_normalisation_is_an_error(hippocampus_case):
    with pytest.raises(Med3DFMError, match="unknown intensity"):
        intensity_stats(read_volume(hippocampus_case[0]), {"method": "zscore-please"})


def test_input_spec_round_trips_through_the_card():
    assert InputSpec.from_card(CT.to_card()) == CT
