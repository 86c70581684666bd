# One-command set-up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
RUN_DIR ?= runs/demo

.PHONY: venv demo test bench clean

# Set-up takes a minute or two the first time; each step says what it does (pip itself is quiet).
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { echo "==> creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> upgrading pip in $(VENV)"
	@$(PY) -m pip install -q --upgrade pip
	@# CPU build from local disk first, so the project's torch>=2.11 range installs nothing more.
	@$(PY) -c "import torch" 2>/dev/null || { echo "==> installing $(TORCH) (CPU build, about a minute)"; \
		$(PY) -m pip install -q $(TORCH); }
	@echo "==> installing the project and its dev extra (pytest, transformers, megatron-core, triton) into $(VENV)"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $@
	@echo "==> environment ready: source $(VENV)/bin/activate to use it in your shell"

venv: $(VENV)/.installed

demo: venv
	@echo "==> make demo: build the demo corpus, train and evaluate a tiny hybrid_moe on CPU (a few minutes)"
	$(PY) -m pretrain.demo --run-dir $(RUN_DIR)

test: venv
	@echo "==> make test: the whole suite on 2 workers (CPU; GPU tests are skipped without CUDA)"
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

bench: venv
	$(PY) benchmarks/loader_throughput.py

clean:
	rm -rf $(VENV) runs data
