"""The outside security review's holes, each with a test that fails without its fix (eaa3fe9):
logout and reuse detection, after= replay as an amplifier, NUL in passwords, look-alike names,
the signed Redis channel, log noise from clients that leave mid-body, slow bodies, and the
OpenAPI document under a mount. Where the hole is in the server, the test uses a real uvicorn."""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import sqlite3
import threading
import time

import bcrypt
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import chat
from conftest import (
    BACKEND, DATABASE_URL, IN_CI, PASSWORD, REDIS_URL, TMP, postgres_admin, register_and_login, running_server,
    server_log, unique_name, ws_url,
)

UVICORN_CLOSE_TIMEOUT = 10  # uvicorn's websocket close timeout (fixed in its sans-I/O implementation)
# Letters only, and none of i, l, o: a random suffix that is no look-alike of anything itself.
PLAIN_LETTERS = "abcdefghjkmnpqrstuvwxyz"


def run(coroutine, seconds=60):
    return asyncio.run(asyncio.wait_for(coroutine, seconds))


def letters(count=8):
    return "".join(secrets.choice(PLAIN_LETTERS) for _ in range(count))


def address(base_url):
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def register(http, username, password=PASSWORD):
    return http.post("/auth/register", json={"username": username, "password": password})


def login(http, username, password=PASSWORD):
    return http.post("/auth/login", json={"username": username, "password": password})


def refresh(http, token):
    return http.post("/auth/refresh", json={"refresh_token": token})


def logout(http, token):
    return http.post("/auth/logout", json={"refresh_token": token})


def assert_detail(response, status, *words):
    """A JSON {"detail": sentence} answer with this status whose sentence names each word."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str) and body["detail"], body
    for word in words:
        assert word.lower() in body["detail"].lower(), (word, body)


def db_value(client, query, **values):
    """One value from the test database, read on the TestClient's event loop."""
    return client.portal.call(chat.database.fetch_val, query, values)


def count_users_named(client, username):
    return db_value(client, "SELECT count(*) FROM users WHERE username = :username", username=username)


def unavailable(reason):
    if IN_CI:
        pytest.fail(f"{reason}; CI needs it", pytrace=False)
    pytest.skip(reason)


class OwnDatabase:
    """A database of one test's own on the run's backend; `sql` runs one literal statement."""

    def __init__(self, url):
        self.url = url

    def sql(self, statement):
        if self.url.startswith("sqlite"):
            connection = sqlite3.connect(self.url.partition(":///")[2], timeout=10)
            try:
                rows = connection.execute(statement).fetchall()
                connection.commit()
                return rows
            finally:
                connection.close()
        import asyncpg

        async def query():
            connection = await asyncpg.connect(self.url.replace("+asyncpg", ""), timeout=5)
            try:
                return [tuple(row) for row in await connection.fetch(statement)]
            finally:
                await connection.close()

        return asyncio.run(query())


@contextlib.contextmanager
def own_database():
    if BACKEND != "postgresql":
        yield OwnDatabase(f"sqlite+aiosqlite:///{TMP / ('review-' + secrets.token_hex(4) + '.db')}")
        return
    name = "chat_review_" + secrets.token_hex(5)
    postgres_admin(f"CREATE DATABASE {name}")
    try:
        yield OwnDatabase(f"{DATABASE_URL.rsplit('/', 1)[0]}/{name}")
    finally:
        with contextlib.suppress(Exception):
            postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def real_server():
    """A real uvicorn on the run's database, shared by this module: (base_url, process)."""
    with running_server() as (base_url, process):
        yield base_url, process


@pytest.fixture
def real_http(real_server):
    with httpx.Client(base_url=real_server[0], timeout=10) as http:
        yield http


# ---------------------------------------------------------------- 1. logout keeps reuse detection
# (test_security.py covers refresh/logout/refresh in process; this adds a real server, the user's
# other sessions, and that a new login afterwards is not harmed by the dead tokens shown again.)


def test_logout_with_an_exchanged_token_ends_every_session_and_a_new_login_is_unharmed(real_http):
    username, first = register_and_login(real_http)
    sibling = login(real_http, username).json()  # another device
    rotated = refresh(real_http, first["refresh_token"])
    assert rotated.status_code == 200
    assert logout(real_http, first["refresh_token"]).status_code == 200
    for token in (rotated.json()["refresh_token"], first["refresh_token"], sibling["refresh_token"]):
        assert_detail(refresh(real_http, token), 401, "Invalid refresh token")
    fresh = login(real_http, username).json()
    for token in (first["refresh_token"], rotated.json()["refresh_token"], sibling["refresh_token"]):
        assert refresh(real_http, token).status_code == 401  # dead tokens shown again revoke nothing new
    assert refresh(real_http, fresh["refresh_token"]).status_code == 200


