"""What the jobs need installed in Slicer's Python, and what is: read without importing the packages.

Resources/requirements.txt lists the packages Med3DFM installs with pip, each with a floor and a
ceiling. PyTorch comes through the PyTorch extension (the build that matches the GPU driver), in the
range TORCH_REQUIREMENT. What Slicer ships (SLICER_OWNED) is never installed, upgraded or replaced:
while pip runs, those packages are constraints pinned to the installed versions.

The Slicer side (Med3DFMSlicer/installer.py) asks the user, runs the steps of `install_plan`, and keeps
what is left for after a restart in a settings marker (`PendingInstall`, under RESUME_SETTINGS_KEY).
Everything here is plain Python: it decides, Slicer does.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

# Packages that belong to Slicer (numpy, SimpleITK, requests, vtk: shipped with it; torch: the PyTorch
# extension's). Med3DFM never pip-installs them; they are pinned while it installs anything else. Slicer
# records VTK as a `vtk` distribution (SuperBuild/External_VTK.cmake, "create_dist_info"), so it is
# pinned like the others.
SLICER_OWNED: Tuple[str, ...] = ("numpy", "SimpleITK", "torch", "requests", "vtk")

# The PyTorch range given to the PyTorch extension (PyTorchUtilsLogic.installTorch(torchVersionRequirement=...),
# appended to "torch"). Floor: pyproject.toml; ceiling: the next minor after the tested 2.13.
TORCH_REQUIREMENT = "torch>=2.1,<2.14"

# Where the module keeps an installation that is to continue after a restart (Slicer's settings).
RESUME_SETTINGS_KEY = "Med3DFM/ResumeInstall"

_FLOOR_OPERATORS = (">=", ">", "==", "~=", "===")
_CEILING_OPERATORS = ("<", "<=", "==", "~=", "===")


def read_requirements(path: Path) -> List[str]:
    """Requirement strings of a requirements.txt: comments, blank lines and pip options left out."""
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            requirements.append(line)
    return requirements


def requirement_name(requirement: str) -> str:
    """`monai>=1.3` → `monai` (the distribution name, as pip and importlib.metadata know it)."""
    name = requirement
    for separator in ("[", ";", "<", ">", "=", "!", "~", " "):
        name = name.split(separator, 1)[0]
    return name.strip()


def canonical_name(name: str) -> str:
    """PEP 503 normalised name: `Simple_ITK` and `simple-itk` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_specifier(requirement: str) -> str:
    """`torch>=2.1,<2.14` → `>=2.1,<2.14` (what PyTorchUtils appends to "torch"), floor first."""
    from packaging.requirements import Requirement

    specifiers = sorted(Requirement(requirement).specifier, key=lambda s: (s.operator not in (">=", ">"), str(s)))
    return ",".join(str(s) for s in specifiers)


def unbounded_requirements(requirements: Iterable[str]) -> List[str]:
    """The requirements without a floor or without a ceiling (`==` and `~=` are both)."""
    from packaging.requirements import Requirement

    unbounded = []
    for text in requirements:
        operators = {spec.operator for spec in Requirement(text).specifier}
        if not operators & set(_FLOOR_OPERATORS) or not operators & set(_CEILING_OPERATORS):
            unbounded.append(text)
    return unbounded


def slicer_owned(requirements: Iterable[str], owned: Sequence[str] = SLICER_OWNED) -> List[str]:
    """The requirements that name a package Slicer owns (which Med3DFM must never install)."""
    names = {canonical_name(n) for n in owned}
    return [r for r in requirements if canonical_name(requirement_name(r)) in names]


def installed_versions(names: Iterable[str]) -> Dict[str, Optional[str]]:
    """Installed distribution versions (None if absent), without importing the packages."""
    from importlib import metadata

    versions: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _version_of(installed: Mapping[str, Optional[str]], name: str) -> Optional[str]:
    if name in installed:
        return installed[name]
    wanted = canonical_name(name)
    return next((v for k, v in installed.items() if canonical_name(k) == wanted), None)


def satisfied(requirement: str, installed_version: Optional[str]) -> bool:
    """Whether an installed version (None: not installed) meets a requirement; an installed
    pre-release inside the range counts."""
    if installed_version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - Slicer ships packaging
        return True
    return Requirement(requirement).specifier.contains(installed_version, prereleases=True)


def requirement_status(requirement: str, installed_version: Optional[str]) -> str:
    if installed_version is None:
        return "missing"
    return "ok" if satisfied(requirement, installed_version) else "outside the range"


def missing_requirements(requirements: Iterable[str]) -> List[str]:
    """The requirements not installed, or installed in a version outside their specifier."""
    requirements = list(requirements)
    installed = installed_versions([requirement_name(r) for r in requirements])
    return [r for r in requirements if not satisfied(r, installed[requirement_name(r)])]


def torch_installed() -> bool:
    return installed_versions(["torch"])["torch"] is not None


