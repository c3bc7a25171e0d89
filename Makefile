# Two entry points for a fresh machine: `make quickstart` runs the main job (the whole method
# at toy scale), `make test` runs the tests (`make test-fast`: all but the slow ones).
# Each creates the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: quickstart demo test test-fast format bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/must run quickstart --out runs/quickstart

demo: $(STAMP)
	$(BIN)/must data render --style mixed --tasks all --num 64 --size 96 --out runs/demo
	$(BIN)/must data show runs/demo --out runs/demo/preview.png

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The same checks without the long end-to-end and multi-process tests (marked slow).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -m "not slow"

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/data_throughput.py --out benchmarks/results
	$(BIN)/python benchmarks/teachers.py --out benchmarks/results
	$(BIN)/python benchmarks/labeling.py --out benchmarks/results
	$(BIN)/python benchmarks/overhead.py --out benchmarks/results --worker-pairs 1
	$(BIN)/python benchmarks/precision.py --out benchmarks/results
	$(BIN)/python benchmarks/scaling.py --out benchmarks/results

clean-venv:
	rm -rf $(VENV)
