"""Where the project's data files (model list, bundled weights, schemas) live."""

from __future__ import annotations

import os
from pathlib import Path


def resources_dir() -> Path:
    """The `Resources/` folder: `MED3DFM_RESOURCES` if set, else the one beside the library.

    In a source checkout and in the Slicer extension, Resources/ sits next to Med3DFMLib/.
    """
    override = os.environ.get("MED3DFM_RESOURCES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "Resources"
