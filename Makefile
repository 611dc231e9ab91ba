# Two promises (README.md): `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := data/demo
MODEL  := itp-response
# Every install takes its versions from here; `make constraints` regenerates it.
CONSTRAINTS := constraints.txt
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: run train serve test lint bench clean constraints

# Training and serving: the base set (what the service and the Docker image need) + [train].
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[train]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

## constraints: re-resolve constraints.txt for every extra after a change of pyproject.toml's
## dependencies; versions already pinned stay unless `make constraints UPGRADE=--upgrade`
constraints:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
		--custom-compile-command 'make constraints' --quiet $(UPGRADE) -o $(CONSTRAINTS)

$(DEMO)/metadata.tsv: | $(VENV)/.installed
	$(BIN)/itp-train simulate --n-patients 400 --seed 7 --out $(DEMO)

## run: install, simulate the demo cohort, train + register the champion, serve on :8000
run: train serve

train: $(VENV)/.installed $(DEMO)/metadata.tsv
	$(BIN)/itp-train train --data $(DEMO) --experiment $(MODEL) --register $(MODEL) \
		--alias champion --preset fast --jobs 2 --export models/$(MODEL)

serve: $(VENV)/.installed
	ITP_MODEL_URI=models:/$(MODEL)@champion $(BIN)/itp-serve

## test: install with dev extras, lint, run the whole test suite
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/bench_service.py

clean:
	rm -rf $(VENV) data mlflow.db mlruns models/$(MODEL)
