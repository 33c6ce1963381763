"""The websocket as a real client sees it: a real uvicorn server and the `websockets` client."""

import asyncio
import base64
import collections
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import chat
from conftest import ROOT, free_port, register_and_login, running_server, server_log, ws_url


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


async def close_code(ws, seconds=10):
    """Read until the server closes the connection; returns its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), seconds)
    except ConnectionClosed:
        return ws.close_code


async def receive(ws, count, seconds=10):
    return [await asyncio.wait_for(ws.recv(), seconds) for _ in range(count)]


def history(http, tokens, **query):
    response = http.get("/auth/messages", params=query, headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert response.status_code == 200
    return response.json()


@pytest.fixture
def alice(http):
    return register_and_login(http)


@pytest.fixture
def bob(http):
    return register_and_login(http)


def test_a_valid_token_is_accepted_and_a_message_reaches_everyone(server, http, alice, bob):
    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"])) as a, connect(ws_url(server, bob[1]["access_token"])) as b:
            await a.send("Hello everyone!")
            assert await receive(a, 1) == [f"{alice[0]}: Hello everyone!"]
            assert await receive(b, 1) == [f"{alice[0]}: Hello everyone!"]

    run(scenario())


@pytest.mark.parametrize("query", [{}, {"token": "garbage"}, {"token": "a.b.c"}])
def test_a_missing_or_invalid_token_is_accepted_then_closed_with_1008(server, query):
    async def scenario():
        url = server.replace("http://", "ws://") + "/ws?" + "&".join(f"{k}={v}" for k, v in query.items())
        async with connect(url) as ws:  # the handshake succeeds: no HTTP 403
            assert await close_code(ws) == 1008

    run(scenario())


def test_a_refresh_token_is_not_a_websocket_token(server, alice):
    async def scenario():
        async with connect(ws_url(server, alice[1]["refresh_token"])) as ws:
            assert await close_code(ws) == 1008

    run(scenario())


def test_a_received_message_is_already_in_the_history(server, http, alice):
    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"], format="json")) as ws:
            for n in range(5):
                await ws.send(f"stored first {n}")
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                ids = [m["id"] for m in await asyncio.to_thread(history, http, alice[1], after=message["id"] - 1)]
                assert message["id"] in ids

    run(scenario())


def test_json_format_frames(server, http, alice):
    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"], format="json")) as ws:
            await ws.send("in json")
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert set(frame) == {"id", "username", "text", "created_at", "type"}
            assert (frame["username"], frame["text"], frame["type"]) == (alice[0], "in json", "message")
            assert frame["created_at"].endswith("Z") and len(frame["created_at"]) == len("2026-11-25T21:04:05.123Z")
            assert history(http, alice[1], after=frame["id"] - 1)[0] == frame

    run(scenario())


def test_text_is_kept_as_sent_and_1000_characters_is_allowed(server, http, alice):
    """Live and in the history: a batch is stored as one JSON parameter, so the text must survive
    quotes, backslashes, escapes and characters outside the BMP on the way into the database too."""
    texts = ["  spaced  ", "x" * 1000, "tab\tand\nnewline", "Ünïcödé 🎉", 'quote " and \\ and \\u0041 and [1, 2]', "𝄞𝄞 ﷽"]

    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"], format="json")) as ws:
            for text in texts:
                await ws.send(text)
            return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in texts]

    frames = run(scenario())
    assert [frame["text"] for frame in frames] == texts
    stored = history(http, alice[1], after=frames[0]["id"] - 1)
    assert [(m["id"], m["text"]) for m in stored] == [(frame["id"], frame["text"]) for frame in frames]


def test_empty_blank_and_nul_frames_are_ignored(server, http, alice):
    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"], format="json")) as ws:
            for text in ["", "   ", "\n\t", "nul\x00inside"]:
                await ws.send(text)
            await ws.send("after the ignored ones")
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["text"] == "after the ignored ones"
            mine = [m["text"] for m in history(http, alice[1], limit=20) if m["username"] == alice[0]]
            assert mine == ["after the ignored ones"]

    run(scenario())


@pytest.mark.parametrize("frame, code", [("y" * 1001, 1009), (b"\x00\x01binary", 1003)])
def test_oversized_and_binary_frames_are_closed(server, http, alice, frame, code):
    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"])) as ws:
            await ws.send(frame)
            assert await close_code(ws) == code

    run(scenario())
    assert all(m["username"] != alice[0] for m in history(http, alice[1]))


def test_a_frame_over_the_server_cap_is_refused_by_uvicorn(server, alice):
    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"]), max_size=None) as ws:
            await ws.send("z" * (chat.WS_MAX_FRAME_BYTES + 1))
            assert await close_code(ws) == 1009

    run(scenario())


def test_after_replays_history_then_continues_live_without_gap_or_duplicate(server, http, alice, bob):
    """Messages keep arriving while the replay runs; the client must see each id once, in order."""

    async def scenario():
        # max_queue=None: the sender never reads its echoes, which must not stall its close
        async with connect(ws_url(server, alice[1]["access_token"], format="json"), max_queue=None) as sender:
            await sender.send("marker")
            start = json.loads(await asyncio.wait_for(sender.recv(), 10))["id"]

            async def send_many():
                for n in range(150):
                    await sender.send(f"burst {n}")

            burst = asyncio.create_task(send_many())
            await asyncio.sleep(0.05)  # connect while the burst is under way
            async with connect(ws_url(server, bob[1]["access_token"], format="json", after=start)) as late:
                await burst
                seen = []
                while len(seen) < 150:
                    seen.append(json.loads(await asyncio.wait_for(late.recv(), 10)))
                texts = [m["text"] for m in seen if m["username"] == alice[0]]
                assert texts == [f"burst {n}" for n in range(150)]
                ids = [m["id"] for m in seen]
                assert ids == sorted(set(ids))
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(late.recv(), 0.5)  # and no duplicate after them

    run(scenario())


def test_after_beyond_the_newest_id_still_gets_live_messages(server, http, alice):
    """A client that counts from another database (one since reset, say) asks for after= an id
    this one has not reached: it gets the messages sent from then on, not silence until the ids
    catch up with its count."""

    async def scenario():
        newest = history(http, alice[1], limit=1)
        beyond = (newest[-1]["id"] if newest else 0) + 1000
        async with connect(ws_url(server, alice[1]["access_token"], format="json", after=beyond)) as ws:
            await ws.send("after a reset")
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert message["text"] == "after a reset" and message["id"] < beyond

    run(scenario())


@pytest.mark.parametrize("query", [{"format": "xml"}, {"after": "abc"}, {"after": "-1"}])
def test_bad_websocket_query_values_are_closed_with_1008(server, alice, query):
    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"], **query)) as ws:
            assert await close_code(ws) == 1008

    run(scenario())


def stalled_client(base_url, token):
    """A websocket that completes its handshake with a 4 KiB receive buffer, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = base_url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws?token={token} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response
    return sock


