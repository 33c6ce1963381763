"""Who is online (SPEC section 9): GET /auth/online and presence frames on format=json&presence=1,
in one process and across processes sharing Redis, including a process that dies without closing."""

import asyncio
import json
import secrets

import httpx
import pytest
from starlette.testclient import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import chat
from conftest import REDIS_URL, own_redis, register_and_login, running_server, ws_url


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def online(base_url, tokens):
    response = httpx.get(base_url + "/auth/online", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert response.status_code == 200, response.text
    return response.json()


async def presence_frames(ws, seconds, enough=None):
    """The presence frames a socket receives within `seconds` (or until it has `enough`)."""
    frames = []
    with_deadline = asyncio.get_running_loop().time() + seconds
    while (left := with_deadline - asyncio.get_running_loop().time()) > 0 and len(frames) != enough:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), left))
        except asyncio.TimeoutError:
            break
        if frame["type"] == "presence":
            frames.append((frame["username"], frame["online"]))
    return frames


async def wait_for_presence(ws, expected, seconds=10):
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        frame = json.loads(await asyncio.wait_for(ws.recv(), deadline - asyncio.get_running_loop().time()))
        if frame["type"] == "presence" and (frame["username"], frame["online"]) == expected:
            return
    raise AssertionError(f"no presence frame {expected}")


async def echoed(ws):
    """Send a message and wait for its echo: the server reads a socket only once it has counted it."""
    text = "echo " + secrets.token_hex(4)
    await ws.send(text)
    while not (await asyncio.wait_for(ws.recv(), 10)).endswith(": " + text):
        pass


def watch(base_url, tokens):
    return connect(ws_url(base_url, tokens["access_token"], format="json", presence="1"))


@pytest.fixture(scope="module")
def server():
    with running_server() as (base_url, _):
        yield base_url


def test_joins_and_leaves_are_per_user_not_per_socket(server):
    with httpx.Client(base_url=server) as http:
        alice, alice_tokens = register_and_login(http)
        bob, bob_tokens = register_and_login(http)

    async def scenario():
        async with watch(server, alice_tokens) as watcher:
            await wait_for_presence(watcher, (alice, True))  # a socket hears its own user's join
            bob_first = await connect(ws_url(server, bob_tokens["access_token"]))
            await wait_for_presence(watcher, (bob, True))
            bob_second = await connect(ws_url(server, bob_tokens["access_token"]))  # a second tab: no join
            listed = {row["username"]: row["connections"] for row in online(server, alice_tokens)}
            assert listed[bob] == 2 and listed[alice] == 1
            await bob_first.close()
            assert await presence_frames(watcher, 1) == []  # bob still has a socket open
            await bob_second.close()
            await wait_for_presence(watcher, (bob, False))
            assert bob not in {row["username"] for row in online(server, alice_tokens)}

    run(scenario())


def test_quick_opens_and_closes_give_alternating_joins_and_leaves(server):
    with httpx.Client(base_url=server) as http:
        _, watcher_tokens = register_and_login(http)
        dave, dave_tokens = register_and_login(http)

    async def scenario():
        async with watch(server, watcher_tokens) as watcher:
            await presence_frames(watcher, 0.3)  # its own join
            for _ in range(15):
                ws = await connect(ws_url(server, dave_tokens["access_token"]))
                await ws.close()
            frames = await presence_frames(watcher, 3)
        # A socket that opens before the previous one's close is handled keeps dave online (no
        # leave, no join), so there may be fewer pairs; but joins and leaves always alternate.
        assert 1 <= len(frames) // 2 <= 15 and frames == [(dave, True), (dave, False)] * (len(frames) // 2)

    run(scenario())


async def frames_until(ws, text):
    """The (username, online) of each presence frame a socket receives before the message `text`."""
    frames = []
    while (frame := json.loads(await asyncio.wait_for(ws.recv(), 5))).get("text") != text:
        frames.append((frame["username"], frame["online"]))
    return frames


