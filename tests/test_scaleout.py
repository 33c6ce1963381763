"""Scale-out (SPEC section 7): several processes share one PostgreSQL database and one Redis; a
message sent on any process reaches the clients of every process exactly once, history is the
same everywhere, and losing Redis or the database for a while is handled honestly.

Needs PostgreSQL and Redis on 127.0.0.1 whatever CHAT_TEST_DATABASE says. Without them these
tests skip, except with CI=true, where they fail.

The Redis channel ("chat:messages") is shared with anything else using that Redis, such as a
concurrent test run: clients here only look at messages of this module's users, and this
module's database numbers its messages from a random, very high id so that another run's ids
cannot collide with ours in the servers' duplicate filter."""

import asyncio
import collections
import contextlib
import json
import re
import secrets
import subprocess
import time
import urllib.parse

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import chat
from conftest import (
    POSTGRES_ADMIN_URL, closed_with, free_port, own_redis, postgres_admin, register_and_login, running_server,
    server_log, unavailable, ws_url,
)

USER_PREFIX = "so" + secrets.token_hex(3) + "_"  # every user of this module, none of anyone else's
CHANNEL = "chat-test-" + secrets.token_hex(6)  # this run's own, on the shared Redis


def run(coroutine, seconds=60):
    return asyncio.run(asyncio.wait_for(coroutine, seconds))


# ---------------------------------------------------------------- PostgreSQL and Redis


def database_url(name):
    return f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+asyncpg://')}/{name}"


@contextlib.contextmanager
def postgres_database():
    """A new, empty PostgreSQL database; yields its name and drops it afterwards."""
    name = "chat_scaleout_" + secrets.token_hex(5)
    try:
        postgres_admin(f"CREATE DATABASE {name}")
    except (OSError, asyncio.TimeoutError) as error:
        problem = f"PostgreSQL at {POSTGRES_ADMIN_URL} does not answer ({error})"
    else:
        problem = None
    if problem:
        unavailable(problem)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            postgres_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def in_database(name, sql):
    import asyncpg

    async def query():
        connection = await asyncpg.connect(database_url(name).replace("+asyncpg", ""), timeout=5)
        try:
            return await connection.fetchval(sql)
        finally:
            await connection.close()

    return asyncio.run(query())


@pytest.fixture(scope="module")
def shared_database():
    """The PostgreSQL database that this module's servers share."""
    with postgres_database() as name:
        yield name


# ---------------------------------------------------------------- servers and their logs


def wait_for_log(process, phrase, seconds):
    deadline = time.monotonic() + seconds
    while phrase not in server_log(process):
        assert time.monotonic() < deadline, f"{phrase!r} not logged within {seconds}s:\n{server_log(process)}"
        time.sleep(0.05)


def new_user(http):
    return register_and_login(http, USER_PREFIX + secrets.token_hex(3))


def history(http, token, after):
    response = http.get("/auth/messages", params={"after": after, "limit": 1000},
                        headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()


def latest_id(http, token):
    messages = history(http, token, 0)
    return messages[-1]["id"] if messages else 0


# ---------------------------------------------------------------- websocket clients


class Client:
    """A format=json websocket whose frames from this module's users are collected as they come."""

    def __init__(self, name, ws):
        self.name, self.ws = name, ws
        self.frames = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self.read())

    @classmethod
    async def open(cls, name, base_url, token, after):
        return cls(name, await connect(ws_url(base_url, token, format="json", after=after), open_timeout=10))

    async def read(self):
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if message["username"].startswith(USER_PREFIX):
                    self.frames.append(message)
                    self.changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.changed.set()

    def texts(self):
        return [message["text"] for message in self.frames]

    async def wait_for(self, texts, seconds=10):
        """Until every one of `texts` has arrived; fails naming what is missing."""
        deadline = asyncio.get_running_loop().time() + seconds
        while missing := set(texts) - set(self.texts()):
            remaining = deadline - asyncio.get_running_loop().time()
            if self.reader.done():
                raise AssertionError(f"{self.name}: closed ({self.ws.close_code}) while waiting for {sorted(missing)}")
            if remaining <= 0:
                raise AssertionError(f"{self.name}: within {seconds}s, never got {sorted(missing)}")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def assert_each_once(self, texts):
        counts = collections.Counter(self.texts())
        assert {text: counts[text] for text in texts} == {text: 1 for text in texts}, f"{self.name} got {counts}"

    async def close(self):
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reader, 5)


