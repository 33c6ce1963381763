# `make run` and `make test` set themselves up on a fresh machine: a .venv with what each needs,
# at the versions in requirements.lock. `make run` installs no test tool.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet -c requirements.lock
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-sqlite test-postgresql smoke bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run: requirements.txt requirements.lock | $(BIN)/python
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt requirements.lock | $(BIN)/python
	$(PIP) -r requirements-dev.txt
	touch $@ $(VENV)/.run

# The flags every documented command uses: see "Serving it on the open internet" in the README.
SERVE_FLAGS := --ws-max-size 65536 --ws-per-message-deflate false --http chat:BoundedHttpProtocol --ws chat:ChatWebSocketProtocol --limit-concurrency 16384

run: $(VENV)/.run
	$(BIN)/uvicorn chat:app --host $(HOST) --port $(PORT) $(SERVE_FLAGS)

# The whole suite, once on SQLite and once on PostgreSQL (127.0.0.1:5432, a database of its own).
test: test-sqlite test-postgresql

test-sqlite: $(VENV)/.dev
	CHAT_TEST_DATABASE=sqlite $(BIN)/pytest

test-postgresql: $(VENV)/.dev
	CHAT_TEST_DATABASE=postgresql $(BIN)/pytest

smoke: $(VENV)/.dev
	$(BIN)/python smoke.py

bench: $(VENV)/.dev
	$(BIN)/python bench.py

# Rewrite requirements.lock from a fresh install of requirements-dev.txt.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -r requirements-dev.txt
	{ head -3 requirements.lock; .lock-venv/bin/pip freeze; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache chat.db chat.db-wal chat.db-shm chat.db.key
