# The two commands of the README. Both create .venv (Python 3.11) and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Offline machines: no telemetry (Prefect's otherwise prints tracebacks and can lock its SQLite database).
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

## make demo: install, then run the nightly flow (train -> evaluate -> register -> promote -> score) on the
## built-in catalogue, with Prefect in ephemeral mode and MLflow on ./convmf-data/mlflow.db
demo: $(STAMP)
	$(BIN)/convmf demo

## make test: install, then run the whole test suite
test: $(STAMP)
	$(BIN)/pytest -q

clean:
	rm -rf convmf-data .pytest_cache
