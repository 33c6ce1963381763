# `make run` and `make test` set themselves up on a fresh machine: a .venv from requirements.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-sqlite test-postgresql smoke bench clean

$(BIN)/uvicorn: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

run: $(BIN)/uvicorn
	$(BIN)/uvicorn chat:app --host $(HOST) --port $(PORT) --ws-max-size 65536

# The whole suite, once on SQLite and once on PostgreSQL (127.0.0.1:5432, a database of its own).
test: test-sqlite test-postgresql

test-sqlite: $(BIN)/uvicorn
	CHAT_TEST_DATABASE=sqlite $(BIN)/pytest

test-postgresql: $(BIN)/uvicorn
	CHAT_TEST_DATABASE=postgresql $(BIN)/pytest

smoke: $(BIN)/uvicorn
	$(BIN)/python smoke.py

bench: $(BIN)/uvicorn
	$(BIN)/python bench.py

clean:
	rm -rf $(VENV) .pytest_cache chat.db chat.db-wal chat.db-shm
