# `make` creates .venv with everything; `make demo` runs the join story on the local sandbox;
# `make test` runs the suite (unit + sandbox end-to-end).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv demo test unit bench clean sandbox-up sandbox-down

all: venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m meshjoin_sandbox.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

sandbox-up: $(STAMP)
	$(BIN)/meshjoin sandbox up

sandbox-down: $(STAMP)
	$(BIN)/meshjoin sandbox down

clean:
	-$(BIN)/meshjoin sandbox down 2>/dev/null
	rm -rf $(VENV) .sandbox .pytest_cache