async def everyone_gets(clients, texts, seconds=10, quiet=0.5):
    """Every client receives every one of `texts` exactly once (a late duplicate has `quiet` seconds to show)."""
    await asyncio.gather(*(client.wait_for(texts, seconds) for client in clients))
    await asyncio.sleep(quiet)
    for client in clients:
        client.assert_each_once(texts)


async def in_step(clients):
    """Return once every client is surely in its server's broadcast: each sees a message sent
    now. (Clients connect with after=, so even a client still joining gets it exactly once.)"""
    text = "sync " + secrets.token_hex(4)
    await clients[0].ws.send(text)
    await everyone_gets(clients, [text], quiet=0)


async def send_all(client, texts, echo_seconds=10):
    """Send one at a time, each once its echo has come back (so their ids go up in this order)."""
    for text in texts:
        await client.ws.send(text)
        await client.wait_for([text], echo_seconds)


async def everyone_sends(clients, count):
    """Once all are in step, each client sends `count` messages at the same time as the others;
    returns every text sent, once every client has received every one of them."""
    await in_step(clients)
    sent = [[f"{client.name} says {n} {secrets.token_hex(3)}" for n in range(count)] for client in clients]
    await asyncio.gather(*(send_all(client, texts) for client, texts in zip(clients, sent)))
    everything = [text for texts in sent for text in texts]
    await everyone_gets(clients, everything)
    return everything


def assert_in_id_order(client):
    """A client receives messages in id order, whichever process stored them: every process
    stores and publishes under one PostgreSQL advisory lock, and Redis keeps publish order."""
    ids = [message["id"] for message in client.frames]
    assert ids == sorted(ids), f"{client.name}: {ids}"


# ---------------------------------------------------------------- tests


def test_two_processes_share_one_database_and_one_redis(shared_database, shared_redis):
    env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": CHANNEL}
    with running_server(env) as (url_a, _), running_server(env) as (url_b, _):
        with httpx.Client(base_url=url_a, timeout=10) as http_a, httpx.Client(base_url=url_b, timeout=10) as http_b:
            # registered on one process, connected to the other: users and tokens are shared too
            users = [new_user(http_a), new_user(http_b), new_user(http_a), new_user(http_b)]
            token = users[0][1]["access_token"]
            start = latest_id(http_a, token)
            places = [url_b, url_a, url_a, url_b]

            async def scenario():
                clients = [await Client.open(f"{name}@{'AB'[places[i] == url_b]}", places[i], tokens["access_token"], start)
                           for i, (name, tokens) in enumerate(users)]
                everything = await everyone_sends(clients, 3)
                for client in clients:
                    assert_in_id_order(client)
                frames = clients[0].frames
                await asyncio.gather(*(client.close() for client in clients))
                return everything, frames

            everything, frames = run(scenario())
            seen_on_a, seen_on_b = history(http_a, token, start), history(http_b, token, start)
            assert seen_on_a == seen_on_b
            mine = [message for message in seen_on_a if message["text"] in everything]
            assert sorted(message["text"] for message in mine) == sorted(everything)
            assert all(frame in seen_on_a for frame in frames)  # same ids, names and texts as delivered


