# The README's commands. Each target sets up .venv from nothing when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_DATA := demo-out/corpus
DEMO_OUT  := demo-out/run

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/capfilt synth $(DEMO_DATA) --shards 3 --per-shard 40 --broken
	$(BIN)/capfilt run pipelines/demo/tiny.yaml --input '$(DEMO_DATA)/{00000..00002}.tar' --output $(DEMO_OUT) --fresh

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf demo-out .pytest_cache
