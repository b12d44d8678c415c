"""Shared fixtures: real volumes from Testing/Data (see its ATTRIBUTION.md) and ../shared/data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "Testing" / "Data"
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def hippocampus_case() -> tuple:
    """(image, labels) of a held-out test case of the demo model."""
    return DATA / "hippocampus" / "images" / "hippocampus_014.nii.gz", DATA / "hippocampus" / "labels" / "hippocampus_014.nii.gz"


@pytest.fixture(scope="session")
def dicom_series() -> Path:
    return DATA / "totalseg" / "example_ct_dicom"


@pytest.fixture(autouse=True)
def isolated_model_home(tmp_path_factory, monkeypatch):
    """Never touch the user's real model cache from a test."""
    monkeypatch.setenv("MED3DFM_HOME", str(tmp_path_factory.mktemp("med3dfm_home")))
    monkeypatch.delenv("MED3DFM_REGISTRY", raising=False)