async def closed_as_too_slow(server):
    """Until the server has closed a client as too far behind (its /metrics counts it)."""
    async with httpx.AsyncClient(base_url=server) as http:
        while "chat_clients_closed_too_slow_total 1.0" not in (await http.get("/metrics")).text:
            await asyncio.sleep(0.1)


def read_close_code(sock, seconds=30):
    """Drain a raw websocket; returns the code of the close frame the server sent at the end."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:  # this client never answers the close: CLOSE_SECONDS later, a reset
        pass
    # Walk the unmasked server frames to the last one: opcode 8 is close.
    position, code = 0, None
    while position + 2 <= len(data):
        opcode, length = data[position] & 0x0F, data[position + 1] & 0x7F
        position += 2
        if length == 126:
            length, position = int.from_bytes(data[position:position + 2], "big"), position + 2
        elif length == 127:
            length, position = int.from_bytes(data[position:position + 8], "big"), position + 8
        if opcode == 8:
            code = int.from_bytes(data[position:position + 2], "big")
        position += length
    return code


@pytest.fixture
def unpinged_server():
    """A server whose keepalive pings will not end a stalled client before the outbox does."""
    with running_server(args=["--ws-ping-interval", "300"]) as (base_url, _):
        yield base_url


def test_a_stalled_client_is_closed_with_1013_while_others_receive_everything(unpinged_server):
    # Several MB must back up before the kernel's socket buffers are full and the outbox fills.
    server, count, text = unpinged_server, 6000, "s" * 900
    with httpx.Client(base_url=server) as http:
        alice, bob = register_and_login(http), register_and_login(http)
    sock = stalled_client(server, bob[1]["access_token"])

    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"])) as ws:
            async def send_all():
                for n in range(count):
                    await ws.send(f"{n} {text}")

            async def close_code_once_closed():
                # It reads as soon as the server has closed it: a client that does not take its
                # close within CLOSE_SECONDS is reset instead.
                await closed_as_too_slow(server)
                return await asyncio.to_thread(read_close_code, sock)

            sender = asyncio.create_task(send_all())
            code = asyncio.create_task(close_code_once_closed())
            received = await receive(ws, count, seconds=30)
            await sender
            assert received == [f"{alice[0]}: {n} {text}" for n in range(count)]
            assert await code == chat.CLOSE_TOO_SLOW

    run(scenario())
    sock.close()


def test_a_client_that_never_takes_its_close_has_its_connection_reset(unpinged_server):
    """A stalled client is closed with 1013, but the close waits behind megabytes it does not
    read. CLOSE_SECONDS later the server lets it go: the connection is reset, not kept open
    (with its buffers and a file descriptor) for as long as the client likes."""
    server, text = unpinged_server, "s" * 900
    with httpx.Client(base_url=server) as http:
        alice, bob = register_and_login(http), register_and_login(http)
    sock = stalled_client(server, bob[1]["access_token"])

    async def scenario():
        async with connect(ws_url(server, alice[1]["access_token"]), max_queue=None) as ws:
            for n in range(6000):
                await ws.send(f"{n} {text}")
            await closed_as_too_slow(server)
        # Without reading: the server's close would have to come after all it queued, so a
        # connection that is no longer established was reset.
        deadline = time.monotonic() + chat.CLOSE_SECONDS + 5
        while (state := sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]) == 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return state

    state = run(scenario())
    sock.close()
    assert state != 1, "the connection is still established (TCP_ESTABLISHED)"


def test_a_client_that_took_its_close_leaves_nothing_to_reset():
    """CLOSE_SECONDS after a close, the server checks whether the client took it: for one that
    did, whose connection is gone, that check does nothing, and says nothing in the log."""
    with running_server() as (base_url, process), httpx.Client(base_url=base_url) as http:
        _, tokens = register_and_login(http)

        async def scenario():
            async with connect(ws_url(base_url, tokens["access_token"])) as ws:
                await ws.send("x" * 1001)
                assert await close_code(ws) == 1009
            await asyncio.sleep(chat.CLOSE_SECONDS + 1)

        run(scenario())
        assert "Traceback" not in server_log(process), server_log(process)


def test_dead_peers_are_found_by_pings(alice):
    with running_server(args=["--ws-ping-interval", "0.5", "--ws-ping-timeout", "0.5"]) as (base_url, _):
        with httpx.Client(base_url=base_url) as http:
            _, tokens = register_and_login(http)
        sock = stalled_client(base_url, tokens["access_token"])  # never answers a ping
        time.sleep(2.5)
        assert read_close_code(sock, seconds=10) == 1011  # uvicorn's keepalive timeout
        sock.close()


def test_shutdown_closes_every_websocket_with_1001_and_keeps_what_was_stored():
    with running_server() as (base_url, process):
        with httpx.Client(base_url=base_url) as http:
            _, tokens = register_and_login(http)

        async def scenario():
            async with connect(ws_url(base_url, tokens["access_token"])) as a, connect(ws_url(base_url, tokens["access_token"])) as b:
                await a.send("before shutdown")
                await receive(a, 1)
                await receive(b, 1)
                process.send_signal(signal.SIGTERM)
                assert await close_code(a) == 1001
                assert await close_code(b) == 1001

        run(scenario())
        process.wait(timeout=15)
    with running_server() as (base_url, _):
        with httpx.Client(base_url=base_url) as http:
            assert history(http, tokens, limit=5)[-1]["text"] == "before shutdown"


def test_logins_in_flight_do_not_hold_up_the_chat():
    """Eight logins at cost 12 queue in the bcrypt threads; a websocket round trip started
    after them still completes while they are in flight."""
    with running_server(env={"BCRYPT_ROUNDS": "12"}) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=60) as http:
            name, tokens = register_and_login(http)

        async def scenario():
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
                body = {"username": name, "password": "correct-horse-1"}
                logins = [asyncio.create_task(client.post("/auth/login", json=body)) for _ in range(8)]
                await asyncio.sleep(0.1)
                async with connect(ws_url(base_url, tokens["access_token"])) as ws:
                    await ws.send("still quick")
                    assert await receive(ws, 1) == [f"{name}: still quick"]
                still_running = sum(not login.done() for login in logins)
                responses = await asyncio.gather(*logins)
                assert all(response.status_code == 200 for response in responses)
                assert still_running > 0

        run(scenario())


def test_bcrypt_concurrency_is_bounded_below_the_core_count():
    assert chat.bcrypt_threads._max_workers <= max(1, (os.cpu_count() or 2) // 2)


def test_an_unreachable_database_gives_503_and_websocket_1011():
    """Start-up itself fails (a database that cannot be opened): HTTP says 503, and a websocket
    completes its handshake and is closed with 1011, not refused with an HTTP 403."""
    from conftest import TMP, free_port, stop_process

    port = free_port()
    env = {**os.environ, "DATABASE_URL": "sqlite+aiosqlite:////nonexistent-folder/chat.db"}
    command = [sys.executable, "-m", "uvicorn", "chat:app", "--port", str(port), "--lifespan", "off",
               "--log-level", "critical"]
    with open(TMP / f"unreachable-{port}.log", "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(base_url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.1)
        assert health.status_code == 503
        assert health.json() == {"detail": "The database is not answering"}

        async def scenario():
            async with connect(ws_url(base_url, "any-token")) as ws:
                assert await close_code(ws) == 1011

        run(scenario())
    finally:
        stop_process(process)


def frame_texts(name):
    """Texts whose lines straddle the frame header's length forms (125 and 126 bytes, 64 KiB is
    out of reach at 1,000 characters), with multi-byte characters."""
    prefix = len(f"{name}: ")
    return ["a", "x" * (125 - prefix), "y" * (126 - prefix), "é" * 1000, "🎉 ok"]


async def chat_both_formats(base_url, tokens, name, texts):
    """Send `texts` on a text socket; returns (lines received on it, texts of a json socket's frames)."""
    async with connect(ws_url(base_url, tokens["access_token"])) as text_socket, \
            connect(ws_url(base_url, tokens["access_token"], format="json")) as json_socket:
        for text in texts:
            await text_socket.send(text)
        lines = await receive(text_socket, len(texts))
        frames = [json.loads(raw) for raw in await receive(json_socket, len(texts))]
        return lines, [(frame["type"], frame["username"], frame["text"]) for frame in frames]


@pytest.mark.parametrize("protocol", ["chat:ChatWebSocketProtocol", "websockets-sansio"])
def test_frames_rendered_once_read_the_same_as_uvicorns_own(protocol):
    """ChatWebSocketProtocol writes each message's frame as chat serialized it once; uvicorn's
    stock protocol ignores that and frames the text itself. A client reads the same either way."""
    with running_server(args=["--ws", protocol]) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=10) as http:
            name, tokens = register_and_login(http)
        texts = frame_texts(name)
        lines, frames = run(chat_both_formats(base_url, tokens, name, texts))
    assert lines == [f"{name}: {text}" for text in texts]
    assert frames == [("message", name, text) for text in texts]


