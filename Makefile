# Two commands do everything on a fresh machine:
#   make demo   set up .venv and segment the bundled example MR
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch, pinned: an open range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	mkdir -p build/demo
	$(VENV)/bin/med3dfm segment Testing/Data/hippocampus/images/hippocampus_014.nii.gz \
		-o build/demo/hippocampus_014.seg.nrrd --table build/demo/hippocampus_014.tsv \
		--labelmap build/demo/hippocampus_014_labels.nii.gz
	cat build/demo/hippocampus_014.tsv

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Not part of the tests: about 12 minutes on 2 cores; writes docs/benchmarks.md and docs/accuracy.md.
bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build
