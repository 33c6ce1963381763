"""Limits against abuse (SPEC sections 2 and 8), against real uvicorn servers: failed logins per
(username, client address), registrations per address, messages per user over all their sockets
and processes, websockets per user in one process; the client address (peer, or a trusted proxy's
X-Forwarded-For); counting in Redis so that N processes allow what one does, and in memory while
Redis is away. Limits are on by default (conftest turns them off for the other test modules).

Counting in memory uses windows aligned to multiples of the window's length since the epoch, and
the sliding-window counter weighs the previous window in: attempts that straddle a boundary could
let one more through. Tests that count in memory therefore start in a fresh window
(same_window()); windows of an hour keep that wait rare. Redis windows start at the first hit."""

import asyncio
import contextlib
import re
import secrets
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import (
    PASSWORD, closed_with, own_redis, register_and_login, running_server, same_window, server_log, unique_name,
    ws_url,
)

LIMIT_VARIABLES = ("LOGIN_LIMIT", "REGISTER_LIMIT", "MESSAGE_LIMIT", "MAX_SOCKETS_PER_USER")
TOO_MANY = re.compile(r"Too many attempts; try again in (\d+) seconds")
OTHER_ADDRESS = "127.0.0.2"  # on Linux the whole of 127.0.0.0/8 is loopback: a second client address


def run(coroutine, seconds=60):
    return asyncio.run(asyncio.wait_for(coroutine, seconds))


def client(base_url, source=None, **options):
    """An HTTP client of `base_url`, connecting from `source` (a local address) when given."""
    transport = httpx.HTTPTransport(local_address=source) if source else None
    return httpx.Client(base_url=base_url, timeout=10, transport=transport, **options)


def login(http, username, password=PASSWORD, headers=None):
    return http.post("/auth/login", json={"username": username, "password": password}, headers=headers)


def register(http, username, password=PASSWORD, headers=None):
    return http.post("/auth/register", json={"username": username, "password": password}, headers=headers)


def assert_401(response):
    assert (response.status_code, response.json()) == (401, {"detail": "Invalid username or password"}), response.text


def assert_429(response, window_seconds):
    """429 {"detail": "Too many attempts; try again in N seconds"} with Retry-After: N; returns N."""
    assert response.status_code == 429, response.text
    assert set(response.json()) == {"detail"}
    match = TOO_MANY.fullmatch(response.json()["detail"])
    assert match, response.json()
    seconds = int(match.group(1))
    assert response.headers["Retry-After"] == str(seconds)
    assert 1 <= seconds <= window_seconds
    return seconds


def history(http, token, **query):
    response = http.get("/auth/messages", params={"limit": 1000, **query}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()


def latest_id(http, token):
    messages = history(http, token)
    return messages[-1]["id"] if messages else 0


async def receive_until(ws, line, seconds=10):
    """Read frames until `line` arrives; fails if the socket closes first."""
    deadline = time.monotonic() + seconds
    while (frame := await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))) != line:
        pass
    return frame


async def nothing_more(ws, unwanted, seconds=0.5):
    """No frame in `unwanted` arrives within `seconds`."""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
        while True:
            assert await asyncio.wait_for(ws.recv(), seconds) not in unwanted


def no_server_errors(process):
    log = server_log(process)
    assert "Traceback" not in log and '" 500' not in log, log


# ---------------------------------------------------------------- one process, limits in memory

LIMITED = {
    "LOGIN_LIMIT": "3 per hour",
    "REGISTER_LIMIT": "off",  # every test here registers its own users
    "MESSAGE_LIMIT": "5 per hour",
    "MAX_SOCKETS_PER_USER": "2",
}


@pytest.fixture(scope="module")
def limited():
    """A server with the login, message and socket limits on; yields (base_url, process)."""
    with running_server(env=LIMITED) as (base_url, process):
        yield base_url, process


@pytest.fixture
def http(limited):
    """A client of the limited server (this module's `http`, not conftest's)."""
    with client(limited[0]) as http_client:
        yield http_client


@pytest.fixture
def http_elsewhere(limited):
    """A client of the limited server from the other address."""
    with client(limited[0], source=OTHER_ADDRESS) as http_client:
        yield http_client


