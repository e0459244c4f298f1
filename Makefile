# The two set-up commands: `make run` and `make test`. Both create .venv and
# install everything the project needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install chromium run generate test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[export,test,bench]'
	touch $(STAMP)

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

# Pulls the default model on first use, then serves the browser client and the WebSocket.
run: install
	$(BIN)/streamgen serve

test: install chromium
	$(BIN)/python -m pytest

bench: install
	$(BIN)/streamgen bench engine

clean:
	rm -rf $(VENV)