def test_under_load_two_processes_deliver_every_message_once_in_id_order(shared_database, shared_redis):
    """Many senders on two processes at once, without waiting for their echoes: batches of the
    two processes interleave, and each publishes after its commit, so batches can reach the
    channel out of id order. Every client must still get every message exactly once, in id
    order, and the same ids as the history holds."""
    env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": CHANNEL}
    with running_server(env) as (url_a, _), running_server(env) as (url_b, _):
        with httpx.Client(base_url=url_a, timeout=10) as http:
            users = [new_user(http) for _ in range(8)]
            token = users[0][1]["access_token"]
            start = latest_id(http, token)

            async def scenario():
                clients = [await Client.open(f"{name}@{'AB'[i % 2]}", (url_a, url_b)[i % 2], tokens["access_token"], start)
                           for i, (name, tokens) in enumerate(users)]
                await in_step(clients)
                sent = [f"{client.name} load {n}" for client in clients for n in range(40)]
                await asyncio.gather(*(client.ws.send(text) for text in sent for client in clients if text.startswith(client.name)))
                await everyone_gets(clients, sent, seconds=30)
                await asyncio.gather(*(client.close() for client in clients))
                return clients

            clients = run(scenario(), seconds=90)
            stored = [message["id"] for message in history(http, token, start) if message["username"].startswith(USER_PREFIX)]
        for client in clients:
            ids = [message["id"] for message in client.frames]
            assert ids == stored, f"{client.name}: got {len(ids)} ids, history holds {len(stored)}; out of order or missing"


def test_a_process_stores_only_in_its_turn_under_the_shared_lock(shared_database, shared_redis):
    """Every process's INSERT takes one PostgreSQL advisory lock first, so ids become visible in
    the order they are given. While someone else holds that lock, a message is neither stored
    nor delivered; once it is let go, it is both."""
    env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": CHANNEL}
    with running_server(env) as (url, _), httpx.Client(base_url=url, timeout=10) as http:
        name, tokens = new_user(http)
        token = tokens["access_token"]
        start = latest_id(http, token)

        async def scenario():
            client = await Client.open(name, url, token, start)
            try:
                async with shared_lock_held(shared_database) as holder:
                    await client.ws.send("waits its turn")
                    await asyncio.sleep(1.5)
                    assert client.texts() == []
                    assert await asyncio.to_thread(history, http, token, start) == []
                    # An id given out now is lower than the waiting message's: it takes its id in its turn.
                    taken_meanwhile = await holder.fetchval("SELECT nextval('messages_id_seq')")
                    await let_go(holder)
                    await client.wait_for(["waits its turn"])
            finally:
                await client.close()
            return taken_meanwhile

        taken_meanwhile = run(scenario())
        stored = history(http, token, start)
        assert [message["text"] for message in stored] == ["waits its turn"]
        assert stored[0]["id"] > taken_meanwhile


@contextlib.asynccontextmanager
async def shared_lock_held(database):
    """A connection of the test's own holding the advisory lock that every INSERT takes first
    (with Redis), until let_go() or the end of the block."""
    import asyncpg

    holder = await asyncpg.connect(database_url(database).replace("+asyncpg", ""), timeout=5)
    try:
        await holder.execute(f"SELECT pg_advisory_lock({chat.PUBLISH_LOCK})")
        yield holder
    finally:
        await holder.close()


async def let_go(holder):
    await holder.execute(f"SELECT pg_advisory_unlock({chat.PUBLISH_LOCK})")


def batches_stored(http):
    """chat_store_batches_total of the server behind `http`."""
    found = re.search(r"^chat_store_batches_total (\S+)$", http.get("/metrics").text, re.MULTILINE)
    return float(found.group(1))