def test_the_in_process_test_client_gets_the_text_of_frames_rendered_once():
    """Starlette's TestClient (no uvicorn at all) reads the text of the messages chat sends with
    a pre-rendered frame, as any server that does not know the extra key would."""
    from starlette.testclient import TestClient

    with TestClient(chat.app) as client:
        name, tokens = register_and_login(client)
        with client.websocket_connect(f"/ws?token={tokens['access_token']}") as ws:
            for text in frame_texts(name):
                ws.send_text(text)
                assert ws.receive_text() == f"{name}: {text}"


def writing_client(writes, as_json=False, sent_through=0):
    """A chat.Client that keeps up, whose every write is appended to `writes`."""
    client = chat.Client(object(), None, lambda frame: writes.append(frame) or True, None,
                         as_json=as_json, sent_through=sent_through)
    client.backlog = None  # keeping up: frames go out at once
    return client


def stored_messages(count):
    first = 10**15 + secrets.randbelow(10**12)  # ids no other test delivers in this process
    return [chat.chat_message(chat.message_fields(first + n, "ann", f"hi {n}", "2026-11-26T12:00:00Z"))
            for n in range(count)]


def deliver_to(clients, messages):
    """chat.deliver(messages) with `clients` the only open sockets, and no joins or leaves waiting
    (earlier in-process tests may leave some, and the first message would go out with them)."""
    saved = dict(chat.clients), list(chat.pending_presence)
    chat.clients.clear()
    chat.pending_presence.clear()
    chat.clients.update((client.websocket, client) for client in clients)
    try:
        chat.deliver(messages)
    finally:
        chat.clients.clear()
        chat.clients.update(saved[0])
        chat.pending_presence[:] = saved[1]


