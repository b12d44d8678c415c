"""Everything the Med3DFM Slicer module does that needs neither Slicer nor Qt, tested without Slicer
(Testing/Python/test_slicer_module.py). Import the modules:

- jobs: the `med3dfm` command line of each job, running it in a background process, its JSON progress
  lines, Cancel;
- results: a finished job's files understood (record, table, heatmap, classification), the painted
  segments as one .seg.nrrd, which segments a result replaces, the model lists;
- fit: which models fit the selected volume (the library's domain check);
- choices: the values behind the panel's fixed combo boxes;
- dependencies: what the jobs need installed in Slicer's Python, and what is; the install plan, the
  restart marker, Slicer's own packages pinned, the "Show package info" text;
- environment: where the library, resources and PythonSlicer are, CPU time estimates, diagnostics.

The Slicer side (Med3DFM.py and Med3DFMSlicer/) turns nodes into files, calls these, and turns
files back into nodes. The library (Med3DFMLib) is imported inside functions only: in a source
checkout it becomes importable when the module's Logic starts (environment.ensure_library_importable).

This is a sub-package, not top-level .py files, because Slicer loads every top-level .py file in
a scripted-module folder as a module of its own.
"""
