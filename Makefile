# The two commands a newcomer needs: `make repro` (the pipeline on the embedded mini-GLDv2)
# and `make test`. Both set up `.venv` first; set-up is a no-op when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glr-installed

.PHONY: setup repro test lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# dvc runs each stage's `glr ...` command in a shell: put the venv first on PATH.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/glr report

# pytest exits 5 when it collected no test: that is a failure too, said plainly.
test: setup
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

lint: setup
	$(BIN)/ruff check src tests

clean-venv:
	rm -rf $(VENV)
