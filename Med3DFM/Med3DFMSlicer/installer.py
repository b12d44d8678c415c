"""Installing what the jobs need into Slicer's Python, on the main thread, after one consent dialog.

PyTorch comes through the PyTorch extension's helper (it picks the CUDA build that matches the
driver); the rest from Resources/requirements.txt. Med3DFMSupport.dependencies decides what to install
and whether a restart is needed; this file only asks, calls Slicer and keeps the settings marker.
Packages Slicer owns (dependencies.SLICER_OWNED) are never replaced: pip gets them as constraints
pinned to the installed versions.

Slicer APIs (checked against Slicer/Slicer, 5.13 development and the v5.6–v5.12 tags):
- slicer.packaging.pip_ensure(requirements, constraints=, prompt_install=, prompt_restart=, requester=)
  and slicer.packaging.pip_install(requirements, constraints=, requester=): Slicer >= 5.12
  (Base/Python/slicer/packaging.py); before that only slicer.util.pip_install(requirements), which takes
  a list of pip arguments ("-c FILE" among them).
- slicer.app.settings() -> QSettings (Base/QTCore/qSlicerCoreApplication.h), slicer.util.restart(),
  confirmOkCancelDisplay / confirmYesNoDisplay / infoDisplay(text, windowTitle, detailedText=)
  (Base/Python/slicer/util.py).
- PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation, forceComputationBackend,
  torchVersionRequirement, torchvisionVersionRequirement) -> the imported torch module, None only when its
  own confirmation was declined (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py). It says nothing
  about restarts: the need for one is found here, as pip_ensure finds it, by comparing the installed
  versions before and after with what Slicer has imported.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
from typing import List, Optional

import slicer
from slicer.i18n import tr as _

from Med3DFMSupport import dependencies

SETTINGS_KEY = dependencies.RESUME_SETTINGS_KEY


# --- the settings marker: an installation to continue after a restart ----------------------------

def pendingInstall() -> Optional[dependencies.PendingInstall]:
    settings = slicer.app.settings()
    return dependencies.PendingInstall.from_text(settings.value(SETTINGS_KEY)) if settings.contains(SETTINGS_KEY) else None


def _storePending(remaining: List[str], force: bool, reason: str) -> None:
    settings = slicer.app.settings()
    settings.setValue(SETTINGS_KEY, dependencies.PendingInstall(list(remaining), force, reason).to_text())
    settings.sync()  # written now: the marker must survive a crash or a restart from a dialog


def clearPendingInstall() -> None:
    settings = slicer.app.settings()
    if settings.contains(SETTINGS_KEY):
        settings.remove(SETTINGS_KEY)
        settings.sync()


def _installedVersions(requirements: List[str]):
    names = [dependencies.requirement_name(r) for r in requirements]
    return dependencies.installed_versions(names + list(dependencies.SLICER_OWNED))


def _describeSteps(steps: List[str]) -> str:
    return "\n".join("  • " + (_("{requirement} (through the PyTorch extension)").format(requirement=step)
                                if dependencies.is_torch_step(step) else step) for step in steps)


# --- what the module calls --------------------------------------------------------------------------

def ensureDependencies(requirements: List[str], askConfirmation: bool = True, force: bool = False) -> bool:
    """Install what is missing of `requirements` and PyTorch (everything in `requirements` again when
    `force`), and what an installation stopped for a restart still owes. Returns False if the user
    declined, a restart is needed before the rest can be installed, or something is still missing; in
    testing mode nothing is installed: a missing package is an error."""
    pending = pendingInstall()
    steps = dependencies.install_plan(requirements, _installedVersions(requirements), force=force, pending=pending)
    if not steps:
        if pending is not None:
            clearPendingInstall()  # finished in the meantime (e.g. installed by hand)
        return True
    if slicer.app.testingEnabled():
        raise RuntimeError(f"Med3DFM: Python packages missing in testing mode (not installed automatically): {steps}")
    if askConfirmation:
        intro = (_("Med3DFM continues the installation it started before Slicer restarted:") if pending is not None
                 else _("Med3DFM needs these Python packages in Slicer's Python environment:"))
        message = intro + "\n\n" + _describeSteps(steps) + "\n\n" + _(
            "They are downloaded from the Python Package Index (several hundred MB for PyTorch). "
            "Packages Slicer ships are not changed. Continue?")
        if not slicer.util.confirmOkCancelDisplay(message, _("Med3DFM: install Python packages")):
            return False
    return _install(steps, requirements, force or (pending is not None and pending.force))


def resumePendingInstall(requirements: List[str]) -> Optional[bool]:
    """When the module opens: continue an installation that stopped for a restart, after asking.
    Returns None when none was pending (or in testing mode, which never installs), else whether
    everything is installed now. Declining forgets the marker: the next job asks again for what is missing."""
    pending = pendingInstall()
    if pending is None or slicer.app.testingEnabled():
        return None
    steps = dependencies.install_plan(requirements, _installedVersions(requirements), pending=pending)
    if not steps:
        clearPendingInstall()
        return True
    message = _("An installation of Python packages for Med3DFM did not finish before Slicer restarted. Continue it now?") + "\n\n" + _describeSteps(steps)
    details = {"detailedText": pending.reason} if pending.reason else {}
    if not slicer.util.confirmOkCancelDisplay(message, _("Med3DFM: continue installing"), **details):
        clearPendingInstall()
        return False
    return _install(steps, requirements, pending.force)


def packageInfoText(requirements: List[str]) -> str:
    """The text of "Show package info" (dependencies.package_info_text), torch not imported for it."""
    return dependencies.package_info_text(requirements, _installedVersions(requirements),
                                          torch_module=sys.modules.get("torch"), pending=pendingInstall())


# --- running the steps -----------------------------------------------------------------------------

def _install(steps: List[str], requirements: List[str], force: bool) -> bool:
    """Run the plan call by call. Before each call the marker holds what remains (so an install that
    never returns is offered again after the next start); a call that changed packages Slicer has in
    memory stops the plan for a restart, with the rest kept in the marker."""
    groups = dependencies.install_groups(steps)
    for index, group in enumerate(groups):
        remaining = [step for g in groups[index:] for step in g]
        later = [step for g in groups[index + 1:] for step in g]
        _storePending(remaining, force, _("Slicer closed before the installation finished."))
        before = dependencies.installed_distributions()
        torchStep = dependencies.is_torch_step(group[0])
        try:
            if torchStep:
                installTorch(group[0])
            else:
                pipInstall(group, force)
        except Exception:
            changes = _restartNeeded(before, group, force and not torchStep)
            if not changes:
                clearPendingInstall()
                raise
            # e.g. Windows: files of a loaded package cannot be replaced until Slicer restarts
            reason = _("The installation failed while these packages were in use:") + "\n" + "\n".join(dependencies.describe_changes(changes))
            _storePending(remaining, force, reason)
            logging.exception("Med3DFM: installing Python packages failed while some were in use")
            _offerRestart(changes, remaining, failed=True)
            return False
        changes = _restartNeeded(before, group, force and not torchStep)
        if changes and later:
            _storePending(later, force, _("Restart needed: these packages were updated while in use:") + "\n"
                          + "\n".join(dependencies.describe_changes(changes)))
            _offerRestart(changes, later)
            return False
        if changes:
            clearPendingInstall()
            _offerRestart(changes, [])
    clearPendingInstall()
    importlib.invalidate_caches()
    return not dependencies.missing_requirements(requirements) and dependencies.torch_installed()


def _restartNeeded(before, group: List[str], reinstalled: bool):
    after = dependencies.installed_distributions()
    return dependencies.restart_needed(before, after, sys.modules.keys(), dependencies.distribution_imports(),
                                       reinstalled=group if reinstalled else ())


def _offerRestart(changes, remaining: List[str], failed: bool = False) -> None:
    details = "\n".join(dependencies.describe_changes(changes))
    if remaining:
        text = (_("Installing Python packages failed because some were in use.") if failed
                else _("Some Python packages were updated while Slicer had them loaded.")) + " " + _(
            "Restart Slicer to continue: when the Med3DFM module opens again it offers to install the rest:") + "\n\n" + _describeSteps(remaining)
    else:
        text = _("Some Python packages were updated while Slicer had them loaded. Med3DFM's jobs can run now "
                 "(they start their own Python), but restart Slicer before using these packages in Slicer itself.")
    if slicer.util.confirmYesNoDisplay(text + "\n\n" + _("Restart Slicer now?"), _("Med3DFM: restart Slicer"), detailedText=details):
        slicer.util.restart()


def installTorch(requirement: str = dependencies.TORCH_REQUIREMENT) -> None:
    """PyTorch through the PyTorch extension, in the range of `requirement` (consent was given in our
    own dialog already)."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(_("Med3DFM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer and try again."))
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=dependencies.requirement_specifier(requirement))
    if torch is None:
        raise RuntimeError(_("PyTorch was not installed."))


