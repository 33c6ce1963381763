"""Shared set-up: one throw-away database per test run (SQLite or PostgreSQL, chosen by
CHAT_TEST_DATABASE), the in-process app for HTTP tests, and real uvicorn servers on free
ports for anything about websocket frames."""

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKEND = os.environ.get("CHAT_TEST_DATABASE", "sqlite")
POSTGRES_ADMIN_URL = os.environ.get("CHAT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CHAT_TEST_REDIS", "redis://127.0.0.1:6379/0")
TMP = Path(tempfile.mkdtemp(prefix="chat-test-"))


def postgres_admin(sql):
    import asyncpg

    async def run():
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


def make_postgres_database():
    """A new database on the machine's PostgreSQL server, or None when none answers."""
    name = "chat_test_" + secrets.token_hex(6)
    try:
        postgres_admin(f"CREATE DATABASE {name}")
    except (OSError, asyncio.TimeoutError) as error:
        if IN_CI:
            raise SystemExit(f"PostgreSQL at {POSTGRES_ADMIN_URL} does not answer ({error}); CI needs it")
        return None
    return name


POSTGRES_DATABASE = make_postgres_database() if BACKEND == "postgresql" else None
if BACKEND == "postgresql":
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    DATABASE_URL = f"{base}/{POSTGRES_DATABASE}"
else:
    DATABASE_URL = f"sqlite+aiosqlite:///{TMP / 'chat.db'}"

# chat.py reads its configuration at import, so this must come before any test imports it.
os.environ.update(
    DATABASE_URL=DATABASE_URL,
    SECRET_KEY="test-" + secrets.token_urlsafe(32),
    BCRYPT_ROUNDS="4",
    # Limits against abuse are on by default; tests that are not about them turn them off here.
    # Tests of the limits pass their own values to running_server(env=...).
    LOGIN_LIMIT="off",
    REGISTER_LIMIT="off",
    MESSAGE_LIMIT="off",
    MAX_SOCKETS_PER_USER="0",
)
os.environ.pop("BROADCAST_URL", None)


def pytest_collection_modifyitems(config, items):
    if BACKEND == "postgresql" and POSTGRES_DATABASE is None:
        skip = pytest.mark.skip(reason="no PostgreSQL server at 127.0.0.1:5432 (CI=true makes this a failure)")
        for item in items:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if POSTGRES_DATABASE:
        with contextlib.suppress(Exception):
            postgres_admin(f"DROP DATABASE IF EXISTS {POSTGRES_DATABASE} WITH (FORCE)")


def pytest_report_header(config):
    return f"chat database: {BACKEND} ({DATABASE_URL})"


# ---------------------------------------------------------------- in-process app


@pytest.fixture
def client():
    from starlette.testclient import TestClient

    import chat

    with TestClient(chat.app, raise_server_exceptions=False) as test_client:
        yield test_client


def unique_name(prefix="u"):
    return f"{prefix}{secrets.token_hex(4)}"


PASSWORD = "correct-horse-1"


def register_and_login(http, username=None, password=PASSWORD):
    """Register a fresh user through `http` (a TestClient or httpx.Client); returns (name, tokens)."""
    username = username or unique_name()
    response = http.post("/auth/register", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    response = http.post("/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return username, response.json()


@pytest.fixture
def user(client):
    return register_and_login(client)


# ---------------------------------------------------------------- real servers


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def same_window(seconds, needed=5.0):
    """Return when at least `needed` seconds are left in the current in-memory window of `seconds`.
    Limits counted in memory use windows aligned to the epoch, and attempts that straddle a
    boundary can let one more through (the sliding-window counter rounds the previous window's
    weighted count down)."""
    left = seconds - time.time() % seconds
    if left < needed:
        time.sleep(left + 0.05)


def wait_until_healthy(health_url, process, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {server_log(process)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(health_url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{health_url} did not answer 200")


def stop_process(process, seconds=15):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_log(process):
    """Everything a server started by running_server has printed so far."""
    return Path(process.log_path).read_text(errors="replace")


def server_env(changes=None):
    """The tests' environment with `changes` applied; a value of None removes that variable."""
    env = {**os.environ, **(changes or {})}
    return {name: value for name, value in env.items() if value is not None}


@contextlib.contextmanager
def running_server(env=None, args=(), port=None, app="chat:app", health_path="/health"):
    """A real uvicorn serving `app` (chat:app unless told) on a free port; yields (base_url, process).
    `env` changes the environment (None removes a variable). Its output goes to a file under TMP:
    read it with server_log(process)."""
    port = port or free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
               "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--http", "chat:BoundedHttpProtocol",
               "--ws", "chat:ChatWebSocketProtocol", "--limit-concurrency", "16384",
               "--log-level", "warning", *args]
    log_path = TMP / f"server-{port}-{secrets.token_hex(3)}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=server_env(env),
                                   stdout=log_file, stderr=subprocess.STDOUT)
    process.log_path = log_path
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url + health_path, process)
        yield base_url, process
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def server():
    """Base URL of a real server shared by one test module."""
    with running_server() as (base_url, _process):
        yield base_url


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=10) as http_client:
        yield http_client


def ws_url(base_url, token, **query):
    query_string = "&".join(f"{key}={value}" for key, value in {"token": token, **query}.items())
    return base_url.replace("http://", "ws://") + "/ws?" + query_string


def unavailable(reason):
    """Skip a test that needs something this machine lacks; under CI=true, fail it."""
    if IN_CI:
        pytest.fail(f"{reason}; CI needs it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def shared_redis():
    """The machine's Redis (REDIS_URL), checked to answer."""
    import redis

    connection = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        connection.ping()
    except redis.RedisError as error:
        unavailable(f"Redis at {REDIS_URL} does not answer ({error})")
    finally:
        connection.close()
    return REDIS_URL


async def closed_with(ws, seconds=10):
    """Read until the server closes; returns (code, reason)."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            await asyncio.wait_for(ws.recv(), seconds)
    except ConnectionClosed:
        return ws.close_code, ws.close_reason


REDIS_SERVER = "/usr/bin/redis-server"


class OwnRedis:
    """A redis-server of this test's own on a free port, without persistence, that the test may
    stop and start again on the same port."""

    def __init__(self):
        if not os.access(REDIS_SERVER, os.X_OK):
            unavailable(f"{REDIS_SERVER} is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def answers(self):
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return client.ping()
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self):
        log = open(TMP / f"redis-{self.port}-{secrets.token_hex(3)}.log", "w")
        with log:  # the child has its own copy
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while not self.answers():
            assert self.process.poll() is None, f"redis-server exited with {self.process.returncode}"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 seconds"
            time.sleep(0.05)

    def stop(self):
        if self.process:
            stop_process(self.process, 10)


@contextlib.contextmanager
def own_redis():
    server = OwnRedis()
    try:
        server.start()
        yield server
    finally:
        server.stop()