# ---------------------------------------------------------------- 2. after= replay as an amplifier

REPLAY_EXTRA = 250  # stored beyond REPLAY_LIMIT
FILLER = "x" * 900  # big frames: no kernel or transport buffer holds the whole replay


@pytest.fixture(scope="module")
def replay_data():
    """A database of its own with REPLAY_LIMIT + REPLAY_EXTRA big messages after id `before`,
    and a server on it."""
    with own_database() as database, running_server(env={"DATABASE_URL": database.url}) as (base_url, process):
        with httpx.Client(base_url=base_url, timeout=10) as http:
            username, tokens = register_and_login(http, unique_name("replay"))
        before = database.sql("SELECT coalesce(max(id), 0) FROM messages")[0][0]
        total = chat.REPLAY_LIMIT + REPLAY_EXTRA
        database.sql(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {total}) "
            f"INSERT INTO messages (username, text) SELECT '{username}', 'replay ' || i || ' {FILLER}' FROM n"
        )
        yield dict(database=database, base_url=base_url, process=process, username=username,
                   token=tokens["access_token"], before=before)


def test_an_after_replay_stops_at_replay_limit_with_1013_and_a_reconnect_gets_the_rest(replay_data):
    data = replay_data
    token = data["token"]
    live_text = "live after the replay " + secrets.token_hex(4)
    rows = data["database"].sql(f"SELECT id, text FROM messages WHERE id > {data['before']} ORDER BY id")

    async def scenario():
        replayed = []
        async with connect(ws_url(data["base_url"], token, format="json", after=data["before"])) as ws:
            with pytest.raises(ConnectionClosed):
                while True:
                    replayed.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            closed = ws.close_code, ws.close_reason
        async with connect(ws_url(data["base_url"], token, format="json", after=replayed[-1]["id"])) as ws:
            rest = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(len(rows) - len(replayed))]
            await ws.send(live_text)
            live = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return replayed, closed, rest, live

    replayed, (code, reason), rest, live = run(scenario())
    assert len(rows) > chat.REPLAY_LIMIT
    assert len(replayed) == chat.REPLAY_LIMIT
    assert [(frame["id"], frame["text"]) for frame in replayed] == rows[:chat.REPLAY_LIMIT]  # in id order
    assert code == chat.CLOSE_TOO_SLOW == 1013 and "after=" in reason
    assert [(frame["id"], frame["text"]) for frame in rest] == rows[chat.REPLAY_LIMIT:]
    assert live["text"] == live_text and live["id"] > rows[-1][0]


class RawSocketReader:
    """Reads an HTTP head and websocket frames (server frames are unmasked) from a plain socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.position = 0

    def fill(self, size, deadline):
        """At least `size` unread bytes; False at EOF. TimeoutError past the deadline."""
        while len(self.buffer) - self.position < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            if self.position > 1 << 20:
                del self.buffer[:self.position]
                self.position = 0
            self.buffer += chunk
        return True

    def take(self, size):
        data = bytes(self.buffer[self.position:self.position + size])
        self.position += size
        return data

    def http_head(self, deadline):
        while b"\r\n\r\n" not in self.buffer[self.position:]:
            if not self.fill(len(self.buffer) - self.position + 1, deadline):
                raise EOFError("connection closed before the HTTP head ended")
        end = self.buffer.index(b"\r\n\r\n", self.position) + 4
        return self.take(end - self.position).decode("latin-1")

    def frame(self, deadline):
        """(opcode, payload), or None at EOF."""
        if not self.fill(2, deadline):
            return None
        first, second = self.take(2)
        size = second & 0x7F
        if size in (126, 127):
            extra = 2 if size == 126 else 8
            if not self.fill(extra, deadline):
                return None
            size = int.from_bytes(self.take(extra), "big")
        if not self.fill(size, deadline):
            return None
        return first & 0x0F, self.take(size)


def raw_websocket(base_url, path, receive_buffer=4096):
    """A plain socket with a small receive buffer that has sent a websocket upgrade for `path`."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(address(base_url))
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    host, port = address(base_url)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


