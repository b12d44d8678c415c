"""Med3DFM library: 3D medical foundation encoder, task adapters, inference and I/O.

Importable without 3D Slicer or Qt; the Slicer module and the `med3dfm` command both sit on top of it.
"""

import os

__version__ = "0.1.0"

# Apple MPS lacks some operations; with this set before torch is imported they run on the CPU
# instead of failing (Med3DFMLib/devices.py). A user's own setting is kept.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