def test_a_socket_is_read_on_while_its_messages_wait_to_be_stored(shared_database, shared_redis):
    """A client that sends several messages at once does not wait for each to be stored before
    the next is read: while the first waits for the shared lock, the others queue behind it and
    are stored together in the next INSERT, and all arrive in the order sent."""
    env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": CHANNEL}
    with running_server(env) as (url, _), httpx.Client(base_url=url, timeout=10) as http:
        name, tokens = new_user(http)
        token = tokens["access_token"]
        start = latest_id(http, token)
        texts = [f"burst {n}" for n in range(5)]

        async def scenario():
            client = await Client.open(name, url, token, start)
            try:
                async with shared_lock_held(shared_database) as holder:
                    before = await asyncio.to_thread(batches_stored, http)
                    for text in texts:
                        await client.ws.send(text)
                    await asyncio.sleep(1)
                    await let_go(holder)
                    await client.wait_for(texts)
            finally:
                await client.close()
            return before, client.texts()

        before, received = run(scenario())
        assert received == texts
        assert [message["text"] for message in history(http, token, start)] == texts
        # The first alone as it came, or with those read before the writer woke; then the rest
        # (one at a time, there would be five).
        assert batches_stored(http) - before in (1, 2)


def test_a_batch_that_does_not_fit_the_message_limit_stores_what_fits(shared_database, shared_redis):
    """MESSAGE_LIMIT counts a user's messages in a batch with one call (in Redis here); when they
    do not all fit, one by one: the first that fit are stored, the socket of the first one past
    the limit gets 4429, and another user's messages in the same batch are stored."""
    env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": shared_redis,
           "BROADCAST_CHANNEL": "chat-test-" + secrets.token_hex(6), "MESSAGE_LIMIT": "5 per hour"}
    with running_server(env) as (url, process), httpx.Client(base_url=url, timeout=10) as http:
        alice, alice_token, start = user_from_now(http)
        bob, bob_token, _ = user_from_now(http)

        async def scenario():
            watcher = await Client.open(bob, url, bob_token, start)
            try:
                async with connect(ws_url(url, alice_token)) as ws, shared_lock_held(shared_database) as holder:
                    await ws.send("alice 0")  # stored alone, once the lock is let go
                    await asyncio.sleep(0.3)
                    for n in range(1, 8):  # the next batch: 7 of hers, 4 of which fit
                        await ws.send(f"alice {n}")
                    for n in range(2):
                        await watcher.ws.send(f"bob {n}")
                    await asyncio.sleep(0.5)
                    await let_go(holder)
                    assert await closed_with(ws) == (4429, "Too many messages")
                await watcher.wait_for(["bob 1"])
                await asyncio.sleep(0.3)
                return watcher.texts()
            finally:
                await watcher.close()

        expected = [f"alice {n}" for n in range(5)] + ["bob 0", "bob 1"]
        assert run(scenario()) == expected
        assert [m["text"] for m in history(http, bob_token, start)] == expected
    assert "Traceback" not in server_log(process)


def test_a_statement_that_hangs_fails_after_database_seconds_instead_of_holding_every_message(
        shared_database, shared_redis):
    """A PostgreSQL that stops answering (here: the shared lock held and never let go) makes a
    message's INSERT fail after DATABASE_SECONDS, so its websocket gets 1011 and the client can
    reconnect and resend, rather than every message waiting for ever behind it."""
    env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": CHANNEL}
    with running_server(env) as (url, process), httpx.Client(base_url=url, timeout=10) as http:
        name, token, start = user_from_now(http)

        async def scenario():
            async with shared_lock_held(shared_database), connect(ws_url(url, token)) as ws:
                sent = time.monotonic()
                await ws.send("behind a lock that is never let go")
                assert await closed_with(ws, chat.DATABASE_SECONDS + 5) == (1011, "")
                waited = time.monotonic() - sent
            client = await Client.open(name, url, token, start)
            try:
                await send_all(client, ["after the lock"])
            finally:
                await client.close()
            return waited

        waited = run(scenario())
        assert chat.DATABASE_SECONDS - 1 < waited < chat.DATABASE_SECONDS + 3
        assert [m["text"] for m in history(http, token, start)] == ["after the lock"]
    assert "could not store a message" in server_log(process)


