# Two commands on a fresh machine:  `make run` (the main job) and `make test` (the test suite).
# Both build .venv first. Override the torch spec on GPU machines, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint bench clean

# pip's own progress is shown (the first install downloads torch: a few minutes, silent with -q)
$(BIN)/.installed: pyproject.toml
	@echo "==> creating $(VENV) (first run only; later runs start at once)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "==> installing $(TORCH_SPEC) (a large download: a few minutes)"
	$(BIN)/pip install --progress-bar on $(TORCH_SPEC)
	@echo "==> installing kpflow and its test tools into $(VENV)"
	$(BIN)/pip install --progress-bar on -e ".[dev]"
	@touch $@
	@echo "==> $(VENV) ready"

run: $(BIN)/.installed
	$(BIN)/kpflow run $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/pytest -q -n 2 $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
