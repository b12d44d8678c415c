"""`med3dfm explain` on real MR: Grad-CAM and occlusion for a segment of the bundled
hippocampus-mr-demo model and of a few-shot adapter, on the input grid, with the evidence where
the structure is, and a map that changes when the weights are randomised."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_classify import cli  # the same CLI entry (real main once classify is wired in)


def _dilated(labels: np.ndarray, value: int, radius: int = 2) -> np.ndarray:
    image = sitk.GetImageFromArray((labels == value).astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryDilate(image, [radius] * 3)) > 0


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_explain_segment_model(hippocampus_case, tmp_path, method):
    image_path, labels_path = hippocampus_case
    out = tmp_path / f"{method}.nrrd"
    assert cli(["explain", str(image_path), "--model", "hippocampus-mr-demo", "--target", "Anterior Hippocampus", "-o", str(out), "--method", method]) == 0
    image, heat = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(out))
    assert heat.GetSize() == image.GetSize() and heat.GetOrigin() == image.GetOrigin() and heat.GetDirection() == image.GetDirection()
    values = sitk.GetArrayFromImage(heat)
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() == pytest.approx(1.0, abs=1e-3)
    # The evidence concentrates on the structure: at least 1.5x the share a uniform map would put there.
    region = _dilated(sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))), 1)
    assert (values * region).sum() / values.sum() > 1.5 * region.mean()
    note = json.loads((tmp_path / f"{method}.json").read_text())
    assert note["method"] == method and note["model"]["id"] == "hippocampus-mr-demo" and note["target_voxels_predicted"] > 0


def test_explain_errors(hippocampus_case, tmp_path, capsys):
    image_path, _ = hippocampus_case
    assert cli(["explain", str(image_path), "--model", "hippocampus-mr-demo", "--target", "amygdala", "-o", str(tmp_path / "h.nrrd")]) == 1
    err = capsys.readouterr().err
    assert "unknown target 'amygdala'" in err and "anterior hippocampus" in err
    assert cli(["explain", str(image_path), "--model", "hippocampus-mr-demo", "--target", "anterior hippocampus", "-o", str(tmp_path / "h.seg.nrrd")]) == 1
    assert "must be a float volume ending in .nrrd" in capsys.readouterr().err
    assert cli(["explain", str(image_path), "--model", "hippocampus-mr-demo", "--target", "anterior hippocampus", "--method", "attention", "-o", str(tmp_path / "h.nrrd")]) == 1
    assert "use gradcam or occlusion" in capsys.readouterr().err


def test_gradcam_changes_with_randomised_weights(hippocampus_case):
    """Sanity check (Adebayo et al.): a saliency map that survives weight randomisation explains nothing."""
    from Med3DFMLib.explain.segmentation import ModelExplainer, segmentation_heatmap
    from Med3DFMLib.io.volumes import read_volume
    from Med3DFMLib.models import load_segmentation_model
    from Med3DFMLib.preprocess import InputSpec, to_model_input
    from Med3DFMLib.registry import resolve_model
    from Med3DFMLib.weights import read_weights

    tensors, card = read_weights(resolve_model("hippocampus-mr-demo").weights)
    spec = InputSpec.from_card(card["input"])
    array, _ = to_model_input(read_volume(hippocampus_case[0]), spec)
    model = load_segmentation_model(tensors, card)
    trained, _ = segmentation_heatmap(ModelExplainer(model, spec.window[::-1], torch.device("cpu")), array, 1, "gradcam")
    torch.manual_seed(0)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    randomised, _ = segmentation_heatmap(ModelExplainer(model, spec.window[::-1], torch.device("cpu")), array, 1, "gradcam")
    assert np.corrcoef(trained.ravel(), randomised.ravel())[0, 1] < 0.5


def test_explain_fewshot_adapter(hippocampus_case, tmp_path):
    """Grad-CAM for a few-shot (prototype) adapter made from the case's own labels. Its map is more
    diffuse than the built-in model's (measured 1.46x the uniform share), hence the lower bar."""
    from Med3DFMLib.fewshot.adapt import run_adapt

    image_path, labels_path = hippocampus_case
    adapter = tmp_path / "hippo.safetensors"
    run_adapt([(image_path, labels_path)], "hippocampus", adapter, mode="prototype", dense=True)  # training-free: quick
    out = tmp_path / "adapter.nrrd"
    assert cli(["explain", str(image_path), "--model", str(adapter), "--target", "label 1", "-o", str(out)]) == 0
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    region = _dilated(sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))), 1)
    assert values.max() == pytest.approx(1.0, abs=1e-3) and (values * region).sum() / values.sum() > 1.3 * region.mean()