def test_messages_read_before_a_stop_are_stored_before_the_process_exits(shared_database, shared_redis):
    """A server stopped (SIGTERM) while messages it has read wait to be stored stores them before
    it exits, rather than dropping them with its writer: a restart loses no message that reached
    the server. Here they wait for the shared lock, which the test lets go after the signal."""
    env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": CHANNEL}
    texts = [f"before the stop {n}" for n in range(5)]
    with running_server(env) as (url, process), httpx.Client(base_url=url, timeout=10) as http:
        name, tokens = new_user(http)
        token = tokens["access_token"]
        start = latest_id(http, token)

        async def scenario():
            async with shared_lock_held(shared_database) as holder:
                async with connect(ws_url(url, token)) as ws:
                    for text in texts:
                        await ws.send(text)
                    await asyncio.sleep(1)  # read by the server, and waiting for the lock
                    process.terminate()
                    assert await closed_with(ws) == (1001, "")
                await asyncio.sleep(0.5)
                assert process.poll() is None  # still storing them
                await let_go(holder)

        run(scenario())
        process.wait(timeout=15)  # uvicorn ends by raising the signal it caught again: no exit code to check
        assert "Traceback" not in server_log(process)
    with running_server(env) as (url, _), httpx.Client(base_url=url, timeout=10) as http:
        assert [m["text"] for m in history(http, token, start)] == texts


def publishing_through(proxy_port, database, redis_url):
    """A server's environment where it publishes through a proxy on `proxy_port` (holding_proxy)."""
    return {"DATABASE_URL": database_url(database), "BROADCAST_URL": redis_url, "BROADCAST_CHANNEL": CHANNEL,
            "CHAT_TEST_PUBLISH_URL": f"redis://127.0.0.1:{proxy_port}/0"}


def user_from_now(http):
    """A new user: (name, access token, the latest id stored so far)."""
    name, tokens = new_user(http)
    return name, tokens["access_token"], latest_id(http, tokens["access_token"])


async def holding_proxy(port, redis_port, release):
    """A TCP proxy on `port` to the Redis on `redis_port` that holds each PUBLISH until `release` is set."""

    async def forward(source, sink, hold):
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if hold and b"PUBLISH" in data:
                    await release.wait()
                sink.write(data)
                await sink.drain()
        sink.close()

    async def handle(reader, writer):
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", redis_port)
        await asyncio.gather(forward(reader, upstream_writer, True), forward(upstream_reader, writer, False))

    return await asyncio.start_server(handle, "127.0.0.1", port)


def test_a_batch_is_stored_while_the_one_before_is_being_published(shared_database, shared_redis):
    """The writer stores the next batch without waiting for the last one's publish (which only
    orders the publishes): while Redis holds the first message's PUBLISH, a second message from
    the same socket is stored; once the publish goes through, both arrive, in order."""
    proxy_port = free_port()
    with running_server(publishing_through(proxy_port, shared_database, shared_redis)) as (url, _), \
            httpx.Client(base_url=url, timeout=10) as http:
        name, token, start = user_from_now(http)

        async def scenario():
            release = asyncio.Event()
            proxy = await holding_proxy(proxy_port, urllib.parse.urlsplit(shared_redis).port, release)
            client = await Client.open(name, url, token, start)
            try:
                await client.ws.send("first")
                await client.ws.send("second")
                deadline = time.monotonic() + 1.5  # the publish gives up after 2 s
                while len(stored := await asyncio.to_thread(history, http, token, start)) < 2:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                assert [message["text"] for message in stored] == ["first", "second"]
                assert client.texts() == []  # the first PUBLISH is still held
                release.set()
                await client.wait_for(["first", "second"])
                assert client.texts() == ["first", "second"]
            finally:
                release.set()
                await client.close()
                proxy.close()

        run(scenario())


