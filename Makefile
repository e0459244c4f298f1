# The two set-up commands: `make run` and `make test`. Both create .venv and
# install everything the project needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[export,test]'
	touch $(STAMP)

run: install
	$(BIN)/streamgen generate "$(PROMPT)"

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/streamgen bench engine

clean:
	rm -rf $(VENV)
