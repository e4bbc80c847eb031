# The two commands of the README's Quickstart:
#   make demo   set everything up, then train the tiny toy-world Ferret on CPU and evaluate it (~12 min of one core;
#               `make demo DEMO_ARGS=--quick` in ~2 min; outputs and figures under runs/demo/, resumable)
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU build of torch; a machine with an NVIDIA driver gets the default (CUDA) build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser java test test-fast demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train,serve,test]"
	touch $@

# The Gradio UI is tested in Debian's headless chromium (driven by playwright, which never downloads a browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: chromium is not installed (needs root: apt-get install chromium); the browser test will skip"; fi; }

# Captioning's METEOR (and the COCO PTB tokenizer) run on Java: Debian's default-jre-headless.
java:
	@command -v java >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless; \
	  else echo "note: java is not installed (needs root: apt-get install default-jre-headless); METEOR is skipped"; fi; }

test: setup browser java
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

DEMO_ARGS ?=

demo: setup
	$(BIN)/ferret demo $(DEMO_ARGS)

bench: setup
	for b in scripts/bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