def test_a_join_goes_before_the_next_message_and_only_to_sockets_that_were_listening(server):
    """A join or leave may wait a moment for the next message, to go out in the same write: it
    still comes before that message, and a socket that subscribed while it waited never gets it."""
    with httpx.Client(base_url=server) as http:
        _, watcher_tokens = register_and_login(http)
        bob, bob_tokens = register_and_login(http)
        _, late_tokens = register_and_login(http)

    async def scenario():
        async with watch(server, watcher_tokens) as watcher:
            await presence_frames(watcher, 0.3)  # its own join
            async with connect(ws_url(server, bob_tokens["access_token"])) as bob_socket:
                while bob not in {row["username"] for row in online(server, watcher_tokens)}:
                    await asyncio.sleep(0.005)
                async with watch(server, late_tokens) as late_socket:  # bob's join may still be waiting
                    text = secrets.token_hex(4)
                    await bob_socket.send(text)
                    assert (bob, True) in await frames_until(watcher, text)
                    assert (bob, True) not in await frames_until(late_socket, text)

    run(scenario())


def test_joins_waiting_for_a_message_go_before_it_without_the_shortcut_too():
    """Starlette's TestClient has no chat.write_frame: a join that waited for a message goes out
    as a frame of its own through the socket's ASGI send, still before that message."""
    with TestClient(chat.app) as client:
        alice, alice_tokens = register_and_login(client)
        bob, bob_tokens = register_and_login(client)
        with client.websocket_connect(f"/ws?token={alice_tokens['access_token']}&format=json&presence=1") as watcher:
            assert watcher.receive_json() == {"type": "presence", "username": alice, "online": True}
            with client.websocket_connect(f"/ws?token={bob_tokens['access_token']}") as bob_socket:
                bob_socket.send_text("hello")
                assert watcher.receive_json() == {"type": "presence", "username": bob, "online": True}
                assert (watcher.receive_json()["text"], bob_socket.receive_text()) == ("hello", f"{bob}: hello")
            assert watcher.receive_json() == {"type": "presence", "username": bob, "online": False}


def test_a_second_tab_that_opens_while_a_join_waits_gets_only_what_comes_after():
    """A socket that subscribes while a join waits (here a second tab, which is no join itself)
    has nothing of that batch to get: the batch goes to the first tab alone."""
    with TestClient(chat.app) as client:
        alice, alice_tokens = register_and_login(client)
        carol, carol_tokens = register_and_login(client)
        watch_path = f"/ws?token={alice_tokens['access_token']}&format=json&presence=1"
        with client.websocket_connect(watch_path) as first_tab:
            assert first_tab.receive_json() == {"type": "presence", "username": alice, "online": True}
            with client.websocket_connect(f"/ws?token={carol_tokens['access_token']}") as carol_socket:
                bearer = {"Authorization": f"Bearer {alice_tokens['access_token']}"}
                while carol not in {row["username"] for row in client.get("/auth/online", headers=bearer).json()}:
                    pass  # until her join has happened; it waits (up to 0.1 s) for a message
                with client.websocket_connect(watch_path) as second_tab:
                    assert first_tab.receive_json() == {"type": "presence", "username": carol, "online": True}
                    carol_socket.send_text("after the join")
                    assert first_tab.receive_json()["text"] == "after the join"
                    assert second_tab.receive_json()["text"] == "after the join"


def test_online_is_sorted_by_username_and_needs_a_token(server):
    with httpx.Client(base_url=server) as http:
        users = [register_and_login(http, "z" + secrets.token_hex(3)), register_and_login(http, "A" + secrets.token_hex(3))]
        assert http.get("/auth/online").status_code == 401
        assert http.get("/auth/online", headers={"Authorization": "Bearer nonsense"}).status_code == 401

    async def scenario():
        sockets = [await connect(ws_url(server, tokens["access_token"])) for _, tokens in users]
        rows = online(server, users[0][1])
        assert [row["username"] for row in rows] == sorted(row["username"] for row in rows)
        assert {name for name, _ in users} <= {row["username"] for row in rows}
        assert all(set(row) == {"username", "connections"} for row in rows)
        for ws in sockets:
            await ws.close()

    run(scenario())


def test_sockets_without_presence_get_no_presence_frames_and_bad_values_are_refused(server):
    with httpx.Client(base_url=server) as http:
        _, alice_tokens = register_and_login(http)
        bob, bob_tokens = register_and_login(http)

    async def scenario():
        async with connect(ws_url(server, alice_tokens["access_token"], format="json")) as plain:
            async with connect(ws_url(server, bob_tokens["access_token"])):
                await plain.send("hello")
                frame = json.loads(await asyncio.wait_for(plain.recv(), 10))
                assert frame["type"] == "message" and frame["text"] == "hello"
        for query in ({"presence": "1"}, {"format": "json", "presence": "yes"}):
            async with connect(ws_url(server, alice_tokens["access_token"], **query)) as ws:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                assert ws.close_code == 1008

    run(scenario())