def test_messages_stored_together_go_to_each_socket_in_one_write():
    """A socket write is most of what a delivery costs: messages stored in one batch go to each
    socket in one write, in the socket's format; a socket whose replay sent some of them already
    gets the rest one by one."""
    writes = collections.defaultdict(list)
    messages = stored_messages(3)
    deliver_to([writing_client(writes["line"]), writing_client(writes["json"], as_json=True),
                writing_client(writes["replayed"], sent_through=messages[1]["id"])], messages)
    assert writes["line"] == [b"".join(message["send_line"]["chat.frame"] for message in messages)]
    assert writes["json"] == [b"".join(message["send_json"]["chat.frame"] for message in messages)]
    assert writes["replayed"] == [messages[2]["send_line"]["chat.frame"]]


def test_a_write_holds_at_most_bundle_limit_messages():
    """Messages stored or heard together (a catch-up can bring a thousand) go out BUNDLE_LIMIT to
    a write: one huge write would sit unsent on a socket that stopped reading."""
    writes = []
    messages = stored_messages(chat.BUNDLE_LIMIT + 1)
    deliver_to([writing_client(writes)], messages)
    frames = [message["send_line"]["chat.frame"] for message in messages]
    assert writes == [b"".join(frames[:-1]), frames[-1]]


def test_a_message_that_cannot_be_stored_closes_its_socket_and_nothing_sent_after_it_is_stored(monkeypatch):
    """A socket is read on while its messages wait to be stored; when one cannot be stored, the
    socket gets 1011 and the messages it sent after that one are not stored either, so that a
    client resending from the failed one does not put them out of order."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    real_insert = chat.insert_messages
    tried = []
    first_tried = threading.Event()

    async def first_insert_fails(messages, created_at):
        tried.append([text for _, text in messages])
        if len(tried) == 1:
            first_tried.set()
            await asyncio.sleep(0.5)  # meanwhile the socket's next messages are read and queued
            raise OSError("the database went away")
        return await real_insert(messages, created_at)

    monkeypatch.setattr(chat, "insert_messages", first_insert_fails)
    with TestClient(chat.app) as client:
        name, tokens = register_and_login(client)
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
        start = client.get("/auth/messages", params={"limit": 1}, headers=headers).json()
        after = start[-1]["id"] if start else 0
        with client.websocket_connect(f"/ws?token={tokens['access_token']}") as ws:
            ws.send_text("first")
            assert first_tried.wait(5)
            ws.send_text("second")
            ws.send_text("third")
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        assert closed.value.code == 1011
        stored = client.get("/auth/messages", params={"after": after}, headers=headers).json()
    assert [message["text"] for message in stored if message["username"] == name] == []
    assert tried == [["first"]]


SHORTCUT_PROBE = """
import sys, uvicorn, chat

async def app(scope, receive, send):
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    write_frame = scope["extensions"].get("chat.write_frame")
    written = write_frame is not None and write_frame(chat.text_frame("written by the shortcut")["chat.frame"])
    await send({"type": "websocket.send", "text": f"shortcut {'taken' if written else 'missing'}"})
    await receive()

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), ws=chat.ChatWebSocketProtocol, ws_per_message_deflate=False,
            log_level="warning")
"""


def test_chat_websocket_protocol_offers_its_shortcut_and_writes_a_whole_frame():
    """The shortcut rests on uvicorn's internals (pinned by requirements.lock): after an upgrade
    that moves them, this fails instead of chat silently taking the slow path."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SHORTCUT_PROBE, str(port)], cwd=ROOT, env=os.environ.copy())
    try:
        async def scenario():
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with connect(f"ws://127.0.0.1:{port}/", open_timeout=5) as ws:
                        return await receive(ws, 2)
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        assert run(scenario()) == ["written by the shortcut", "shortcut taken"]
    finally:
        process.terminate()
        process.wait(10)
