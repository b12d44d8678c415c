"""Volumes, segmentations and tables in and out, with geometry kept exactly and atomic writes.

Import from the submodules (`io.volumes`, `io.segmentations`, `io.tables`, `io.atomic`): importing
the package itself loads nothing, so model code can use `io.atomic` without SimpleITK installed.
"""
