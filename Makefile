# Two entry points for a fresh machine: `make run` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test dashboard lint pretrain bench clean

# torch is installed pinned before anything that depends on it: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m search.run space.yaml

test: $(STAMP)
	$(BIN)/ruff check search space trials dashboard benchmarks tests
	$(BIN)/mypy search space trials dashboard benchmarks
	$(BIN)/python -m pytest

dashboard: $(STAMP)
	$(BIN)/streamlit run dashboard/app.py --server.headless true

lint: $(STAMP)
	$(BIN)/ruff check search space trials dashboard benchmarks tests
	$(BIN)/mypy search space trials dashboard benchmarks

pretrain: $(STAMP)
	$(BIN)/python -m trials.pretrain --out trials/assets/tiny-mamba

bench: $(STAMP)
	$(BIN)/python -m benchmarks.scan

clean:
	rm -rf $(VENV) runs outputs best.yaml
