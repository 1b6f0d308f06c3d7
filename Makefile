# The two commands a newcomer needs: `make repro` (the pipeline on the embedded mini-GLDv2)
# and `make test`. Both set up `.venv` first; set-up is a no-op when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glr-installed

.PHONY: setup repro test test-bf16 lint clean-venv plots

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
	$(BIN)/ruff check src benchmarks tests
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# The suite again as a CPU with native bfloat16 (AMX / AVX-512 BF16) answers glr.runtime
# (docs/machines.md). bfloat16 is emulated on other CPUs: correct, slower; the slow
# end-to-end tests run in `make test` only.
test-bf16: setup
	GLR_MACHINE=bf16-cpu $(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check src benchmarks tests

clean-venv:
	rm -rf $(VENV)

# The plots page in dvc_plots/ (.dvc/config gives `dvc plots show` a page template with the Vega
# libraries inlined: it draws offline) and, when a Chromium is installed, a headless screenshot
# of it in dvc_plots/screenshot.png.
plots: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc plots show -o dvc_plots
	@page="$(CURDIR)/dvc_plots/index.html"; shot="$(CURDIR)/dvc_plots/screenshot.png"; \
	log="$(CURDIR)/dvc_plots/chromium.log"; rm -f "$$shot"; \
	browser=$$(command -v chromium || command -v chromium-browser || true); \
	limit=$$(command -v timeout >/dev/null && echo "timeout 120" || true); \
	if [ ! -f "$$page" ]; then \
		echo "make plots: dvc wrote no page (no plots?)" >&2; exit 1; \
	elif [ -z "$$browser" ]; then \
		echo "make plots: open file://$$page in a browser (a screenshot needs chromium: apt-get install chromium)"; \
	elif $$limit "$$browser" --headless --no-sandbox --disable-gpu --screenshot="$$shot" \
			--window-size=1400,3000 --virtual-time-budget=10000 "file://$$page" >"$$log" 2>&1 \
			&& [ -s "$$shot" ]; then \
		echo "make plots: screenshot in $$shot (page: file://$$page)"; \
	else \
		echo "make plots: $$browser took no screenshot, see $$log; open file://$$page in a browser" >&2; \
		exit 1; \
	fi
