"""What the Slicer module installs into Slicer's Python, without Slicer (Med3DFMSupport.dependencies):
the extension's dependency on the PyTorch extension, bounded requirements, Slicer's own packages left
alone, the install plan, the restart marker and the package-info text. The Slicer glue that runs them
(Med3DFMSlicer/installer.py) is tested on the stand-in in test_slicer_module.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "Med3DFM"
REQUIREMENTS = ROOT / "Resources" / "requirements.txt"
sys.path.insert(0, str(MODULE_DIR))

from Med3DFMSupport import dependencies  # noqa: E402
from Med3DFMSupport.dependencies import PendingInstall  # noqa: E402

TORCH = dependencies.TORCH_REQUIREMENT


def _cmake_extension_depends(text: str) -> list:
    """The value of set(EXTENSION_DEPENDS ...) as a list: CMake separates by blanks or ';', "NA" is none."""
    match = re.search(r"^\s*set\(\s*EXTENSION_DEPENDS\s+([^)#]*)\)", text, re.MULTILINE)
    assert match, "CMakeLists.txt sets no EXTENSION_DEPENDS"
    names = [n.strip('"') for n in re.split(r"[\s;]+", match.group(1).strip()) if n.strip('"')]
    return [] if names == ["NA"] else names


def test_catalog_entry_and_cmake_name_the_same_extensions():
    catalog = json.loads((ROOT / "Med3DFM.json").read_text(encoding="utf-8"))
    depends = _cmake_extension_depends((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert depends == catalog["build_dependencies"] == ["PyTorch"]  # "PyTorch": SlicerPyTorch's name in Slicer/ExtensionsIndex
    # Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: required keys, and no others allowed
    assert {"$schema", "category", "scm_url"} <= set(catalog)
    assert set(catalog) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory", "enabled", "tier"}
    assert 1 <= catalog["tier"] <= 5
    assert _cmake_extension_depends('set(EXTENSION_DEPENDS "NA") # none') == []
    assert _cmake_extension_depends("set(EXTENSION_DEPENDS PyTorch NNUNet)") == ["PyTorch", "NNUNet"]
    assert _cmake_extension_depends('set(EXTENSION_DEPENDS "PyTorch;NNUNet")') == ["PyTorch", "NNUNet"]


def test_every_requirement_has_a_floor_and_a_ceiling():
    requirements = dependencies.read_requirements(REQUIREMENTS)
    assert requirements and dependencies.unbounded_requirements(requirements) == []
    assert dependencies.unbounded_requirements([TORCH]) == []
    lines = ["monai>=1.3", "monai<2", "monai", "monai>=1.3,<1.7", "x==1.0", "y~=1.4", "z>1,<=2", "w!=1.5,>=1"]
    assert dependencies.unbounded_requirements(lines) == ["monai>=1.3", "monai<2", "monai", "w!=1.5,>=1"]


def test_ceilings_admit_the_versions_the_project_tests():
    """The bounds hold the versions this environment (the project's setup, `make`) runs the tests with:
    a ceiling below them, or a floor above, would install something untested."""
    requirements = dependencies.read_requirements(REQUIREMENTS) + [TORCH]
    installed = dependencies.installed_versions([dependencies.requirement_name(r) for r in requirements])
    outside = {r: installed[dependencies.requirement_name(r)] for r in requirements
               if not dependencies.satisfied(r, installed[dependencies.requirement_name(r)])}
    assert outside == {}


def test_requirements_never_name_a_package_slicer_owns():
    requirements = dependencies.read_requirements(REQUIREMENTS)
    assert dependencies.slicer_owned(requirements) == []
    assert {"numpy", "SimpleITK", "torch", "requests"} <= set(dependencies.SLICER_OWNED)
    named = ["NumPy>=1,<3", "simpleitk>=2,<3", "monai>=1.3,<1.7", "Torch>=2,<3", "requests<3,>=2", "Simple_ITK>=1,<2"]
    assert dependencies.slicer_owned(named) == ["NumPy>=1,<3", "simpleitk>=2,<3", "Torch>=2,<3", "requests<3,>=2"]
    with pytest.raises(ValueError, match="Slicer owns"):
        dependencies.install_plan(["monai>=1.3,<1.7", "numpy>=1,<3"], {"torch": "2.13.0"})


def test_constraints_pin_slicer_packages_to_the_installed_versions():
    installed = {"numpy": "2.4.6", "SimpleITK": "2.5.7", "torch": "2.13.0+cu121", "requests": "2.34.2", "vtk": None}
    lines = dependencies.slicer_owned_constraints(installed)
    assert lines == ["numpy==2.4.6", "SimpleITK==2.5.7", "torch==2.13.0+cu121", "requests==2.34.2", "vtk<0"]
    constraints = {Requirement(line).name: Requirement(line).specifier for line in lines}
    assert constraints["numpy"].contains("2.4.6") and not constraints["numpy"].contains("2.5.0") and not constraints["numpy"].contains("1.26.4")
    assert constraints["torch"].contains("2.13.0+cu121") and not constraints["torch"].contains("2.13.1")
    assert not any(constraints["vtk"].contains(v, prereleases=True) for v in ("0", "0.0.1", "9.3.0", "0.dev0"))  # absent: pip may not add it
    assert dependencies.slicer_owned_constraints({"numpy": "1.0-custom-build"}, owned=("numpy",)) == ["numpy===1.0-custom-build"]
    text = dependencies.constraints_text(installed)
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body == lines and text.endswith("\n")
    # names are matched as pip matches them (a dictionary from importlib.metadata may spell them differently)
    assert dependencies.slicer_owned_constraints({"simpleitk": "2.4.0"}, owned=("SimpleITK",)) == ["SimpleITK==2.4.0"]


def test_install_plan_is_torch_first_then_what_pip_must_install():
    requirements = ["monai>=1.3,<1.7", "pynrrd>=1.0,<2", "tqdm>=4.60,<5"]
    ok = {"torch": "2.13.0", "monai": "1.6.1", "pynrrd": "1.1.3", "tqdm": "4.70.1"}
    assert dependencies.install_plan(requirements, ok) == []
    assert dependencies.install_plan(requirements, {**ok, "torch": None, "pynrrd": None}) == [TORCH, "pynrrd>=1.0,<2"]
    # outside the range either way: too old or a release newer than the ceiling
    assert dependencies.install_plan(requirements, {**ok, "monai": "1.2.0", "tqdm": "5.0.0"}) == ["monai>=1.3,<1.7", "tqdm>=4.60,<5"]
    assert dependencies.install_plan(requirements, {**ok, "monai": "1.7.0rc1"}) == ["monai>=1.3,<1.7"]
    # force reinstalls every requirement, never PyTorch; an installed torch outside its range is not replaced either
    assert dependencies.install_plan(requirements, {**ok, "torch": "1.13.1"}, force=True) == requirements
    assert dependencies.install_plan(requirements, {**ok, "torch": "1.13.1"}) == []
    assert dependencies.install_groups([TORCH, "pynrrd>=1.0,<2", "tqdm>=4.60,<5"]) == [[TORCH], ["pynrrd>=1.0,<2", "tqdm>=4.60,<5"]]
    assert dependencies.install_groups(["tqdm>=4.60,<5"]) == [["tqdm>=4.60,<5"]] and dependencies.install_groups([]) == []


def test_a_pending_install_resumes_what_it_still_owes():
    requirements = ["monai>=1.3,<1.7", "pynrrd>=1.0,<2", "tqdm>=4.60,<5"]
    ok = {"torch": "2.13.0", "monai": "1.6.1", "pynrrd": "1.1.3", "tqdm": "4.70.1"}
    # a plain install that stopped: what it had left is done now, nothing to resume
    stopped = PendingInstall([TORCH, "monai>=1.3,<1.7"], force=False)
    assert dependencies.install_plan(requirements, ok, pending=stopped) == []
    assert dependencies.install_plan(requirements, {**ok, "torch": None}, pending=stopped) == [TORCH]
    # a forced reinstall that stopped still owes its packages although they are installed, in today's
    # range (the module may have been updated in between); one the module no longer needs is dropped
    forced = PendingInstall(["pynrrd>=0.4", "oldpackage>=1", TORCH], force=True)
    assert dependencies.install_plan(requirements, ok, pending=forced) == ["pynrrd>=1.0,<2"]
    assert dependencies.install_plan(requirements, {**ok, "tqdm": None}, pending=forced) == ["pynrrd>=1.0,<2", "tqdm>=4.60,<5"]


def test_the_marker_reads_back_and_garbage_is_no_marker():
    pending = PendingInstall([TORCH, "monai>=1.3,<1.7"], force=True, reason="numpy: 1.26 -> 2.0\nin use")
    assert PendingInstall.from_text(pending.to_text()) == pending
    assert json.loads(pending.to_text())["remaining"] == [TORCH, "monai>=1.3,<1.7"]
    for garbage in (None, "", "not json", "[]", '{"remaining": "monai"}', '{"remaining": []}', '{"remaining": [1, " "]}', 0):
        assert PendingInstall.from_text(garbage) is None, garbage
    assert PendingInstall.from_text('{"remaining": ["tqdm>=4.60,<5"]}') == PendingInstall(["tqdm>=4.60,<5"], False, "")


def test_restart_is_needed_for_what_slicer_has_in_memory():
    before = {"numpy": "1.26.4", "tqdm": "4.66.0", "monai": "1.3.0", "py-thing": "1.0"}
    after = {"numpy": "1.26.4", "tqdm": "4.70.1", "monai": "1.6.1", "psutil": "7.2.2", "py-thing": "2.0", "fresh": "1.0"}
    imported = {"tqdm", "numpy", "psutil", "py_thing", "json"}
    imports = {"tqdm": {"tqdm"}, "monai": {"monai"}, "psutil": {"psutil"}, "numpy": {"numpy"}, "fresh": {"fresh"}}
    # tqdm: new version while loaded; psutil: reinstalled after an uninstall, old module still loaded;
    # py-thing: no import names known, its import name is guessed; monai changed but was never imported
    assert dependencies.restart_needed(before, after, imported, imports) == [("psutil", None, "7.2.2"), ("py-thing", "1.0", "2.0"), ("tqdm", "4.66.0", "4.70.1")]
    assert dependencies.restart_needed(before, before, imported, imports) == []
    # a forced reinstall replaces files of the same version: a loaded one needs a restart, an unloaded one does not
    assert dependencies.restart_needed(before, before, imported, imports, reinstalled=["numpy>=1,<3", "monai>=1.3,<1.7"]) == [("numpy", "1.26.4", "1.26.4")]
    assert dependencies.describe_changes([("psutil", None, "7.2.2"), ("tqdm", "4.66.0", "4.70.1"), ("numpy", "1.26.4", "1.26.4")]) == [
        "psutil: (new) -> 7.2.2", "tqdm: 4.66.0 -> 4.70.1", "numpy: 1.26.4 (reinstalled)"]


def test_the_installed_distributions_and_their_import_names_are_read_from_metadata():
    import numpy

    versions = dependencies.installed_distributions()
    assert versions["numpy"] == numpy.__version__ and "simpleitk" in versions  # canonical names
    imports = dependencies.distribution_imports()
    assert "numpy" in imports["numpy"] and "nrrd" in imports["pynrrd"]  # pynrrd is imported as nrrd
    assert dependencies.restart_needed({"pynrrd": "0.1"}, {"pynrrd": versions["pynrrd"]}, {"nrrd"}, imports) == [("pynrrd", "0.1", versions["pynrrd"])]


class _FakeTorch:
    def __init__(self, cuda):
        self.version = types.SimpleNamespace(cuda=cuda)


def test_torch_build_from_the_module_or_the_version_tag():
    assert dependencies.torch_build(_FakeTorch("12.1"), "2.13.0") == "CUDA 12.1 build (torch.version.cuda)"
    assert dependencies.torch_build(_FakeTorch(None), "2.13.0+cu121").startswith("CPU build")  # the module wins
    assert dependencies.torch_build(None, "2.13.0+cu121").startswith("CUDA 12.1 build (from the version tag")
    assert dependencies.torch_build(None, "2.5.1+cu118").startswith("CUDA 11.8 build")
    assert dependencies.torch_build(None, "2.13.0+cpu").startswith("CPU build (from the version tag")
    assert dependencies.torch_build(None, "2.4.0+rocm6.1").startswith("ROCm 6.1 build")
    assert dependencies.torch_build(None, "2.13.0").startswith("build unknown")
    assert dependencies.torch_build(None, None) == ""


def test_package_info_text_shows_required_installed_owned_and_the_marker():
    requirements = ["monai>=1.3,<1.7", "pynrrd>=1.0,<2", "tqdm>=4.60,<5"]
    installed = {"monai": "1.6.1", "pynrrd": None, "tqdm": "5.1.0", "torch": "2.13.0+cu121", "numpy": "2.4.6",
                 "SimpleITK": "2.5.7", "requests": "2.34.2", "vtk": None}
    text = dependencies.package_info_text(requirements, installed, torch_module=_FakeTorch("12.1"))
    assert "monai: required >=1.3,<1.7, installed 1.6.1: ok" in text
    assert "pynrrd: required >=1.0,<2, installed -: missing" in text
    assert "tqdm: required >=4.60,<5, installed 5.1.0: outside the range" in text
    assert "torch: required >=2.1,<2.14, installed 2.13.0+cu121: ok" in text and "CUDA 12.1 build (torch.version.cuda)" in text
    owned = text.split("Slicer's own")[1].split("\n\n")[0]
    assert "numpy: 2.4.6" in owned and "SimpleITK: 2.5.7" in owned and "requests: 2.34.2" in owned and "vtk: not installed" in owned
    assert "torch" not in owned  # listed once, with the PyTorch extension
    assert "waiting for a restart: none" in text
    old_torch = dependencies.package_info_text(requirements, {**installed, "torch": "1.13.1"})
    assert "installed 1.13.1: outside the range (Med3DFM keeps it" in old_torch and "build unknown" in old_torch
    pending = PendingInstall([TORCH, "pynrrd>=1.0,<2"], force=True, reason="tqdm: 4.66.0 -> 4.70.1\nin use")
    waiting = dependencies.package_info_text(requirements, installed, pending=pending).split("waiting for a restart")[1]
    assert waiting.startswith(" (forced reinstall):") and f"  {TORCH}\n  pynrrd>=1.0,<2\n" in waiting
    assert "why: tqdm: 4.66.0 -> 4.70.1\n    in use" in waiting


def test_package_info_of_this_environment_does_not_import_torch():
    """Run in a fresh interpreter: reading the versions and the build must not import torch (seconds
    and memory inside Slicer)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from Med3DFMSupport import dependencies as d; "
        "r = d.read_requirements(sys.argv[2]); "
        "v = d.installed_versions([d.requirement_name(x) for x in r] + list(d.SLICER_OWNED)); "
        "t = d.package_info_text(r, v, torch_module=sys.modules.get('torch')); "
        "print('torch' in sys.modules); print(t)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR), str(REQUIREMENTS)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    imported, text = run.stdout.split("\n", 1)
    assert imported == "False"
    torch_version = dependencies.installed_versions(["torch"])["torch"]
    assert f"torch: required >=2.1,<2.14, installed {torch_version}: ok" in text
    assert "not imported yet" in text or "build unknown until torch is imported" in text