def test_past_the_login_limit_every_login_of_the_pair_is_429_but_not_from_elsewhere(http, http_elsewhere):
    same_window(3600)
    alice, _ = register_and_login(http)
    bob, _ = register_and_login(http)
    for _ in range(3):
        assert_401(login(http, alice, "wrong-password"))
    assert_429(login(http, alice, "wrong-password"), 3600)
    assert_429(login(http, alice), 3600)  # the right password too
    assert_429(login(http, alice.upper()), 3600)  # the name is counted whatever its case
    # Another address still logs in to that account (an attacker cannot lock its owner out),
    # and has failures of its own to count.
    assert login(http_elsewhere, alice).status_code == 200
    assert_401(login(http_elsewhere, alice, "wrong-password"))
    # Another name from the same address is not affected.
    assert login(http, bob).status_code == 200


def test_unknown_and_existing_usernames_are_limited_alike(http):
    same_window(3600)
    existing, _ = register_and_login(http)
    unknown = unique_name("ghost")

    def attempts(name):
        responses = [login(http, name, "wrong-password") for _ in range(4)] + [login(http, name)]
        return [(r.status_code, TOO_MANY.sub("Too many attempts; try again in N seconds", r.json()["detail"]),
                 "Retry-After" in r.headers) for r in responses]

    seen = attempts(existing)
    assert seen == attempts(unknown)
    assert [status for status, _, _ in seen] == [401, 401, 401, 429, 429]


def test_successful_logins_do_not_count(http):
    same_window(3600)
    name, _ = register_and_login(http)
    for _ in range(2):
        assert_401(login(http, name, "wrong-password"))
    for _ in range(10):  # far past the limit of 3, all fine: only failures count
        assert login(http, name).status_code == 200
    assert_401(login(http, name, "wrong-password"))  # the third failure
    assert_429(login(http, name), 3600)


def test_concurrent_right_logins_are_never_refused(limited):
    """Twelve right logins of one pair at once (tabs, a retrying client): far past the limit of 3,
    and all succeed, because none of them is a failure."""
    with client(limited[0]) as http:
        name, _ = register_and_login(http)

    async def burst():
        async with httpx.AsyncClient(base_url=limited[0], timeout=30) as http:
            return await asyncio.gather(*(
                http.post("/auth/login", json={"username": name, "password": PASSWORD}) for _ in range(12)
            ))

    assert [response.status_code for response in run(burst())] == [200] * 12


def test_concurrent_guesses_cannot_all_pass_the_limit_before_the_first_failure_counts(limited):
    """Twelve wrong logins at once for one pair: the limit of 3 lets at most 3 be checked."""
    same_window(3600)
    name = unique_name("burst")

    async def burst():
        async with httpx.AsyncClient(base_url=limited[0], timeout=30) as http:
            return await asyncio.gather(*(
                http.post("/auth/login", json={"username": name, "password": f"guess-{n}-xxxx"}) for n in range(12)
            ))

    statuses = sorted(response.status_code for response in run(burst()))
    assert set(statuses) <= {401, 429}, statuses
    assert 1 <= statuses.count(401) <= 3, statuses


def test_a_user_past_the_message_limit_is_closed_with_4429_and_that_message_goes_nowhere(limited, http):
    """MESSAGE_LIMIT (5 per hour here) counts a user's messages over all their sockets."""
    base_url, _ = limited
    alice, alice_tokens = register_and_login(http)
    bob, bob_tokens = register_and_login(http)
    start = latest_id(http, bob_tokens["access_token"])
    same_window(3600)

    async def scenario():
        async with connect(ws_url(base_url, alice_tokens["access_token"])) as a1, \
                connect(ws_url(base_url, alice_tokens["access_token"])) as a2, \
                connect(ws_url(base_url, bob_tokens["access_token"])) as b:
            for n, ws in enumerate([a1, a1, a1, a2, a2]):
                await ws.send(f"allowed {n}")
                await receive_until(b, f"{alice}: allowed {n}")
            await a2.send("one too many")
            assert await closed_with(a2) == (4429, "Too many messages")
            await nothing_more(b, {f"{alice}: one too many"})
            # Alice's other socket is still open and still receives...
            await b.send("bob is still here")
            await receive_until(a1, f"{bob}: bob is still here")
            # ...but her limit holds on it too, while bob chats on.
            await a1.send("one too many, again")
            assert await closed_with(a1) == (4429, "Too many messages")
            await b.send("bob again")
            await receive_until(b, f"{bob}: bob again")

    run(scenario())
    stored = [(m["username"], m["text"]) for m in history(http, bob_tokens["access_token"], after=start)]
    assert stored == [(alice, f"allowed {n}") for n in range(5)] + [(bob, "bob is still here"), (bob, "bob again")]


