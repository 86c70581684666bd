# One-command set-up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
RUN_DIR ?= runs/demo

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build from local disk first, so the project's torch>=2.11 range installs nothing more.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pretrain.demo --run-dir $(RUN_DIR)

test: venv
	$(PY) -m pytest -n 2 --durations=15 tests

bench: venv
	$(PY) benchmarks/loader_throughput.py

clean:
	rm -rf $(VENV) runs data
