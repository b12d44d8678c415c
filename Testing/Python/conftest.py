"""Shared fixtures: real volumes from Testing/Data (see its ATTRIBUTION.md), and the `shared` marker.

Tests marked `shared` need ../shared beside the checkout (the whole of ../shared/data, or its notes);
every other test uses Testing/Data only, so `make test` passes on a clone with nothing beside it.
A shared test run without ../shared/data fails with one line (`make test` does not collect it then;
`make test-shared` refuses to start),
and a test without the marker that reads under ../shared through Python (open, np.load, glob,
listdir) fails: that guard cannot see reads made inside ITK, which a run on a lone clone catches.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "Testing" / "Data"
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
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


@pytest.fixture(scope="session")
def evaluation_data(tmp_path_factory) -> Path:
    """A small folder laid out like ../shared/data for the evaluation scripts (their MED3DFM_DATA):
    hippocampus/images + labels with the six shipped crops (004, 006, 014, 024, 035, 090) and
    totalseg/classmap.json. The scripts' split (every 5th case by name) then holds out 004 and 090,
    and the first training case is 006, as in the full folder."""
    folder = tmp_path_factory.mktemp("evaluation_data")
    for part in ("images", "labels"):
        (folder / "hippocampus" / part).mkdir(parents=True)
        for source in (DATA / "hippocampus" / part, DATA / "evaluation" / "hippocampus" / part):
            for path in source.glob("*.nii.gz"):
                shutil.copyfile(path, folder / "hippocampus" / part / path.name)
    (folder / "totalseg").mkdir()
    shutil.copyfile(DATA / "totalseg" / "classmap.json", folder / "totalseg" / "classmap.json")
    return folder


@pytest.fixture(autouse=True)
def isolated_model_home(tmp_path_factory, monkeypatch):
    """Never touch the user's real model cache from a test."""
    monkeypatch.setenv("MED3DFM_HOME", str(tmp_path_factory.mktemp("med3dfm_home")))
    monkeypatch.delenv("MED3DFM_REGISTRY", raising=False)


# --- the `shared` marker -------------------------------------------------------------------------


def pytest_runtest_setup(item):
    if item.get_closest_marker("shared") and not SHARED_DATA.is_dir():
        pytest.fail(f"needs ../shared/data beside the checkout ({SHARED_DATA}); `make test` leaves it out there, `make test-shared` runs it where ../shared is", pytrace=False)


_SHARED_PREFIX = os.path.realpath(SHARED) + os.sep
_WATCHED = {"open", "os.listdir", "os.scandir", "glob.glob"}
_VIOLATIONS = pytest.StashKey[list]()
_unmarked: Optional[pytest.Item] = None  # the running test, when it is not marked `shared`
_checking = False


def _no_shared_reads(event: str, args: tuple) -> None:
    """Audit hook: a test without the `shared` marker may not read under ../shared."""
    global _checking
    if _unmarked is None or _checking or event not in _WATCHED or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return  # also a file descriptor, or scandir() of the working directory
    _checking = True
    try:
        text = os.fsdecode(os.fspath(args[0]))
        if "shared" in text and (os.path.realpath(os.path.join(os.getcwd(), text)) + os.sep).startswith(_SHARED_PREFIX):
            message = f"{_unmarked.nodeid} reads {text}, under ../shared, without the `shared` marker: use Testing/Data or mark it @pytest.mark.shared"
            _unmarked.stash.setdefault(_VIOLATIONS, []).append(message)
            raise PermissionError(message)
    finally:
        _checking = False


sys.addaudithook(_no_shared_reads)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _unmarked
    _unmarked = None if item.get_closest_marker("shared") else item
    try:
        yield
    finally:
        _unmarked = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    violations = item.stash.get(_VIOLATIONS, [])
    if violations and report.passed and report.when == "call":  # the PermissionError was caught by the code under test
        report.outcome = "failed"
        report.longrepr = "\n".join(violations)