async def round_trip(base_url, token, username):
    """Send a message and receive its echo on the same socket; returns True when it came."""
    text = "round trip " + secrets.token_hex(4)
    async with connect(ws_url(base_url, token)) as ws:
        await ws.send(text)
        while (line := await asyncio.wait_for(ws.recv(), 10)) != f"{username}: {text}":
            pass
    return True


async def socket_slot_free(base_url, token, username):
    """With MAX_SOCKETS_PER_USER=1: True if this user's one socket is free (a new one chats),
    False if the server still holds it (the new one is closed with 4429)."""
    try:
        return await asyncio.wait_for(round_trip(base_url, token, username), 5)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code == chat.CLOSE_TOO_MANY, closed
        return False


def test_a_replaying_client_that_never_reads_is_let_go_while_others_chat(replay_data):
    """The client never reads: the replay stalls on a full socket. The server must give up on it
    within about REPLAY_SEND_SECONDS plus a close timeout (its one socket slot is free again), and
    must have stopped replaying to it (it gets only part of the replay), while others chat on."""
    env = {"DATABASE_URL": replay_data["database"].url, "MAX_SOCKETS_PER_USER": "1"}
    with running_server(env=env) as (base_url, process):
        with httpx.Client(base_url=base_url, timeout=10) as http:
            stalled_name, stalled = register_and_login(http, unique_name("stall"))
            other_name, other = register_and_login(http, unique_name("other"))
        stalled_token = stalled["access_token"]
        path = f"/ws?token={stalled_token}&format=json&after={replay_data['before']}"
        sock = raw_websocket(base_url, path)
        try:
            started = time.monotonic()
            reader = RawSocketReader(sock)
            assert " 101 " in reader.http_head(started + 10).split("\r\n")[0]
            time.sleep(1)  # the replay has filled every buffer by now
            assert not run(socket_slot_free(base_url, stalled_token, stalled_name))  # held while replaying
            assert run(round_trip(base_url, other["access_token"], other_name))  # someone else chats meanwhile

            deadline = started + chat.REPLAY_SEND_SECONDS + UVICORN_CLOSE_TIMEOUT + 8
            released = False
            while not released and time.monotonic() < deadline:
                time.sleep(1)
                released = run(socket_slot_free(base_url, stalled_token, stalled_name))
            assert run(round_trip(base_url, other["access_token"], other_name))
            assert released, (
                f"the server still holds the socket of a client that stopped reading "
                f"{time.monotonic() - started:.0f} s after it connected"
            )

            texts = 0
            with contextlib.suppress(TimeoutError):
                read_deadline = time.monotonic() + 15
                while (frame := reader.frame(read_deadline)) is not None and frame[0] != 0x8:
                    texts += frame[0] == 0x1
            assert texts < chat.REPLAY_LIMIT  # the replay stopped when the client stalled
        finally:
            sock.close()
        assert "Traceback" not in server_log(process), server_log(process)


# ---------------------------------------------------------------- 3. NUL in passwords


@pytest.mark.parametrize("password", ["\x00" * 8, "abcdefgh\x00abcdefgh", "\x00abcdefgh"])
def test_a_password_with_a_nul_is_refused_and_no_user_is_created(client, password):
    username = unique_name("nul")
    assert_detail(register(client, username, password), 400, "NUL")
    assert count_users_named(client, username) == 0
    assert_detail(login(client, username, password), 401, "Invalid username or password")


def test_a_password_with_a_nul_never_matches_an_account(client):
    # bcrypt stops at a NUL: "abcdefgh\0anything" would check as "abcdefgh".
    username = unique_name("nul")
    assert register(client, username, "abcdefgh").status_code == 200
    for password in ("abcdefgh\x00abcdefgh", "abcdefgh\x00", "abcdefgh\x00\x00"):
        assert_detail(login(client, username, password), 401, "Invalid username or password")
    assert login(client, username, "abcdefgh").status_code == 200


# ---------------------------------------------------------------- 4. look-alike names


def assert_look_alike_refused(client, username):
    assert_detail(register(client, username, "another-password"), 400, "like")
    assert count_users_named(client, username) == 0


def test_look_alike_names_are_refused_with_a_sentence(client):
    suffix = letters(8)
    assert register(client, "Alice" + suffix).status_code == 200
    for look_alike in ("AIice" + suffix, "A1ice" + suffix, "aIice" + suffix):  # capital i, one
        assert_look_alike_refused(client, look_alike)
    bob = letters(8)
    assert register(client, "b0b" + bob).status_code == 200
    for look_alike in ("bob" + bob, "BOB" + bob.upper(), "boB" + bob):
        assert_look_alike_refused(client, look_alike)
    other = letters(8)
    assert register(client, "bob" + other).status_code == 200  # the other way round
    assert_look_alike_refused(client, "b0b" + other)
    assert login(client, "Alice" + suffix).status_code == 200
    assert login(client, "b0b" + bob).status_code == 200