def test_a_socket_beyond_max_sockets_per_user_is_closed_with_4429_and_the_others_stay(limited, http):
    base_url, _ = limited
    alice, alice_tokens = register_and_login(http)
    bob, bob_tokens = register_and_login(http)
    token = alice_tokens["access_token"]

    async def scenario():
        async with connect(ws_url(base_url, bob_tokens["access_token"])) as b:
            first = await connect(ws_url(base_url, token))
            second = await connect(base_url.replace("http://", "ws://") + "/ws", subprotocols=["chat", f"bearer.{token}"])
            async with connect(ws_url(base_url, token)) as third:  # the handshake completes: no HTTP 403
                assert await closed_with(third) == (4429, "Too many connections")
            await b.send("hello both")
            for ws in (first, second):
                await receive_until(ws, f"{bob}: hello both")
            # Bob's own sockets are counted apart from alice's.
            async with connect(ws_url(base_url, bob_tokens["access_token"])) as b2:
                await b2.send("bob's second socket")
                await receive_until(b2, f"{bob}: bob's second socket")
            # Once one of alice's closes, she may open another.
            await first.close()
            await asyncio.sleep(0.5)
            async with connect(ws_url(base_url, token)) as fourth:
                await b.send("hello again")
                await receive_until(fourth, f"{bob}: hello again")
                await receive_until(second, f"{bob}: hello again")
            await second.close()

    run(scenario())


def test_retry_after_says_when_a_login_goes_through_again():
    """With "2 per 2 seconds", the 429's Retry-After is honest: after waiting it, the right
    password logs in."""
    with running_server(env={"LOGIN_LIMIT": "2 per 2 seconds"}) as (base_url, _process), client(base_url) as http:
        name, _ = register_and_login(http)
        same_window(2, needed=1.5)
        for _ in range(2):
            assert_401(login(http, name, "wrong-password"))
        seconds = assert_429(login(http, name), 2)
        time.sleep(seconds + 0.05)
        assert login(http, name).status_code == 200


def test_past_the_register_limit_nothing_is_created_and_another_address_may_register():
    with running_server(env={"REGISTER_LIMIT": "3 per hour"}) as (base_url, _process), \
            client(base_url) as http, client(base_url, source=OTHER_ADDRESS) as elsewhere:
        same_window(3600)
        for _ in range(3):
            assert register(http, unique_name()).status_code == 200
        name = unique_name()
        assert_429(register(http, name), 3600)
        assert_401(login(http, name))  # the refused registration created no account
        assert_429(register(http, unique_name()), 3600)
        # Another address has a count of its own, and the name is still free.
        assert register(elsewhere, name).status_code == 200
        assert login(http, name).status_code == 200


# ---------------------------------------------------------------- the client address


def test_login_failures_from_two_addresses_are_counted_apart(limited):
    """The same name from 127.0.0.1 and from 127.0.0.2: each address has its own three failures."""
    same_window(3600)
    with client(limited[0]) as here, client(limited[0], source=OTHER_ADDRESS) as there:
        name, _ = register_and_login(here)
        for _ in range(3):
            assert_401(login(here, name, "wrong-password"))
            assert_401(login(there, name, "wrong-password"))
        assert_429(login(here, name), 3600)
        assert_429(login(there, name), 3600)


