# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs the package and runs the main job on synthetic data
#   make test   installs the package with its test tools and runs every test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel on disk here; on a GPU server install your CUDA torch first and it is kept.
TORCH  ?= torch==2.13.0
DATA   ?= data/demo
SIZE   ?= demo

.PHONY: demo test install clean-demo readme

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/clinical-repro demo-data --out $(DATA) --size $(SIZE)
	$(BIN)/clinical-repro check-data --data-dir $(DATA)
	$(BIN)/clinical-repro subsets --data-dir $(DATA) --out reports/subsets

test: install
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/python -m pytest -n 2 tests

readme: install
	$(BIN)/jupyter nbconvert --to markdown --log-level WARN nbs/index.ipynb --output-dir . --output README
