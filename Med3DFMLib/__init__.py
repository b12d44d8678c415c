"""Med3DFM library: 3D medical foundation encoder, task adapters, inference and I/O.

Importable without 3D Slicer or Qt; the Slicer module and the `med3dfm` command both sit on top of it.
"""

__version__ = "0.1.0"
