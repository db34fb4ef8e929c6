# Cohort: every target creates and uses its own virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: install proto proto-check lint test test-fast test-sim demo compose-demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

proto: install
	$(PY) tools/protogen.py

proto-check: install
	$(PY) tools/protogen.py --check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

# The unit lane for daily work: everything not marked slow (no federations, subprocesses, crash or fuzz runs).
test-fast: install
	$(BIN)/pytest -m "not slow" -q

# The simulation lane: installs the `sim` extra (Ray, ~80 MB, ~20 s) into .venv and runs the simulator's tests (a few
# minutes: Ray start-up, a real federation to compare with, a two-node Ray cluster). `make test` skips them, with the
# reason, unless Ray is installed.
test-sim: install
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,sim]'
	$(BIN)/pytest tests/test_simulation.py tests/test_simulation_data.py -q

demo: install
	$(BIN)/cohort demo --run-dir $(RUN_DIR)

# The same federation as containers (deploy/docker-compose.yml): builds the image, runs the job, prints the summary
# and `cohort status`, then `down -v`. Uses the Docker engine that answers, or starts a private dockerd (root).
compose-demo: install
	$(PY) tools/compose_demo.py

bench: install
	$(PY) bench/aggregation.py
	$(PY) bench/round.py
	$(PY) bench/secagg.py
	$(PY) bench/privacy_utility.py
	$(PY) bench/strategies.py
	$(PY) bench/soak.py
	$(PY) bench/handshake_log.py
	$(PY) bench/fraud.py --seeds 0 1 2 3 4 5 6 7 8 9
	$(PY) bench/fraud.py --dp
	$(PY) bench/standardization.py
	$(PY) bench/upload_path.py
	$(PY) bench/federation.py

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find deploy/local -type f ! -name README.md ! -name .gitignore -delete
