"""The JSON record written beside every job's outputs: what made this result, and how.

None of the Slicer AI extensions keep this; a radiologist or a reviewer can tell months later
which model version, which settings and which machine produced a segmentation.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from pathlib import Path
from typing import Any, Dict

from Med3DFMLib import __version__


def library_versions() -> Dict[str, str]:
    import numpy
    import SimpleITK
    import torch

    versions = {
        "med3dfm": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
    }
    # From the package metadata: importing monai only to read its version cost ~6 s of every job
    # that does not otherwise need it (a first this-scan round among them).
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions["monai"] = version("monai")
    except PackageNotFoundError:  # monai is only needed for sliding-window inference
        pass
    return versions


def new_record(command: str) -> Dict[str, Any]:
    return {
        "command": command,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "versions": library_versions(),
        "timings_s": {},
    }


def record_path_for(output: Path) -> Path:
    """`scan.seg.nrrd` → `scan.json`: the output's name without its (double) extension."""
    name = output.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".tsv", ".safetensors"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + ".json")