def test_after_a_publish_times_out_the_next_batches_are_delivered_here_at_once(shared_database, shared_redis):
    """A Redis that holds a PUBLISH costs the first batch the 2 s the publish waits, not every
    batch: for PUBLISH_RETRY_SECONDS after a failed publish, batches go to this process's
    websockets without trying Redis (the other processes fetch them from the database)."""
    proxy_port = free_port()
    with running_server(publishing_through(proxy_port, shared_database, shared_redis)) as (url, process), \
            httpx.Client(base_url=url, timeout=10) as http:
        name, token, start = user_from_now(http)

        async def scenario():
            release = asyncio.Event()  # never set: every PUBLISH is held
            proxy = await holding_proxy(proxy_port, urllib.parse.urlsplit(shared_redis).port, release)
            client = await Client.open(name, url, token, start)
            try:
                await client.ws.send("first")
                await client.wait_for(["first"])  # after the publish gave up
                sent = time.monotonic()
                await client.ws.send("second")
                await client.wait_for(["first", "second"])
                return time.monotonic() - sent
            finally:
                release.set()
                await client.close()
                proxy.close()

        assert run(scenario()) < 1.0  # it waited 2 s on Redis again before
        assert server_log(process).count("could not publish messages") == 1


def worker_pids(port, clients):
    """The server processes that hold the connections of `clients` to `port`."""
    output = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                            capture_output=True, text=True, timeout=10).stdout
    owner = {int(peer): int(pid) for peer, pid in re.findall(r":\d+\s+\S+:(\d+)\s+users:\(\(.*?pid=(\d+)", output)}
    return {owner.get(client.ws.local_address[1]) for client in clients}


@pytest.fixture
def new_database():
    """A PostgreSQL database of this test's own, empty: no schema yet."""
    with postgres_database() as name:
        yield name


def test_four_workers_share_one_database_and_one_redis(new_database, shared_redis):
    # A new database: the four workers start at once and apply the schema at the same moment.
    env = {"DATABASE_URL": database_url(new_database), "BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": CHANNEL}
    with running_server(env, args=["--workers", "4"]) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=10) as http:
            users = [new_user(http) for _ in range(4)]
            start = latest_id(http, users[0][1]["access_token"])

            async def scenario():
                clients = []
                # A connection goes to whichever worker accepts it first, and the server answered
                # /health as soon as one worker was up. Keep opening clients, unhurried, until
                # they are spread over at least two workers, else this would test nothing.
                deadline = time.monotonic() + 30
                while len(clients) < 8 or (len(worker_pids(port, clients) - {None}) < 2 and time.monotonic() < deadline):
                    if len(clients) >= 8:
                        await asyncio.sleep(0.25)
                    name, tokens = users[len(clients) % len(users)]
                    clients.append(await Client.open(f"{name}#{len(clients)}", url, tokens["access_token"], start))
                workers = worker_pids(port, clients)
                assert len(workers - {None}) >= 2 and process.pid not in workers, f"{len(clients)} clients all on one worker: {workers}"
                everything = await everyone_sends(clients, 2)
                await asyncio.gather(*(client.close() for client in clients))
                return everything

            everything = run(scenario())
            stored = [m["text"] for m in history(http, users[0][1]["access_token"], start)]
            assert sorted(text for text in stored if text in everything) == sorted(everything)
        assert "Traceback" not in server_log(process), server_log(process)  # e.g. a worker that failed to start


