# The README's commands. Each target sets up .venv from nothing when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The exact tested versions: every install (here, docker/Dockerfile, CI through `make test`) uses them.
LOCK    := requirements.lock
LATEST  := .venv-latest
DEMO_DATA := demo-out/corpus
DEMO_OUT  := demo-out/run
DEMO_LOOP := demo-out/loop

.PHONY: install demo demo-quick demo-dense ablations lint test test-fast test-latest lock bench clean browser

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) pip
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The bootstrap loop on the synthetic world: pretrain on noisy web data, fine-tune captioner and
# filter, CapFilt, retrain, evaluate; prints the ground-truth table and writes an HTML report.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/capfilt loop pipelines/demo/loop.yaml --output $(DEMO_LOOP)
	$(BIN)/capfilt report $(DEMO_LOOP)

# One CapFilt run with the random-weight tiny presets over a corpus with broken samples (seconds).
demo-quick: $(STAMP)
	$(BIN)/capfilt synth $(DEMO_DATA) --shards 3 --per-shard 40 --broken
	$(BIN)/capfilt run pipelines/demo/tiny.yaml --input '$(DEMO_DATA)/{00000..00002}.tar' --output $(DEMO_OUT) --fresh

# Long captions: whole-caption scoring vs claim-level verification on dense captions with one wrong
# claim (capfilt/claims_demo.py): trains a tiny filter, scores, prints the table of docs/demo-results.md.
demo-dense: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m capfilt.claims_demo demo-out/dense

# BLIP's Table 1 on the synthetic world: no bootstrap / filter / captioner / captioner + filter.
ablations: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/capfilt loop pipelines/demo/loop.yaml --output $(DEMO_LOOP) --ablations

# Headless Chromium (Debian's package) for the report's real-browser test in tests/test_report.py.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: installed (/usr/bin/chromium)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "chromium is missing: install it as root with 'apt-get install chromium'" >&2; exit 1; fi

# As root with apt-get, `make test` installs Chromium first; elsewhere the browser test skips.
# ruff's linter and formatter check (configured in pyproject.toml); `ruff format .` fixes the layout.
lint: $(STAMP)
	$(BIN)/ruff check capfilt tests benchmarks tools setup.py
	$(BIN)/ruff format --check capfilt tests benchmarks tools setup.py

test: $(STAMP) lint $(if $(and $(shell command -v apt-get 2>/dev/null),$(filter 0,$(shell id -u))),browser)
	$(BIN)/python -m pytest -q

# The inner loop: every test but those marked slow (end-to-end runs in fresh processes or on a Ray
# cluster, the wheel build, the loop). `make test` runs them all, as CI does.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# What the next releases break, before users find out: the newest release of every dependency
# (no lock, no upper bound from pyproject.toml) in a separate venv, then the whole test suite.
# Not part of CI; run it before changing the lock, and read what fails. PIP_CONFIG_FILE=/dev/null:
# no pip configuration file applies either (a machine-wide constraint would hide a new release).
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/python tools/dependency_names.py > $(LATEST)/names.txt
	PIP_CONFIG_FILE=/dev/null $(LATEST)/bin/pip install --quiet --upgrade -r $(LATEST)/names.txt
	$(LATEST)/bin/pip install --quiet --no-deps -e .
	$(LATEST)/bin/python tools/dependency_names.py --versions
	$(LATEST)/bin/python -m pytest -q

# Rebuild the lock from the newest releases pyproject.toml allows (then: make test, make demo).
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet '.[test]'
	{ sed -n '/^# /p' $(LOCK); echo "pip==$$(.venv-lock/bin/pip --version | cut -d' ' -f2)"; \
	  .venv-lock/bin/pip freeze --exclude capfilt; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf demo-out .pytest_cache $(LATEST)
