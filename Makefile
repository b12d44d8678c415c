# Two commands do everything on a fresh machine:
#   make demo   set up .venv and segment the bundled example MR
#   make test   set up .venv and run the test suite: everything but the `shared` tests (Testing/Data
#               only), then the `shared` tests when ../shared/data is beside the checkout
#   make test-shared   only the `shared` tests (they sweep the whole of ../shared/data)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch, pinned: an open range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA := $(abspath $(CURDIR)/../shared/data)

.PHONY: demo test test-shared check-shared-data bench clean

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
	$(PY) -m pytest -q -m "not shared"
	@if [ -d "$(SHARED_DATA)" ]; then echo '$(PY) -m pytest -q -m shared'; $(PY) -m pytest -q -m shared; \
	else echo "shared-data checks not run: $(SHARED_DATA) is not beside the checkout (\`make test-shared\` runs them when ../shared is there)"; fi

test-shared: check-shared-data $(VENV)/.installed
	$(PY) -m pytest -q -m shared

check-shared-data:
	$(if $(wildcard $(SHARED_DATA)),,$(error make test-shared needs $(SHARED_DATA) (../shared/data beside the checkout); it is missing))

# Not part of the tests: about 12 minutes on 2 cores; writes docs/benchmarks.md and docs/accuracy.md.
bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build
