# Two commands do all the set-up:  make demo  (train + translate on the CPU)  and  make test.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup data demo test lint results bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

# fetch and hash-check the default data (zhlib's sentence pairs) into $$TUTORIALS_CACHE
data: setup
	$(PY) -m transformer_basics.dataset

# the project's main job end to end on the CPU: train, then translate the test split (greedy + beam, BLEU)
demo: data
	$(PY) -m transformer_basics.train_translate
	$(PY) -m transformer_basics.infer --attention-png runs/transformer_basics/translate/attention.png

test: data
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check .

# gather every run's results.json into doc/results.{json,md}
results: setup
	$(PY) -m common.results

bench: setup
	$(PY) -m transformer_basics.bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
