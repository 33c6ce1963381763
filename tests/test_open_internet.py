"""Bounds that make a real server safe to face strangers (uvicorn with --http chat:BoundedHttpProtocol,
as every documented command serves it): request heads are bounded in size and in time, half-sent
requests of every kind are dropped, and the process may hold as many files as the system allows."""

import asyncio
import base64
import os
import resource
import socket
import subprocess
import sys
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

import chat
from conftest import (
    ROOT, free_port, register_and_login, running_server, server_log, stop_process, wait_until_healthy, ws_url,
)


def raw_connection(base_url):
    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_until_closed(sock, seconds):
    """Everything the server sends until it closes the connection; fails if it has not within `seconds`."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except socket.timeout:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept the connection open for {seconds} s; it sent {received[:200]!r}")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_an_endless_request_head_gets_431_and_costs_the_server_nothing():
    with running_server() as (base_url, process):
        before = rss_kib(process.pid)
        connections = [raw_connection(base_url) for _ in range(3)]
        sent = []
        for sock in connections:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            total = 0
            try:
                while total < 20 * 1024 * 1024:  # the review sent 100 MiB; the server must stop us long before
                    sock.sendall(b"a" * 65536)
                    total += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass
            sent.append(total)
        answers = [read_until_closed(sock, 10) for sock in connections]
        for sock in connections:
            sock.close()
        assert all(total < 20 * 1024 * 1024 for total in sent), sent
        assert all(answer.startswith(b"HTTP/1.1 431") for answer in answers), answers
        assert rss_kib(process.pid) - before < 20 * 1024  # the three buffered nothing like their megabytes
        assert httpx.get(base_url + "/health").status_code == 200


def test_a_large_but_bounded_head_is_still_served():
    with running_server() as (base_url, _):
        response = httpx.get(base_url + "/health", headers={"X-Large": "a" * (chat.MAX_HEAD_BYTES // 2)})
        assert response.status_code == 200


def test_half_sent_requests_of_every_kind_are_dropped_and_new_clients_still_get_in():
    half_done = {
        "nothing at all": b"",
        "half a head": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        "half a websocket upgrade": b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        "half a body": b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"username\": ",
    }
    with running_server() as (base_url, _):
        held = [(kind, raw_connection(base_url)) for kind in half_done for _ in range(25)]
        for kind, sock in held:
            sock.sendall(half_done[kind])
        assert httpx.get(base_url + "/health").status_code == 200  # served beside the 100 held
        limit = max(chat.HEAD_TIMEOUT_SECONDS, chat.BODY_TIMEOUT_SECONDS) + 8
        answers = {kind: read_until_closed(sock, limit) for kind, sock in held}  # each within its deadline
        for _, sock in held:
            sock.close()
        assert answers["nothing at all"] == b""
        assert answers["half a head"].startswith(b"HTTP/1.1 408")
        assert answers["half a websocket upgrade"].startswith(b"HTTP/1.1 408")
        assert answers["half a body"].startswith(b"HTTP/1.1 408") and b"took too long" in answers["half a body"]
        assert httpx.get(base_url + "/health").status_code == 200


def test_bytes_no_request_reads_do_not_keep_a_connection_open():
    # Blank lines after a response, or a body the app answers without reading, used to stop
    # uvicorn's keep-alive timer without starting the head timer: held open for ever.
    with running_server() as (base_url, _):
        blank_lines = raw_connection(base_url)
        blank_lines.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert blank_lines.recv(65536).startswith(b"HTTP/1.1 200")
        unread_body = raw_connection(base_url)
        unread_body.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert unread_body.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + chat.HEAD_TIMEOUT_SECONDS + 6
        open_ones = [blank_lines, unread_body]
        while open_ones and time.monotonic() < deadline:
            for sock, drip in ((blank_lines, b"\r\n"), (unread_body, b"1\r\na\r\n")):
                if sock in open_ones:
                    try:
                        sock.sendall(drip)
                    except OSError:
                        open_ones.remove(sock)
            time.sleep(0.5)
        for sock in (blank_lines, unread_body):
            sock.close()
        assert open_ones == [], f"{len(open_ones)} connection(s) still open after {chat.HEAD_TIMEOUT_SECONDS + 6} s"


def test_a_slowly_dripped_head_that_finishes_in_time_is_served():
    with running_server() as (base_url, _):
        sock = raw_connection(base_url)
        for line in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n", b"\r\n"):
            sock.sendall(line)
            time.sleep(0.3)
        assert read_until_closed(sock, 10).startswith(b"HTTP/1.1 200")
        sock.close()


def test_the_server_raises_its_open_file_limit_to_the_hard_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024:
        pytest.fail(f"this machine's hard open-file limit is {hard}; the test needs more than 1024")
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "chat:app", "--host", "127.0.0.1", "--port", str(port),
               "--http", "chat:BoundedHttpProtocol", "--log-level", "warning"]
    lower = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # noqa: E731
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), preexec_fn=lower, stdout=log, stderr=log)
    process.log_path = tmp_path / "server.log"
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", process)
        limits = open(f"/proc/{process.pid}/limits").read()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3] == str(min(hard, 2**20)), line
    finally:
        stop_process(process)


def test_the_server_declines_permessage_deflate():
    # Browsers offer it; chat frames are short, and each compressing socket costs ~34 KiB more.
    with running_server() as (base_url, _):
        with httpx.Client(base_url=base_url) as http:
            _, tokens = register_and_login(http)

        async def handshake():
            async with connect(ws_url(base_url, tokens["access_token"]), compression="deflate") as ws:
                return ws.response.headers.get("Sec-WebSocket-Extensions")

        assert asyncio.run(handshake()) is None


def test_a_websocket_outlives_the_head_timeout():
    # The head timer belongs to HTTP: once a connection is a websocket it must not cut it.
    with running_server() as (base_url, _):
        with httpx.Client(base_url=base_url) as http:
            _, tokens = register_and_login(http)

        async def idle_then_chat():
            async with connect(ws_url(base_url, tokens["access_token"])) as ws:
                await asyncio.sleep(chat.HEAD_TIMEOUT_SECONDS + 2)
                await ws.send("still here")
                return await asyncio.wait_for(ws.recv(), 10)

        assert asyncio.run(idle_then_chat()).endswith(": still here")


def websocket_upgrade(base_url, path, receive_buffer=4096):
    """A plain socket with a small receive buffer, upgraded to a websocket at `path`."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    host, port = base_url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def client_frame(opcode, payload):
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