# ---------------------------------------------------------------- across processes


@pytest.fixture
def two_processes():
    """Two servers on the test database and the machine's Redis, on a channel of their own,
    with presence expiring after 3 s."""
    env = {"BROADCAST_URL": REDIS_URL, "BROADCAST_CHANNEL": "chat-test-" + secrets.token_hex(4),
           "PRESENCE_EXPIRY_SECONDS": "3"}
    with running_server(env=env) as (first, first_process), running_server(env=env) as (second, second_process):
        yield (first, first_process), (second, second_process)


def test_two_users_on_two_processes_see_each_other_and_a_killed_process_drops_its_users(two_processes):
    (first, _), (second, second_process) = two_processes
    with httpx.Client(base_url=first) as http:
        alice, alice_tokens = register_and_login(http)
        bob, bob_tokens = register_and_login(http)

    async def scenario():
        async with watch(first, alice_tokens) as alice_ws:
            async with watch(second, bob_tokens):
                await wait_for_presence(alice_ws, (bob, True))
                for base_url in (first, second):
                    names = {row["username"] for row in online(base_url, alice_tokens)}
                    assert {alice, bob} <= names
                second_process.kill()  # kill -9: bob's socket is never closed
                second_process.wait()
                await wait_for_presence(alice_ws, (bob, False), seconds=10)
            assert bob not in {row["username"] for row in online(first, alice_tokens)}

    run(scenario())


def test_one_user_joining_on_two_processes_at_once_is_one_join(two_processes):
    (first, _), (second, _) = two_processes
    with httpx.Client(base_url=first) as http:
        _, watcher_tokens = register_and_login(http)
        carol, carol_tokens = register_and_login(http)

    async def scenario():
        async with watch(first, watcher_tokens) as watcher:
            await presence_frames(watcher, 0.5)  # its own join
            sockets = await asyncio.gather(*[connect(ws_url(base_url, carol_tokens["access_token"]))
                                             for base_url in (first, second) for _ in range(3)])
            assert await presence_frames(watcher, 2) == [(carol, True)]
            assert {row["username"]: row["connections"] for row in online(second, watcher_tokens)}[carol] == 6
            await asyncio.gather(*[ws.close() for ws in sockets])
            assert await presence_frames(watcher, 2) == [(carol, False)]

    run(scenario())


def test_while_redis_is_away_presence_changes_only_on_first_and_last_socket_and_is_right_after():
    """While Redis is away a process tells its own watchers of joins and leaves: a user's second
    socket is no join, and closing one of two no leave. Once Redis is back, the process's counts
    there are its live ones (GET /auth/online is right) and no join or leave goes out wrongly."""
    with own_redis() as redis_server:
        env = {"BROADCAST_URL": redis_server.url, "BROADCAST_CHANNEL": "chat-test-" + secrets.token_hex(4),
               "PRESENCE_EXPIRY_SECONDS": "3"}
        with running_server(env=env) as (base_url, _), httpx.Client(base_url=base_url) as http:
            (carol, carol_tokens), (alice, alice_tokens), (bob, bob_tokens) = [register_and_login(http) for _ in range(3)]

            async def scenario():
                async with watch(base_url, carol_tokens) as watcher:
                    await wait_for_presence(watcher, (carol, True))
                    first = await connect(ws_url(base_url, alice_tokens["access_token"]))
                    await wait_for_presence(watcher, (alice, True))
                    redis_server.stop()
                    second = await connect(ws_url(base_url, alice_tokens["access_token"]))
                    third = await connect(ws_url(base_url, alice_tokens["access_token"]))
                    bob_ws = await connect(ws_url(base_url, bob_tokens["access_token"]))
                    for ws in (second, third, bob_ws):  # counted by the server (a handshake comes first)
                        await echoed(ws)
                    await first.close()
                    assert await presence_frames(watcher, 1.5) == [(bob, True)]
                    redis_server.start()
                    await asyncio.sleep(3)  # renewals every second rewrite this process's counts
                    assert await presence_frames(watcher, 1) == []
                    counts = {row["username"]: row["connections"] for row in online(base_url, carol_tokens)}
                    for ws in (second, third, bob_ws):
                        await ws.close()
                    return counts

            counts = run(scenario())
            assert {name: counts.get(name) for name in (carol, alice, bob)} == {carol: 1, alice: 2, bob: 1}