def _slicerPackaging():
    """slicer.packaging where it has pip_ensure (Slicer >= 5.12), else None."""
    try:
        module = importlib.import_module("slicer.packaging")
    except ImportError:
        return None
    return module if hasattr(module, "pip_ensure") else None


def pipInstall(requirements: List[str], force: bool) -> None:
    """Install requirement strings with Slicer's own helpers, Slicer's packages pinned by a constraints
    file. A forced reinstall replaces only the listed packages (--force-reinstall --no-deps), then a
    plain install adds any of their dependencies that are missing."""
    with tempfile.NamedTemporaryFile("w", suffix="-med3dfm-constraints.txt", delete=False, encoding="utf-8") as file:
        file.write(dependencies.constraints_text(dependencies.installed_versions(dependencies.SLICER_OWNED)))
        constraints = file.name
    try:
        packaging = _slicerPackaging()
        calls = ([["--force-reinstall", "--no-deps", *requirements]] if force else []) + [list(requirements)]
        for arguments in calls:
            if packaging is None:
                slicer.util.pip_install(arguments + ["-c", constraints])  # a list: paths and specifiers stay intact
            elif arguments is calls[-1] and not force:
                # checks, installs what is missing; the restart question is ours (the marker must be written first)
                packaging.pip_ensure(arguments, constraints=constraints, prompt_install=False, prompt_restart=False, requester="Med3DFM")
            else:
                packaging.pip_install(arguments, constraints=constraints, requester="Med3DFM")
    finally:
        try:
            os.remove(constraints)
        except OSError:
            pass