def cuda_likely_available() -> bool:
    """Without importing torch (seconds, and memory in Slicer's process): torch already imported and
    seeing CUDA, or an NVIDIA driver present."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:
            return False
    return shutil.which("nvidia-smi") is not None


# --- never touching Slicer's own packages ---------------------------------------------------------

def slicer_owned_constraints(installed: Mapping[str, Optional[str]], owned: Sequence[str] = SLICER_OWNED) -> List[str]:
    """pip constraint lines that keep Slicer's packages as they are: `numpy==2.4.6` for an installed
    one; `vtk<0` (no version can satisfy it, so pip fails rather than install it) for one that is
    not installed, e.g. VTK on a Slicer that records no `vtk` distribution."""
    from packaging.version import InvalidVersion, Version

    lines = []
    for name in owned:
        version = _version_of(installed, name)
        if version is None:
            lines.append(f"{name}<0")
            continue
        try:
            Version(version)
            lines.append(f"{name}=={version}")
        except InvalidVersion:
            lines.append(f"{name}==={version}")
    return lines


def constraints_text(installed: Mapping[str, Optional[str]], owned: Sequence[str] = SLICER_OWNED) -> str:
    """A pip constraints file (`pip install -c FILE`) pinning Slicer's own packages."""
    header = ["# Written by Med3DFM for one pip run: Slicer's own packages stay as they are.",
              "# `NAME<0`: not installed, and must not be installed by pip."]
    return "\n".join(header + slicer_owned_constraints(installed, owned)) + "\n"


# --- what to install, in which order --------------------------------------------------------------

@dataclass
class PendingInstall:
    """An installation to continue after Slicer restarts: the steps still to run (requirement strings;
    the one naming torch is done by the PyTorch extension), whether it was a forced reinstall, why it stopped."""

    remaining: List[str] = field(default_factory=list)
    force: bool = False
    reason: str = ""

    def to_text(self) -> str:
        return json.dumps({"remaining": list(self.remaining), "force": bool(self.force), "reason": self.reason})

    @staticmethod
    def from_text(text: Any) -> Optional["PendingInstall"]:
        """The marker read back from the settings; None for nothing or for something unreadable
        (an unreadable marker must not block the module)."""
        if not text:
            return None
        try:
            data = json.loads(str(text))
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("remaining"), list):
            return None
        remaining = [r for r in data["remaining"] if isinstance(r, str) and r.strip()]
        if not remaining:
            return None
        return PendingInstall(remaining, bool(data.get("force", False)), str(data.get("reason", "")))


def is_torch_step(step: str) -> bool:
    return canonical_name(requirement_name(step)) == "torch"


def install_plan(requirements: Sequence[str], installed: Mapping[str, Optional[str]], force: bool = False,
                 pending: Optional[PendingInstall] = None, torch_requirement: str = TORCH_REQUIREMENT) -> List[str]:
    """The steps to run, in order: PyTorch first (through the PyTorch extension) if it is not installed,
    then the requirements pip installs: all of them when `force`, else the missing and out-of-range ones.

    An installation left for after a restart (`pending`) adds what it still owed when it was a forced
    reinstall (the rest is covered by "missing"); its steps are taken in the range the requirements
    file gives now, and a package the file no longer lists is dropped. An installed torch is never
    reinstalled, even outside TORCH_REQUIREMENT (that is the PyTorch extension's to change).
    """
    owned = slicer_owned(requirements)
    if owned:
        raise ValueError(f"Med3DFM must not install packages Slicer owns: {owned}")
    owed: Set[str] = set()
    if pending is not None and pending.force:
        owed = {canonical_name(requirement_name(r)) for r in pending.remaining if not is_torch_step(r)}
    steps = [torch_requirement] if _version_of(installed, "torch") is None else []
    for requirement in requirements:
        name = requirement_name(requirement)
        if force or canonical_name(name) in owed or not satisfied(requirement, _version_of(installed, name)):
            steps.append(requirement)
    return steps


def install_groups(steps: Sequence[str]) -> List[List[str]]:
    """The plan as the calls that run it: [torch] (the PyTorch extension), then one pip call."""
    torch_steps = [s for s in steps if is_torch_step(s)]
    pip_steps = [s for s in steps if not is_torch_step(s)]
    return [group for group in (torch_steps[:1], pip_steps) if group]


# --- does Slicer need a restart? ------------------------------------------------------------------

def installed_distributions() -> Dict[str, str]:
    """{canonical name: version} of every installed distribution, read fresh (after pip has run)."""
    from importlib import metadata

    importlib.invalidate_caches()
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions[canonical_name(name)] = dist.version
    return versions


def distribution_imports() -> Dict[str, Set[str]]:
    """{canonical distribution name: its top-level import names} (packages_distributions needs Python
    3.10; before that, the distributions' top_level.txt)."""
    from importlib import metadata

    imports: Dict[str, Set[str]] = {}
    if hasattr(metadata, "packages_distributions"):
        for module, dists in metadata.packages_distributions().items():
            for dist in dists:
                imports.setdefault(canonical_name(dist), set()).add(module)
        return imports
    for dist in metadata.distributions():  # pragma: no cover - Python 3.9
        name = dist.metadata["Name"]
        if name:
            modules = (dist.read_text("top_level.txt") or "").split()
            imports.setdefault(canonical_name(name), set()).update(modules or [canonical_name(name).replace("-", "_")])
    return imports