def test_losing_redis_for_a_while_loses_no_message(shared_database):
    with own_redis() as redis_server:
        env = {"DATABASE_URL": database_url(shared_database), "BROADCAST_URL": redis_server.url, "BROADCAST_CHANNEL": CHANNEL}
        with running_server(env) as (url_a, process_a), running_server(env) as (url_b, process_b):
            with httpx.Client(base_url=url_a, timeout=10) as http_a, httpx.Client(base_url=url_b, timeout=10) as http_b:
                tokens_a, tokens_b, tokens_c = (new_user(http_a)[1]["access_token"] for _ in range(3))
                start = latest_id(http_a, tokens_a)

                async def scenario():
                    a = await Client.open("a@A", url_a, tokens_a, start)  # stays connected
                    b = await Client.open("b@B", url_b, tokens_b, start)  # stays connected
                    c = await Client.open("c@B", url_b, tokens_c, start)  # leaves, comes back later
                    await in_step([a, b, c])
                    before = [f"before {n} {secrets.token_hex(3)}" for n in range(2)]
                    await send_all(a, before[:1])
                    await send_all(b, before[1:])
                    await everyone_gets([a, b, c], before)
                    last_seen_by_c = max(message["id"] for message in c.frames)
                    await c.close()

                    await asyncio.to_thread(redis_server.stop)
                    stopped_at = time.monotonic()
                    await asyncio.to_thread(wait_for_log, process_a, "lost the connection to Redis", 10)
                    await asyncio.to_thread(wait_for_log, process_b, "lost the connection to Redis", 10)
                    # Sending still works meanwhile: each sender gets its own message back, and it
                    # is stored. Both sides take turns, so that their ids interleave.
                    during = [f"during {n} {secrets.token_hex(3)}" for n in range(4)]
                    for n, text in enumerate(during):
                        await send_all([a, b][n % 2], [text])
                    stored = [m["text"] for m in await asyncio.to_thread(history, http_b, tokens_b, start)]
                    assert all(text in stored for text in during), stored
                    await asyncio.sleep(max(0.0, stopped_at + 3 - time.monotonic()))  # a few seconds' outage

                    await asyncio.to_thread(redis_server.start)  # on the same port
                    await asyncio.to_thread(wait_for_log, process_a, "reconnected to Redis", 15)
                    await asyncio.to_thread(wait_for_log, process_b, "reconnected to Redis", 15)
                    # Those who stayed get what the other process stored meanwhile, exactly once.
                    await everyone_gets([a, b], before + during)

                    # Redis carries messages again, and the client that left catches up with after=
                    # (on the other process this time).
                    c = await Client.open("c@A", url_a, tokens_c, last_seen_by_c)
                    after = [f"after {n} {secrets.token_hex(3)}" for n in range(2)]
                    await send_all(a, after[:1])
                    await send_all(b, after[1:])
                    await everyone_gets([a, b], before + during + after)
                    await everyone_gets([c], during + after)
                    assert not any(message["id"] <= last_seen_by_c for message in c.frames)
                    await asyncio.gather(a.close(), b.close(), c.close())
                    return before + during + after

                everything = run(scenario(), 90)
                seen_on_a = history(http_a, tokens_a, start)
                assert seen_on_a == history(http_b, tokens_b, start)
                assert sorted(m["text"] for m in seen_on_a if m["text"] in everything) == sorted(everything)


def test_a_lost_database_means_503_and_close_1011_not_a_pretended_send(new_database):
    with running_server({"DATABASE_URL": database_url(new_database)}) as (url, _process):
        with httpx.Client(base_url=url, timeout=10) as http:
            _name, tokens = new_user(http)

            async def scenario():
                async with connect(ws_url(url, tokens["access_token"], format="json"), open_timeout=10) as ws:
                    await ws.send("before the database goes")
                    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["text"] == "before the database goes"

                    # FORCE ends the server's connections too
                    await asyncio.to_thread(postgres_admin, f"DROP DATABASE {new_database} WITH (FORCE)")
                    response = await asyncio.to_thread(http.get, "/health")
                    assert response.status_code == 503, response.text
                    assert "detail" in response.json()

                    await ws.send("after the database went")
                    frames = []
                    with pytest.raises(ConnectionClosed):
                        while True:
                            frames.append(await asyncio.wait_for(ws.recv(), 10))
                    assert frames == []  # nothing pretends that the message went out
                    return ws.close_code

            assert run(scenario()) == 1011
