# FindLady: `make demo` and `make test` work on a fresh machine (Python 3.11+).
# The virtual environment gets torch first (a CPU build; a bare `torch` requirement could pull
# a multi-GB CUDA build), then the project with its example-model and test extras.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <a CPU wheel index>"
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.findlady-installed

.PHONY: install demo test test-fast serve worker clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/pip install -e ".[models,test]"
	touch $(STAMP)

demo: install
	$(BIN)/findlady demo

test: install
	$(BIN)/pytest -q

# Everything but PostgreSQL/Redis/Celery
test-fast: install
	$(BIN)/pytest -q -m "not services"

serve: install
	$(BIN)/findlady serve

worker: install
	$(BIN)/findlady worker

clean:
	rm -rf $(VENV) .pytest_cache var
