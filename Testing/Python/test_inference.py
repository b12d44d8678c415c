"""Sliding-window inference: full coverage, probabilities, progress, device choice, memory guard."""

from __future__ import annotations

import json
import io

import numpy as np
import pytest
import torch

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.inference import GIB, choose_device, count_windows, plan_memory, predict_volume
from Med3DFMLib.models import EncoderConfig, SegmentationModel
from Med3DFMLib.progress import Progress

TINY = EncoderConfig(embed_dim=24, depth=1, num_heads=1, graph_channels=(4, 8, 8), graph_depths=(1, 1, 1), fusion_after=(0,), stem_channels=4)


def test_predict_volume_covers_an_odd_sized_volume_and_reports_every_window():
    torch.manual_seed(0)
    model = SegmentationModel(TINY, num_classes=3)
    volume = np.random.default_rng(0).normal(size=(40, 50, 21)).astype(np.float32)
    stream = io.StringIO()
    probabilities = predict_volume(model, volume, (32, 32, 32), torch.device("cpu"), overlap=0.5, batch_size=2, progress=Progress("json", stream))
    assert probabilities.shape == (3, 40, 50, 21)
    assert np.allclose(probabilities.sum(0), 1.0, atol=1e-4)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    expected = count_windows(volume.shape, (32, 32, 32), 0.5)
    assert expected == 2 * 3 * 1
    assert lines[-1]["fraction"] == 1.0 and lines[-1]["stage"] == "infer"
    assert lines[-1]["message"] == f"window {expected} of {expected}"


def test_device_choice():
    assert choose_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert choose_device("auto").type == "cuda"
    else:
        assert choose_device("auto").type == "cpu"
        with pytest.raises(Med3DFMError, match="no CUDA GPU"):
            choose_device("cuda")
    with pytest.raises(Med3DFMError, match="unknown device"):
        choose_device("tpu")


def test_memory_guard_refuses_a_volume_too_big_for_memory():
    with pytest.raises(Med3DFMError, match=r"not enough main memory .* needs about .* GiB, 2\.0 GiB available"):
        plan_memory((1024, 1024, 1024), 3, (96, 96, 96), torch.device("cpu"), host_available=2 * GIB)


def test_memory_guard_shrinks_the_window_batch_first():
    roomy = plan_memory((128, 128, 128), 3, (96, 96, 96), torch.device("cpu"), batch_size=4, host_available=64 * GIB)
    tight = plan_memory((128, 128, 128), 3, (96, 96, 96), torch.device("cpu"), batch_size=4, host_available=int(1.2 * GIB))
    assert roomy == 4 and 1 <= tight < 4


def test_memory_guard_on_a_small_gpu():
    with pytest.raises(Med3DFMError, match="not enough GPU memory"):
        plan_memory((128, 128, 128), 3, (96, 96, 96), torch.device("cuda"), host_available=64 * GIB, device_available=10 * 1024**2)
