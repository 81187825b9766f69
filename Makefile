# The README's commands. Each target sets up .venv from nothing when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_DATA := demo-out/corpus
DEMO_OUT  := demo-out/run
DEMO_LOOP := demo-out/loop

.PHONY: install demo demo-quick ablations test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
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

# BLIP's Table 1 on the synthetic world: no bootstrap / filter / captioner / captioner + filter.
ablations: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/capfilt loop pipelines/demo/loop.yaml --output $(DEMO_LOOP) --ablations

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf demo-out .pytest_cache
