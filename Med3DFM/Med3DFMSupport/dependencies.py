"""What the jobs need installed in Slicer's Python, and what is: read without importing the packages.

Resources/requirements.txt lists the packages besides PyTorch (which comes through the PyTorch
extension, the build that matches the GPU driver) and besides what Slicer ships. The Slicer side
(Med3DFMSlicer/dependencies.py) asks the user and installs what `missing_requirements` returns.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional


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


def missing_requirements(requirements: Iterable[str]) -> List[str]:
    """The requirements not installed, or installed in a version outside their specifier."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - Slicer ships packaging
        Requirement = None
    missing = []
    for text in requirements:
        name = requirement_name(text)
        installed = installed_versions([name])[name]
        if installed is None:
            missing.append(text)
        elif Requirement is not None and installed not in Requirement(text).specifier:
            missing.append(text)
    return missing


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
