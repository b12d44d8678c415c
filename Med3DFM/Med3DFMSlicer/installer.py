"""Installing what the jobs need into Slicer's Python, on the main thread, after one consent dialog.

PyTorch comes through the PyTorch extension's helper (it picks the CUDA build that matches the
driver); the rest from Resources/requirements.txt (Med3DFMSupport.dependencies says what is missing).
Packages Slicer ships are never replaced.
"""

from __future__ import annotations

import importlib
from typing import List

import slicer
from slicer.i18n import tr as _

from Med3DFMSupport import dependencies


def ensureDependencies(requirements: List[str], askConfirmation: bool = True, force: bool = False) -> bool:
    """Install what is missing of `requirements` and PyTorch (everything in `requirements` again when
    `force`). Returns False if the user declined or something is still missing; in testing mode
    nothing is installed: a missing package is an error."""
    missing = list(requirements) if force else dependencies.missing_requirements(requirements)
    needTorch = not dependencies.torch_installed()
    if not missing and not needTorch:
        return True
    if askConfirmation and not slicer.app.testingEnabled():
        items = (["torch (through the PyTorch extension)"] if needTorch else []) + missing
        message = _(
            "Med3DFM needs these Python packages in Slicer's Python environment:\n\n{packages}\n\n"
            "They are downloaded from the Python Package Index (several hundred MB for PyTorch). Continue?"
        ).format(packages="\n".join("  • " + item for item in items))
        if not slicer.util.confirmOkCancelDisplay(message, _("Med3DFM: install Python packages")):
            return False
    elif slicer.app.testingEnabled() and (missing or needTorch):
        raise RuntimeError(f"Med3DFM: Python packages missing in testing mode (not installed automatically): {missing + (['torch'] if needTorch else [])}")
    if needTorch:
        installTorch()
    if missing:
        pipInstall(missing, force)
    return not dependencies.missing_requirements(requirements) and dependencies.torch_installed()


def installTorch() -> None:
    """PyTorch through the PyTorch extension (consent was given in our own dialog already)."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(_("Med3DFM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer and try again."))
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
    if torch is None:
        raise RuntimeError(_("PyTorch was not installed."))


def pipInstall(requirements: List[str], force: bool) -> None:
    """Install requirement strings with Slicer's own helper.

    slicer.packaging.pip_ensure (Slicer >= 5.11; slicer.pydeps in some previews, which needs
    Requirement objects) checks, installs and offers a restart when an already imported package
    changed; older Slicer: pip_install.
    """
    from packaging.requirements import Requirement

    ensure = None
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            ensure = getattr(importlib.import_module(name), "pip_ensure", None)
        except ImportError:
            continue
        if ensure is not None:
            break
    if ensure is not None and not force:
        ensure([Requirement(r) for r in requirements], prompt_install=False, requester="Med3DFM")
        return
    arguments = (["--force-reinstall", "--no-deps"] if force else []) + requirements
    slicer.util.pip_install(arguments)  # a list: requirements with spaces or markers stay intact
