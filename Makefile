# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# torch==2.13.0 resolves to the local CPU build (pip's find-links); it is only the test reference.
$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m experiments.demo --output_dir outputs/demo --dataset squares,shapes,objects

# Two workers, a test file each at a time (its module fixtures built once): compiling, most of the
# suite's time, is single-threaded.
test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) outputs
