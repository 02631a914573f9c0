# vdit: the two commands.
#   make quickstart   install into .venv, build the sample dataset, train the tiny DiT on CPU, sample, score
#   make test         install the test dependencies into .venv and run the test suite
# Both work on a fresh machine with Python >= 3.10 and no GPU, without root or a system ffmpeg.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU test/CI path: this torch pin is a CPU build (GPU users install their own CUDA torch first;
# pyproject.toml itself only states a range).
TORCH_PIN ?= torch==2.13.0
PIP_FLAGS ?= --disable-pip-version-check --no-input -q
PYTEST_ARGS ?=

.PHONY: quickstart test install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_PIN)"
	$(PY) -m pip install $(PIP_FLAGS) -e ".[test]" "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.installed

install-test: install

quickstart: install
	$(PY) -m vdit.launch.quickstart

test: install-test
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

clean:
	rm -rf runs outputs .pytest_cache
