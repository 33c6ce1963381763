"""Upgrades in place: a database made by the previous release (tests/fixtures/schema_v1.sql is
its schema.sql, as released) is brought up to the current schema at start-up, once, keeping every
user, message and refresh token; on the backend under test (SQLite or PostgreSQL)."""

import asyncio
import contextlib
import secrets
import sqlite3
import time

import asyncpg
import bcrypt
import httpx
import pytest

import chat
from conftest import (BACKEND, POSTGRES_ADMIN_URL, ROOT, TMP, make_postgres_database, postgres_admin,
                      running_server, server_log)

V1_SCHEMA = (ROOT / "tests" / "fixtures" / "schema_v1.sql").read_text()
PASSWORD = "an old password"


def statements(sql):
    sql = "\n".join(line.split("--")[0] for line in sql.splitlines())
    if BACKEND == "postgresql":
        sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    return [statement.strip() for statement in sql.split(";") if statement.strip()]


def run_sql(target, sql_statements, fetch=None):
    """Run statements on the test's own database; returns the rows of `fetch` if given."""
    if BACKEND == "sqlite":
        with contextlib.closing(sqlite3.connect(target)) as connection:
            for statement in sql_statements:
                connection.execute(statement)
            connection.commit()
            return [tuple(row) for row in connection.execute(fetch)] if fetch else None

    async def run():
        connection = await asyncpg.connect(target, timeout=5)
        try:
            for statement in sql_statements:
                await connection.execute(statement)
            return [tuple(row) for row in await connection.fetch(fetch)] if fetch else None
        finally:
            await connection.close()

    return asyncio.run(run())


@pytest.fixture
def old_database():
    """(url for chat, target for run_sql) of a fresh database with the previous release's schema and data."""
    if BACKEND == "sqlite":
        path = TMP / f"v1-{secrets.token_hex(4)}.db"
        url, target = f"sqlite+aiosqlite:///{path}", str(path)
    else:
        name = make_postgres_database()
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        url, target = f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}", f"{base}/{name}"
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    rows = [
        f"INSERT INTO users (username, password) VALUES ('Alice', '{password_hash}')",
        f"INSERT INTO users (username, password) VALUES ('bob', '{password_hash}')",
        *[f"INSERT INTO messages (username, text) VALUES ('{who}', 'old message {n}')"
          for n, who in enumerate(["Alice", "bob", "Alice"])],
        "DELETE FROM messages WHERE text = 'old message 1'",  # ids with a gap must stay as they are
        "INSERT INTO refresh_tokens (jti, username, expires_at, used) VALUES ('jti-1', 'Alice', 4102444800, 0)",
        "INSERT INTO refresh_tokens (jti, username, expires_at, used) VALUES ('jti-2', 'bob', 4102444800, 1)",
    ]
    run_sql(target, statements(V1_SCHEMA) + rows)
    yield url, target
    if BACKEND == "postgresql":
        with contextlib.suppress(Exception):
            postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def contents(target):
    return {
        "users": run_sql(target, [], "SELECT username, password FROM users ORDER BY username"),
        "messages": run_sql(target, [], "SELECT id, username, text FROM messages ORDER BY id"),
        "refresh_tokens": run_sql(target, [], "SELECT jti, username, expires_at, used FROM refresh_tokens ORDER BY jti"),
    }


def schema_version(target):
    return run_sql(target, [], "SELECT version FROM schema_version")


def test_an_old_database_is_upgraded_in_place_once_keeping_everything(old_database):
    url, target = old_database
    before = contents(target)
    with running_server(env={"DATABASE_URL": url}) as (base_url, process):
        with httpx.Client(base_url=base_url) as http:
            tokens = http.post("/auth/login", json={"username": "alice", "password": PASSWORD}).json()
            history = http.get("/auth/messages", headers={"Authorization": f"Bearer {tokens['access_token']}"}).json()
            assert http.post("/auth/register", json={"username": "AIice", "password": "x" * 10}).status_code == 400
        assert server_log(process).count("upgraded the database's schema from version 1 to 2") == 1
    after = contents(target)
    assert after["users"] == before["users"] and after["messages"] == before["messages"]
    assert set(before["refresh_tokens"]) < set(after["refresh_tokens"])  # the old ones, and the login's
    before = after
    assert schema_version(target) == [(2,)]
    assert [(m["id"], m["username"], m["text"], m["created_at"]) for m in history] == [
        (id, username, text, None) for id, username, text in before["messages"]
    ]
    with running_server(env={"DATABASE_URL": url}) as (base_url, process):  # a second start changes nothing
        with httpx.Client(base_url=base_url) as http:
            assert http.get("/health").status_code == 200
        assert "upgraded" not in server_log(process)
    assert contents(target) == before and schema_version(target) == [(2,)]


def test_four_workers_starting_on_an_old_database_upgrade_it_once(old_database):
    url, target = old_database
    before = contents(target)
    with running_server(env={"DATABASE_URL": url, "SECRET_KEY": "workers-" + "k" * 32}, args=["--workers", "4", "--log-level", "info"]) as (
        base_url, process
    ):
        deadline = time.monotonic() + 30
        while server_log(process).count("Application startup complete") < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        with httpx.Client(base_url=base_url) as http:
            for _ in range(8):
                assert http.get("/health").status_code == 200
        log = server_log(process)
        assert log.count("upgraded the database's schema") == 1, log
        assert log.count("Application startup complete") == 4, log
    assert contents(target) == before and schema_version(target) == [(2,)]


def test_a_failed_upgrade_leaves_the_database_as_it_was_and_stops_start_up_with_one_line(old_database):
    url, target = old_database
    run_sql(target, ["ALTER TABLE messages ADD COLUMN created_at TEXT"])  # the step will fail on this
    before = contents(target)
    with pytest.raises(RuntimeError) as failure:
        with running_server(env={"DATABASE_URL": url}):
            pass
    output = str(failure.value)
    assert "chat: cannot start: upgrading the database with 002_created_at.sql failed, so it is left as it was" in output
    assert "Traceback" not in output
    assert contents(target) == before
    tables = run_sql(target, [], "SELECT name FROM sqlite_master WHERE type = 'table'" if BACKEND == "sqlite"
                     else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    assert ("schema_version",) not in tables


def test_a_database_newer_than_this_release_is_refused(old_database):
    url, target = old_database
    run_sql(target, ["CREATE TABLE schema_version (version INTEGER NOT NULL)", "INSERT INTO schema_version VALUES (99)"])
    with pytest.raises(RuntimeError) as failure:
        with running_server(env={"DATABASE_URL": url}):
            pass
    assert f"newer than this chat.py's {chat.SCHEMA_VERSION}" in str(failure.value)