def test_al1ce_and_wi11_are_refused_as_look_alikes(client):
    # I, l and 1 look alike; with case folded, i joins them.
    suffix = letters(8)
    assert register(client, "Alice" + suffix).status_code == 200
    assert_look_alike_refused(client, "al1ce" + suffix)
    assert register(client, "will" + suffix).status_code == 200
    assert_look_alike_refused(client, "wi11" + suffix)


def test_a_unique_index_on_the_name_skeleton_refuses_look_alikes_in_the_database_itself(client):
    if BACKEND == "postgresql":
        query = "SELECT count(*) FROM pg_indexes WHERE indexname = 'users_name_skeleton'"
    else:
        query = "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'users_name_skeleton'"
    assert db_value(client, query) == 1
    suffix = letters(8)
    assert register(client, "Alice" + suffix).status_code == 200
    with pytest.raises(Exception):
        client.portal.call(
            chat.database.execute, "INSERT INTO users (username, password) VALUES (:username, 'x')",
            {"username": "AIice" + suffix},
        )
    assert count_users_named(client, "AIice" + suffix) == 0


def test_concurrent_registrations_of_look_alike_names_let_exactly_one_in(real_server):
    suffix = letters(8)
    names = ["Alice" + suffix, "AIice" + suffix, "aIice" + suffix, "A1ice" + suffix, "alice" + suffix, "AIice" + suffix]
    barrier = threading.Barrier(len(names))
    responses = [None] * len(names)

    def register_at_once(number, username):
        with httpx.Client(base_url=real_server[0], timeout=30) as http:
            http.get("/health")  # connected before the barrier
            barrier.wait()
            responses[number] = register(http, username)

    threads = [threading.Thread(target=register_at_once, args=item) for item in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(response.status_code for response in responses) == [200] + [400] * (len(names) - 1)


# The tables as schema.sql made them before the skeleton index existed (eaa3fe9~1).
PREVIOUS_SCHEMA = [
    "CREATE TABLE users (username TEXT PRIMARY KEY, password TEXT NOT NULL)",
    "CREATE UNIQUE INDEX users_username_lower ON users (lower(username))",
    "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " username TEXT NOT NULL REFERENCES users (username), text TEXT NOT NULL)",
    "CREATE TABLE refresh_tokens (jti TEXT PRIMARY KEY, username TEXT NOT NULL REFERENCES users (username),"
    " expires_at BIGINT NOT NULL, used INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX refresh_tokens_username ON refresh_tokens (username)",
    "CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at)",
]
POSTGRES_SERIAL = ("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")


def test_a_database_that_already_holds_look_alikes_still_starts_and_keeps_both():
    suffix = letters(8)
    twins = ["AIice" + suffix, "alice" + suffix]
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    with own_database() as database:
        for statement in PREVIOUS_SCHEMA:
            database.sql(statement if BACKEND != "postgresql" else statement.replace(*POSTGRES_SERIAL))
        database.sql(f"INSERT INTO users (username, password) VALUES ('{twins[0]}', '{hashed}'), ('{twins[1]}', '{hashed}')")
        with running_server(env={"DATABASE_URL": database.url}) as (base_url, process):
            with httpx.Client(base_url=base_url, timeout=10) as http:
                assert http.get("/health").status_code == 200
                for twin in twins:
                    response = login(http, twin)
                    assert response.status_code == 200, response.text
                assert_detail(register(http, "A1ice" + suffix), 400, "like")
                assert register(http, "Newcomer" + suffix).status_code == 200  # the service works
            log = server_log(process)
        assert "look-alike" in log, log
        assert "Traceback" not in log, log
        assert sorted(row[0] for row in database.sql("SELECT username FROM users")) == sorted(twins + ["Newcomer" + suffix])


# ---------------------------------------------------------------- 5. the signed Redis channel


@pytest.fixture
def redis_publisher():
    import redis

    publisher = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        publisher.ping()
    except redis.RedisError as error:
        publisher.close()
        unavailable(f"Redis at {REDIS_URL} does not answer ({error})")
    yield publisher
    publisher.close()


async def frames_until(ws, text):
    """JSON frames received up to and including the one carrying `text`."""
    frames = []
    while not frames or frames[-1]["text"] != text:
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    return frames


