# Two commands do all set-up: `make demo` and `make test` each create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wsss-tune demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/threshold_surface.py
	$(BIN)/python benchmarks/random_walk.py
	$(BIN)/python benchmarks/trial.py
	$(BIN)/python benchmarks/trial_scale.py
	$(BIN)/python benchmarks/tune_overhead.py
	$(BIN)/python benchmarks/search_efficiency.py
	$(BIN)/python benchmarks/correlate.py
	$(BIN)/python benchmarks/load.py

clean:
	rm -rf $(VENV) runs data .pytest_cache .hypothesis
