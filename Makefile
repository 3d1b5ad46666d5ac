# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv demo test test-slow test-all bench browser server clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# a Prefect server in the background, so flow runs start in about a second and show in the UI
server: venv
	$(BIN)/python -m neurocat.server ensure

demo: venv server
	$(BIN)/neurocat demo

# headless Chromium for the report's browser tests (Debian packages)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium chromium-driver" >&2; fi; }

test: venv browser
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv browser
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

test-all: venv browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache test-artifacts