def test_unsigned_messages_on_the_redis_channel_are_dropped_and_logged_once(redis_publisher):
    channel = "chat-review-" + secrets.token_hex(6)
    with running_server(env={"BROADCAST_URL": REDIS_URL, "BROADCAST_CHANNEL": channel}) as (base_url, process):
        with httpx.Client(base_url=base_url, timeout=10) as http:
            username, tokens = register_and_login(http)
        texts = [name + " " + secrets.token_hex(4) for name in ("first", "real", "marker")]

        async def scenario():
            async with connect(ws_url(base_url, tokens["access_token"], format="json")) as ws:
                await ws.send(texts[0])
                (first,) = await frames_until(ws, texts[0])
                next_id = first["id"] + 1
                forged = json.dumps({"id": next_id, "username": "admin", "text": "forged"})
                wrong_key = hmac.new(b"not the server's key", forged.encode(), hashlib.sha256).hexdigest()
                for payload in (forged, "deadbeef " + forged, wrong_key + " " + forged, b"\xff\xfe not text", forged):
                    assert redis_publisher.publish(channel, payload) == 1  # the server is listening
                await ws.send(texts[1])  # stored with the id the forgeries claimed
                frames = await frames_until(ws, texts[1])
                await ws.send(texts[2])
                frames += await frames_until(ws, texts[2])
            return next_id, frames

        next_id, frames = run(scenario())
        assert [frame["text"] for frame in frames] == texts[1:], frames
        assert frames[0]["id"] == next_id and frames[0]["username"] == username
        deadline = time.monotonic() + 5
        while "signed" not in server_log(process) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server_log(process)
    warnings = [line for line in log.splitlines() if "signed" in line]  # "not signed", "unsigned"
    assert len(warnings) == 1, log
    assert "Traceback" not in log, log


# ---------------------------------------------------------------- 6 and 7. bodies that stop


def test_clients_that_leave_mid_body_leave_no_traceback_in_the_log(real_server):
    base_url, process = real_server
    host, port = address(base_url)
    log_before = len(server_log(process))
    for _ in range(5):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(
                f"POST /auth/login HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000\r\n\r\n".encode() + b'{"username'
            )
            time.sleep(0.1)  # the server is waiting for the rest of the body
    time.sleep(0.5)
    assert httpx.get(base_url + "/health", timeout=10).status_code == 200
    log = server_log(process)[log_before:]
    assert "Traceback" not in log and "ClientDisconnect" not in log, log


def test_a_body_that_stops_arriving_gets_408_after_the_body_timeout(real_server):
    base_url, _process = real_server
    host, port = address(base_url)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            f"POST /auth/login HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100\r\n\r\n".encode() + b'{"username'
        )
        started = time.monotonic()
        reader = RawSocketReader(sock)
        deadline = started + chat.BODY_TIMEOUT_SECONDS + 5
        try:
            head = reader.http_head(deadline)
        except TimeoutError:
            pytest.fail(f"no answer {deadline - started:.0f} s after the body stopped arriving")
        waited = time.monotonic() - started
        status_line, *header_lines = head.strip().split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
        assert status_line.split()[1] == "408", head
        assert reader.fill(int(headers["content-length"]), deadline)
        body = json.loads(reader.take(int(headers["content-length"])))
    assert list(body) == ["detail"] and isinstance(body["detail"], str) and body["detail"]
    assert waited >= chat.BODY_TIMEOUT_SECONDS / 2  # it waited for the body, it did not refuse at once


# ---------------------------------------------------------------- 9. OpenAPI under a mount


def test_openapi_json_under_a_mount_names_the_mount_as_its_server():
    parent = Starlette(routes=[Mount("/chat", app=chat.app)], lifespan=chat.lifespan)
    with TestClient(parent, raise_server_exceptions=False) as http:
        response = http.get("/chat/openapi.json")
        assert response.status_code == 200, response.text
        mounted = response.json()
        assert mounted["servers"] == [{"url": "/chat"}]
        # The server's URL and a path make a URL that the mount answers.
        assert "/auth/login" in mounted["paths"]
        assert_detail(http.post(mounted["servers"][0]["url"] + "/auth/login", content=b"not json"), 400, "JSON")
    with TestClient(chat.app, raise_server_exceptions=False) as http:
        response = http.get("/openapi.json")
        assert response.status_code == 200, response.text
        plain = response.json()
    assert not any(server.get("url", "").startswith("/chat") for server in plain.get("servers", []))
    assert plain["paths"] == mounted["paths"]