def restart_needed(before: Mapping[str, str], after: Mapping[str, str], imported: Iterable[str],
                   imports: Mapping[str, Iterable[str]], reinstalled: Iterable[str] = ()) -> List[Tuple[str, Optional[str], Optional[str]]]:
    """(name, old version, new version) of each distribution an install changed while Slicer had it
    imported: a new version, a fresh install of something already in memory, or (`reinstalled`, a forced
    reinstall) the same version's files replaced. Slicer's pip_ensure makes the same comparison
    (slicer.packaging._find_updated_imported_packages, Slicer 5.12)."""
    imported = set(imported)

    def in_memory(name: str) -> bool:
        modules = set(imports.get(name, ())) or {name.replace("-", "_")}
        return bool(modules & imported)

    changes: List[Tuple[str, Optional[str], Optional[str]]] = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old != new and new is not None and in_memory(name):
            changes.append((name, old, new))
    seen = {name for name, _old, _new in changes}
    for raw in reinstalled:
        name = canonical_name(requirement_name(raw))
        if name not in seen and name in after and in_memory(name):
            changes.append((name, after[name], after[name]))
            seen.add(name)
    return changes


def describe_changes(changes: Iterable[Tuple[str, Optional[str], Optional[str]]]) -> List[str]:
    lines = []
    for name, old, new in changes:
        if old is None:
            lines.append(f"{name}: (new) -> {new}")
        elif old == new:
            lines.append(f"{name}: {new} (reinstalled)")
        else:
            lines.append(f"{name}: {old} -> {new}")
    return lines


# --- "Show package info" --------------------------------------------------------------------------

def torch_build(torch_module: Any = None, version: Optional[str] = None) -> str:
    """Which PyTorch build is installed: from the imported module if there is one (torch.version.cuda),
    else from the version's local tag (`2.13.0+cu121`), without importing torch."""
    if torch_module is not None:
        cuda = getattr(getattr(torch_module, "version", None), "cuda", None)
        return f"CUDA {cuda} build (torch.version.cuda)" if cuda else "CPU build (torch.version.cuda is None)"
    if not version:
        return ""
    local = version.split("+", 1)[1] if "+" in version else ""
    match = re.fullmatch(r"cu(\d+)(\d)", local)
    if match:
        return f"CUDA {match.group(1)}.{match.group(2)} build (from the version tag; torch not imported yet)"
    if local == "cpu":
        return "CPU build (from the version tag; torch not imported yet)"
    if local.startswith("rocm"):
        return f"ROCm {local[4:]} build (from the version tag; torch not imported yet)"
    return "build unknown until torch is imported (no tag in the version)"


def package_info_text(requirements: Sequence[str], installed: Mapping[str, Optional[str]], torch_module: Any = None,
                      pending: Optional[PendingInstall] = None, owned: Sequence[str] = SLICER_OWNED,
                      torch_requirement: str = TORCH_REQUIREMENT) -> str:
    """What "Show package info" shows: each package Med3DFM installs with its required range, the
    installed version and whether it meets it; PyTorch and its build; Slicer's own packages; and an
    installation waiting for a restart."""

    def row(name: str, required: str, version: Optional[str], status: str) -> str:
        return f"  {name}: required {required}, installed {version or '-'}: {status}"

    lines = ["Med3DFM: Python packages in Slicer's environment", ""]
    lines.append("Installed by Med3DFM with pip (Resources/requirements.txt):")
    for requirement in requirements:
        name = requirement_name(requirement)
        version = _version_of(installed, name)
        lines.append(row(name, requirement_specifier(requirement), version, requirement_status(requirement, version)))
    lines += ["", "Installed through the PyTorch extension (never upgraded by Med3DFM):"]
    torch_version = _version_of(installed, "torch")
    status = requirement_status(torch_requirement, torch_version)
    if status == "outside the range":
        status += " (Med3DFM keeps it; change it in the PyTorch Utils module)"
    lines.append(row("torch", requirement_specifier(torch_requirement), torch_version, status))
    build = torch_build(torch_module, torch_version)
    if build:
        lines.append(f"    {build}")
    lines += ["", "Slicer's own (never installed or upgraded by Med3DFM; pinned while it installs):"]
    for name in owned:
        if canonical_name(name) != "torch":
            lines.append(f"  {name}: {_version_of(installed, name) or 'not installed'}")
    lines.append("")
    if pending is None:
        lines.append("Installation waiting for a restart: none")
    else:
        lines.append("Installation waiting for a restart" + (" (forced reinstall)" if pending.force else "") + ":")
        lines += [f"  {step}" for step in pending.remaining]
        if pending.reason:
            lines.append("  why: " + pending.reason.replace("\n", "\n    "))
        lines.append("  Med3DFM offers to continue it when the module opens or a job starts.")
    return "\n".join(lines) + "\n"
