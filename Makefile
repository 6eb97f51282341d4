# The two commands of the README. Both work on a fresh clone: they make the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PostgreSQL runs on this machine kind at 127.0.0.1:5432 with trust auth; the tests create and
# drop their own databases on it. Set it empty to skip those tests on a machine without one.
NKTRIAL_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres
export NKTRIAL_TEST_POSTGRES_URL

.PHONY: up up-ha demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

## make up: set up, then run the main job: local Prefect server (SQLite), deployments, worker. Ctrl-C stops.
up: $(BIN)/.installed
	$(BIN)/nktrial up

## make up-ha: the same, scaled out: PostgreSQL and Redis of this machine (or the site's, by URL: README, Scaled out),
## two API replicas behind HAProxy, Prefect's services, two workers. Installs the ha extra, and haproxy when run as root.
$(BIN)/.installed-ha: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[ha]'
	touch $@

up-ha: $(BIN)/.installed-ha
	@command -v haproxy >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null 2>&1 \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
	$(BIN)/nktrial up --ha

## make demo: the pure parts on the command line, no server needed
demo: $(BIN)/.installed
	$(BIN)/nktrial protocol show
	$(BIN)/nktrial screen examples/screening-S-001.json --day0 2027-01-31
	$(BIN)/nktrial calendar --dose-level 1 --day0 2027-01-31T09:00
	$(BIN)/nktrial escalation next ""

## make test: set up and run every test (protocol, both databases, CLI, flows, browser, scaled out), in TEST_WORKERS
## processes, each with its own Prefect test server (pytest-xdist). A test file runs whole in one process (--dist
## loadfile), so each scenario, rehearsed by its own file, is rehearsed once; the longest files are handed out first
## (--no-loadscope-reorder keeps the order tests/conftest.py gives). TEST_WORKERS=0 runs them all in this one process.
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
