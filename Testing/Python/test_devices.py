"""Where jobs run: the device report asks torch itself, `auto` prefers CUDA then Apple MPS, a device that
is not there is refused with one line, and the MPS fallback is on before torch is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
import torch

from Med3DFMLib import devices
from Med3DFMLib.cli import main
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.inference import choose_device


def test_report_agrees_with_torch_and_the_machine():
    report = devices.device_report()
    assert report["torch"] == torch.__version__ and report["torch_cuda_build"] == torch.version.cuda
    assert report["cuda_available"] == torch.cuda.is_available()
    assert len(report["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for gpu in report["cuda_devices"]:
        assert gpu["memory_gib"] > 0 and gpu["name"]
    assert report["auto"] == ("cuda" if torch.cuda.is_available() else "mps" if report["mps_available"] else "cpu")
    assert 0 < report["ram_available_gib"] <= report["ram_gib"] <= psutil.virtual_memory().total / devices.GIB + 0.01
    assert report["cpu_threads"] == os.cpu_count() and report["torch_threads"] == torch.get_num_threads()
    text = devices.describe(report)
    assert f"torch {torch.__version__}" in text and f"--device auto runs on: {report['auto']}" in text
    assert ("GPU 0:" in text) == bool(report["cuda_devices"])


def test_the_cli_prints_the_report(capsys):
    assert main(["devices", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["auto"] == devices.best_device_name()
    assert main(["devices"]) == 0
    assert "RAM:" in capsys.readouterr().out


def test_driver_version_is_read_from_the_kernel_module_line(tmp_path):
    sample = tmp_path / "version"
    sample.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc version 12.3.0\n")
    assert devices.nvidia_driver_version(sample) == "550.54.15"
    assert devices.nvidia_driver_version(tmp_path / "absent") is None
    (tmp_path / "odd").write_text("something else\n")
    assert devices.nvidia_driver_version(tmp_path / "odd") is None


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.best_device_name() == "mps"
    assert choose_device("auto").type == "mps" and choose_device("mps").type == "mps"
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert choose_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.best_device_name() == "cuda"


def test_a_missing_device_is_refused_in_one_line():
    if devices.mps_available():
        assert choose_device("mps").type == "mps"
    else:
        with pytest.raises(Med3DFMError, match="mps was asked for.*med3dfm devices"):
            choose_device("mps")
    if torch.cuda.is_available():
        assert choose_device("cuda").type == "cuda"
    else:
        with pytest.raises(Med3DFMError, match="cuda was asked for"):
            choose_device("cuda")
    with pytest.raises(Med3DFMError, match="unknown device"):
        choose_device("tpu")


def test_mps_fallback_is_set_before_torch_and_a_users_choice_is_kept():
    code = "import os, Med3DFMLib, torch; print(os.environ['PYTORCH_ENABLE_MPS_FALLBACK'])"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip() == "1"
    env["PYTORCH_ENABLE_MPS_FALLBACK"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip() == "0"