FORWARDED = [{"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}]


def test_x_forwarded_for_from_a_trusted_proxy_is_the_client_address():
    args = ["--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"]
    with running_server(env={"LOGIN_LIMIT": "2 per hour"}, args=args) as (base_url, _process), client(base_url) as http:
        same_window(3600)
        name, _ = register_and_login(http)
        for _ in range(2):
            assert_401(login(http, name, "wrong-password", headers=FORWARDED[0]))
        assert_429(login(http, name, headers=FORWARDED[0]), 3600)
        # The proxy itself (no header) and another forwarded client are other addresses.
        assert login(http, name, headers=FORWARDED[1]).status_code == 200
        assert login(http, name).status_code == 200


@pytest.mark.parametrize("args, source", [
    (["--forwarded-allow-ips", "10.9.9.9"], None),  # proxy headers read, but 127.0.0.1 is not trusted
    (["--no-proxy-headers"], None),
    ([], OTHER_ADDRESS),  # uvicorn's default trusts 127.0.0.1 only: 127.0.0.2 is no proxy
], ids=["untrusted-peer", "no-proxy-headers", "default-trust-other-peer"])
def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(args, source):
    with running_server(env={"LOGIN_LIMIT": "2 per hour"}, args=args) as (base_url, _process), \
            client(base_url, source=source) as http:
        same_window(3600)
        name, _ = register_and_login(http)
        for _ in range(2):
            assert_401(login(http, name, "wrong-password", headers=FORWARDED[0]))
        # A made-up header cannot buy more guesses: it is still the same peer.
        assert_429(login(http, name, headers=FORWARDED[1]), 3600)
        assert_429(login(http, name), 3600)
        other = "127.0.0.1" if source else OTHER_ADDRESS
        with client(base_url, source=other) as elsewhere:
            assert login(elsewhere, name).status_code == 200


# ---------------------------------------------------------------- limits are on by default


@pytest.fixture(scope="module")
def default_server():
    """A server whose environment has none of the four limit variables."""
    with running_server(env=dict.fromkeys(LIMIT_VARIABLES)) as (base_url, process):  # None: removed
        yield base_url, process


def test_by_default_the_eleventh_failed_login_of_a_pair_is_429(default_server):
    server_environment = open(f"/proc/{default_server[1].pid}/environ", "rb").read().split(b"\0")
    assert not [v for v in server_environment if v.split(b"=")[0].decode() in LIMIT_VARIABLES]  # really unset
    with client(default_server[0]) as http:
        name, _ = register_and_login(http)
        same_window(900)
        for _ in range(10):
            assert_401(login(http, name, "wrong-password"))
        assert_429(login(http, name, "wrong-password"), 900)
        assert_429(login(http, name), 900)


def test_by_default_an_eleventh_socket_of_one_user_is_closed_with_4429(default_server):
    with client(default_server[0]) as http:
        name, tokens = register_and_login(http)

    async def scenario():
        sockets = [await connect(ws_url(default_server[0], tokens["access_token"])) for _ in range(10)]
        await sockets[0].send("ten are fine")
        for ws in sockets:  # a socket receives only once it is admitted (and counted)
            assert await asyncio.wait_for(ws.recv(), 10) == f"{name}: ten are fine"
        async with connect(ws_url(default_server[0], tokens["access_token"])) as eleventh:
            assert await closed_with(eleventh) == (4429, "Too many connections")
        for ws in sockets:
            await ws.close()

    run(scenario())


def test_by_default_the_thirty_first_message_in_ten_seconds_closes_the_socket(default_server):
    with client(default_server[0]) as http:
        name, tokens = register_and_login(http)
        start = latest_id(http, tokens["access_token"])
        same_window(10, needed=6)

        async def scenario():
            async with connect(ws_url(default_server[0], tokens["access_token"])) as ws:
                for n in range(30):
                    await ws.send(f"default {n}")
                for n in range(30):
                    assert await asyncio.wait_for(ws.recv(), 10) == f"{name}: default {n}"
                await ws.send("the thirty-first")
                return await closed_with(ws)

        assert run(scenario()) == (4429, "Too many messages")
        texts = [m["text"] for m in history(http, tokens["access_token"], after=start) if m["username"] == name]
        assert texts == [f"default {n}" for n in range(30)]


def test_by_default_the_twenty_first_registration_from_an_address_is_429(default_server):
    with client(default_server[0], source=OTHER_ADDRESS) as http:  # an address the other tests here leave alone
        same_window(3600)
        for _ in range(20):
            assert register(http, unique_name()).status_code == 200
        assert_429(register(http, unique_name()), 3600)


# ---------------------------------------------------------------- several processes, limits in Redis


@pytest.fixture(scope="module")
def two_processes(shared_redis):
    """Two servers on one database and one Redis (a channel, hence a key prefix, of their own)."""
    env = {"BROADCAST_URL": shared_redis, "BROADCAST_CHANNEL": "chat-limits-test-" + secrets.token_hex(6),
           "LOGIN_LIMIT": "3 per minute", "MESSAGE_LIMIT": "4 per minute"}
    with running_server(env) as (url_a, process_a), running_server(env) as (url_b, process_b):
        yield (url_a, process_a), (url_b, process_b)


def test_two_processes_share_one_login_limit_through_redis(two_processes):
    (url_a, process_a), (url_b, process_b) = two_processes
    with client(url_a) as a, client(url_b) as b:
        name, _ = register_and_login(a)
        for http in (a, b, a):  # alone, each process would allow two more
            assert_401(login(http, name, "wrong-password"))
        assert_429(login(b, name, "wrong-password"), 60)
        assert_429(login(a, name), 60)
        assert_429(login(b, name), 60)
    no_server_errors(process_a)
    no_server_errors(process_b)


def test_two_processes_share_one_message_limit_through_redis(two_processes):
    (url_a, process_a), (url_b, process_b) = two_processes
    with client(url_a) as http:
        alice, alice_tokens = register_and_login(http)
        bob, bob_tokens = register_and_login(http)
        start = latest_id(http, bob_tokens["access_token"])

    async def scenario():
        async with connect(ws_url(url_a, alice_tokens["access_token"])) as on_a, \
                connect(ws_url(url_b, alice_tokens["access_token"])) as on_b, \
                connect(ws_url(url_a, bob_tokens["access_token"])) as b:
            for n, ws in enumerate([on_a, on_b, on_a, on_b]):
                await ws.send(f"shared {n}")
                await receive_until(b, f"{alice}: shared {n}")
            await on_a.send("fifth on A")  # A itself has seen only two of hers
            assert await closed_with(on_a) == (4429, "Too many messages")
            await on_b.send("fifth on B")
            assert await closed_with(on_b) == (4429, "Too many messages")
            await nothing_more(b, {f"{alice}: fifth on A", f"{alice}: fifth on B"})

    run(scenario())
    with client(url_b) as http:
        texts = [m["text"] for m in history(http, bob_tokens["access_token"], after=start) if m["username"] == alice]
    assert texts == [f"shared {n}" for n in range(4)]
    no_server_errors(process_a)
    no_server_errors(process_b)


def test_with_redis_away_limits_count_in_memory_and_nothing_else_changes():
    import redis

    channel = "chat-limits-test-" + secrets.token_hex(6)
    with own_redis() as redis_server:
        env = {"BROADCAST_URL": redis_server.url, "BROADCAST_CHANNEL": channel,
               "LOGIN_LIMIT": "3 per hour", "MESSAGE_LIMIT": "3 per hour"}
        with running_server(env) as (base_url, process), client(base_url) as http:
            alice, alice_tokens = register_and_login(http)
            bob, bob_tokens = register_and_login(http)
            assert_401(login(http, alice, "wrong-password"))
            # While Redis answers, the limits are counted there.
            connection = redis.Redis.from_url(redis_server.url)
            assert any(channel in key.decode() for key in connection.keys("*")), connection.keys("*")
            connection.close()

            redis_server.stop()
            same_window(3600)
            # Counted in this process now (from zero: Redis had the first failure).
            for _ in range(3):
                assert_401(login(http, alice, "wrong-password"))
            assert_429(login(http, alice), 3600)
            assert login(http, bob).status_code == 200
            start = latest_id(http, bob_tokens["access_token"])

            async def scenario():
                async with connect(ws_url(base_url, alice_tokens["access_token"])) as a, \
                        connect(ws_url(base_url, bob_tokens["access_token"])) as b:
                    for n in range(3):
                        await a.send(f"without redis {n}")
                        await receive_until(b, f"{alice}: without redis {n}")
                        await receive_until(a, f"{alice}: without redis {n}")
                    await b.send("bob without redis")
                    await receive_until(a, f"{bob}: bob without redis")
                    await a.send("over the limit")
                    assert await closed_with(a) == (4429, "Too many messages")
                    await nothing_more(b, {f"{alice}: over the limit"})

            run(scenario())
            stored = [(m["username"], m["text"]) for m in history(http, bob_tokens["access_token"], after=start)]
            assert stored == [(alice, f"without redis {n}") for n in range(3)] + [(bob, "bob without redis")]
            assert http.get("/health").status_code == 200
        no_server_errors(process)
