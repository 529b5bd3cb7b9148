# The two commands of the README. Each creates (or reuses) .venv and installs the pinned CPU torch first,
# so a bare `pip install` never pulls a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test setup clean

$(BIN)/kava: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev,hub]"
	touch $(BIN)/kava

setup: $(BIN)/kava

demo: setup
	$(BIN)/kava demo

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