@pytest.mark.parametrize("with_token", [False, True])
def test_a_client_that_pings_and_never_reads_is_reset_not_buffered(with_token):
    """Every ping gets a pong, read or not: a client that sent pings and read nothing made the
    server buffer every pong, without end, and before any login (a review saw 300 MiB in 8 s).
    Past WRITE_BUFFER_LIMIT the connection is reset."""
    with running_server() as (base_url, process), httpx.Client(base_url=base_url, timeout=10) as http:
        _, tokens = register_and_login(http)
        before = rss_kib(process.pid)
        sock = websocket_upgrade(base_url, f"/ws?token={tokens['access_token']}" if with_token else "/ws")
        sock.settimeout(20)
        pings = client_frame(Opcode.PING, b"p" * 125) * 4096  # half a MiB
        sent = 0
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while sent < 200 * 2**20:  # the server must stop us long before
                sock.sendall(pings)
                sent += len(pings)
        sock.close()
        assert sent < 100 * 2**20
        assert rss_kib(process.pid) - before < 50 * 1024
        assert http.get("/health").status_code == 200


def test_a_text_frame_that_is_not_utf8_closes_with_1007_and_no_traceback():
    with running_server() as (base_url, process), httpx.Client(base_url=base_url, timeout=10) as http:
        _, tokens = register_and_login(http)
        sock = websocket_upgrade(base_url, f"/ws?token={tokens['access_token']}")
        sock.settimeout(10)
        time.sleep(0.2)  # accepted and reading
        sock.sendall(client_frame(Opcode.TEXT, b"\xff\xfehello"))
        received = read_until_closed(sock, 10)
        assert received[:4] == bytes([0x88, 2]) + (1007).to_bytes(2, "big"), received
        time.sleep(0.2)
    log = server_log(process)
    assert "Traceback" not in log and "closed a websocket with 1007: a text frame was not UTF-8" in log, log
