"""Benchmark of the chat service against a bare `websockets` broadcast server (the ceiling).

    .venv/bin/python bench.py            # full run, about eleven minutes at most
    .venv/bin/python bench.py --quick    # shortened run, about six and a half minutes at most
    .venv/bin/python bench.py --only fanout,idle

Every figure comes from real servers over real sockets on 127.0.0.1: `uvicorn chat:app` served
as deployed (the Makefile's SERVE_FLAGS: --ws-max-size 65536 --ws-per-message-deflate false
--http chat:BoundedHttpProtocol --limit-concurrency 16384) on a throw-away SQLite database (PostgreSQL + Redis for scale-out),
and `python bench.py --bare-server PORT`, a plain `websockets` server that broadcasts
"anon: <text>" to everyone (no ASGI, no auth, no database). The load generator is this one
process: asyncio (uvloop when installed, like uvicorn), a hand-rolled websocket client
protocol that only walks frame headers, and a sequence number + send timestamp inside each
message text, so nothing is JSON-parsed per delivery (format=json frames: the text is found by a
byte search). Client and servers share the machine's cores, so the table shows
the CPU each side used and flags runs where the client was the bottleneck. The "sockets" row alone
spreads its 10,000 websockets over two load-generator processes (`bench.py --load-worker`), one
per core at most, while this process sends and keeps the time.

chat.py's limits against abuse (LOGIN_LIMIT, REGISTER_LIMIT, MESSAGE_LIMIT, MAX_SOCKETS_PER_USER)
are on by default; every chat server started here turns them all off explicitly, except in the
"limits" scenario, which measures what MESSAGE_LIMIT costs when it is on but never refuses.
Prometheus metrics (GET /metrics) are on, the default, in every chat server started here (METRICS=on
explicitly, METRICS_TOKEN and PROMETHEUS_MULTIPROC_DIR dropped) except in the "metrics" scenario, which
runs the limits scenario's rounds on two servers that differ only in METRICS (on against off) and checks
that the on server's /metrics counted the messages it stored.
The "protocol" scenario serves the history and login loads with --http chat:BoundedHttpProtocol
(shipped), httptools (stock) and h11 side by side, to price the bounded request heads.
"presence" prices presence frames: the fan-out of row 1 on format=json&presence=1 with and without
a user joining and leaving every 100 ms (from a load-worker process of its own); its clients are
timed by the kernel's receive time (SO_TIMESTAMPNS), not by when this process read each frame.
"sockets" opens 10,000 websockets (2,000 with --quick) and steps the broadcast rate up until p99
passes 250 ms. "idle" also prices permessage-deflate, which browsers offer and uvicorn accepts
unless told not to (chat is served with --ws-per-message-deflate false, so it declines).

Every server, database and temp directory this script creates is removed on exit, errors
included (servers are stopped by PID and also get SIGTERM if this process dies).
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import functools
import json
import math
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PASSWORD = "bench-password-1"
BARE_WRITE_LIMIT = 256 * 1024  # the bare server drops a client with this much unsent (≈ chat's 256 frames of 900 chars)
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
CLOCK = time.perf_counter_ns  # one process stamps both the send and the receive times
TAG = secrets.token_hex(4)  # marks this run's messages (ingest rows, scale-out frames)
# chat.py's limits against abuse are on by default; the bench registers many users and sends flat
# out from a few, so every chat server runs with all of them off unless a scenario says otherwise.
LIMITS_OFF = {"LOGIN_LIMIT": "off", "REGISTER_LIMIT": "off", "MESSAGE_LIMIT": "off", "MAX_SOCKETS_PER_USER": "0"}
HIGH_MESSAGE_LIMIT = "1000000 per second"  # the limits row: counted on every message, never refuses one
# Metrics (GET /metrics) are on by default and every chat server runs with them on, explicitly, as deployed;
# only the metrics row starts one with METRICS=off, to price them.
# Every chat server runs as deployed: the flags of the Makefile's SERVE_FLAGS (README, "Serving it on the
# open internet"). Only the protocol row swaps --http, to price the shipped choice against the others.
SHIPPED_HTTP = "chat:BoundedHttpProtocol"  # httptools with a 64 KiB, 10 s bound on request heads
SERVE_FLAGS = ["--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--ws", "chat:ChatWebSocketProtocol",
               "--limit-concurrency", "16384"]  # and --http SHIPPED_HTTP
PROTOCOLS = (  # the protocol row: (label, --http value), the first one what we ship
    ("BoundedHttpProtocol", SHIPPED_HTTP),
    ("httptools (stock)", "httptools"),
    ("h11", "h11"),
)

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def new_event_loop():
    return uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()


# ---------------------------------------------------------------- the bare ceiling server


def run_bare_server(port, compression=None):
    """A plain websockets broadcast server: every text frame goes to every client as "anon: <text>".
    Without permessage-deflate unless `compression` is "deflate" (websockets' default settings,
    the same as uvicorn's: 12-bit windows, memLevel 5), which only the idle row asks for."""
    from websockets.asyncio.server import broadcast, serve

    clients = set()

    async def handler(connection):
        clients.add(connection)
        try:
            async for text in connection:
                if not isinstance(text, str) or not text.strip():
                    continue
                for other in [c for c in clients if c.transport.get_write_buffer_size() > BARE_WRITE_LIMIT]:
                    clients.discard(other)  # too far behind: drop it, like chat's bounded outbox
                    other.transport.abort()
                broadcast(clients, "anon: " + text)
        except Exception:
            pass
        finally:
            clients.discard(connection)

    async def main():
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        async with serve(handler, HOST, port, max_size=65536, compression=compression, backlog=4096):
            await stop

    loop = new_event_loop()
    loop.run_until_complete(main())


# ---------------------------------------------------------------- processes, cleanup

LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent():
    """preexec_fn: the child gets SIGTERM if the bench dies without cleaning up (e.g. SIGKILL)."""
    if LIBC is not None:
        LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """Every process the bench starts, so each can be stopped by its PID, whatever happens."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.items = []

    def start(self, name, command, env=None, cwd=HERE, pipes=False):
        """`pipes`: stdin and stdout are pipes to this process (stderr still goes to the log)."""
        log_path = self.tmp / f"{name}-{secrets.token_hex(3)}.log"
        log = open(log_path, "w")
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE if pipes else log, stderr=log if pipes else subprocess.STDOUT,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL, preexec_fn=die_with_parent, start_new_session=True,
        )
        log.close()
        process.bench_name = name
        process.log_path = log_path
        self.items.append(process)
        return process

    def stop(self, process, timeout=10):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(ValueError):
            self.items.remove(process)

    def stop_all(self):
        for process in list(self.items):
            with contextlib.suppress(Exception):
                self.stop(process, timeout=5)

    @staticmethod
    def log_tail(process, lines=15):
        with contextlib.suppress(OSError):
            return "\n".join(process.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # the process is gone
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def machine_busy_seconds():
    """CPU seconds all cores spent busy since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS  # minus idle and iowait


class CpuMeter:
    """CPU used over a window, in % of one core: by the servers (by PID), by this client process,
    and by everything else on the machine (other people's work competing for the same cores)."""

    def __init__(self, pids):
        self.pids = list(pids)

    def __enter__(self):
        self.wall = time.perf_counter()
        self.client = time.process_time()
        self.servers = [cpu_seconds(pid) for pid in self.pids]
        self.machine = machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        wall = self.seconds = max(time.perf_counter() - self.wall, 1e-6)
        self.client_pct = 100 * (time.process_time() - self.client) / wall
        self.server_pct = [100 * (cpu_seconds(pid) - before) / wall for pid, before in zip(self.pids, self.servers)]
        machine_pct = 100 * (machine_busy_seconds() - self.machine) / wall
        self.others_pct = max(0.0, machine_pct - self.client_pct - sum(self.server_pct))

    def note(self):
        servers = "+".join(f"{p:.0f}" for p in self.server_pct)
        text = f"cpu% srv {servers} cli {self.client_pct:.0f} others {self.others_pct:.0f}"
        if self.client_pct >= 90:
            text += " CLIENT-BOUND"
        if self.others_pct >= 50:
            text += " NOISY"
        return text


# ---------------------------------------------------------------- a lean websocket client


def client_frame(opcode_byte, payload):
    """A masked client frame. The mask key is zero, so masking costs the client nothing (the
    server still unmasks every byte, as it must); servers accept any key."""
    n = len(payload)
    if n < 126:
        header = bytes((opcode_byte, 0x80 | n))
    elif n < 65536:
        header = bytes((opcode_byte, 0xFE)) + n.to_bytes(2, "big")
    else:
        header = bytes((opcode_byte, 0xFF)) + n.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


# What browsers offer in their handshake (the idle row measures what accepting it costs per socket).
BROWSER_EXTENSIONS = "permessage-deflate; client_max_window_bits"


def handshake_request(port, path, extensions=None):
    """A websocket handshake; `extensions`: a Sec-WebSocket-Extensions offer (none by default)."""
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    ).encode()


def response_header(head, name):
    """A header's value in a raw HTTP response head (bytes), or None."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode("latin-1")
    return None


class WS(asyncio.Protocol):
    """A websocket client that walks server frames without decoding them: each text frame's
    payload (bytes) goes to `handler(ws, payload, now_ns)`, or is only counted."""

    def __init__(self, request=None, handler=None):
        loop = asyncio.get_running_loop()
        self.request = request
        self.handler = handler
        self.buf = bytearray()
        self.open = request is None  # no request: the handshake was done elsewhere
        self.handshake = loop.create_future()
        self.closed = loop.create_future()
        self.transport = None
        self.response_head = b""  # the handshake response, status line and headers
        self.close_code = None
        self.frames = 0
        # per-connection bookkeeping for the scenarios
        self.last = -1
        self.got = 0
        self.ooo = 0
        self.dups = 0
        self.waiter = None

    def connection_made(self, transport):
        self.transport = transport
        if self.request is not None:
            transport.write(self.request)
        elif not self.handshake.done():
            self.handshake.set_result(None)

    def connection_lost(self, exc):
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"connection lost during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code if self.close_code is not None else 1006)

    def data_received(self, data):
        self.feed(data, CLOCK())

    def feed(self, data, now):
        """What the server sent, read at `now`."""
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:12])
            self.response_head = bytes(buf[:end])
            del buf[: end + 4]
            if status != b"HTTP/1.1 101":
                self.handshake.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                self.transport.close()
                return
            self.open = True
            self.handshake.set_result(None)
        n = len(buf)
        pos = 0
        handler = self.handler
        while n - pos >= 2:
            length = buf[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 1:
                self.frames += 1
                if handler is not None:
                    handler(self, buf[start:end], now)
            elif opcode == 8:
                self.close_code = int.from_bytes(buf[start : start + 2], "big") if length >= 2 else 1005
                with contextlib.suppress(Exception):
                    self.transport.write(client_frame(0x88, bytes(buf[start : start + 2])))
                    self.transport.close()
                if not self.closed.done():
                    self.closed.set_result(self.close_code)
            elif opcode == 9:
                self.transport.write(client_frame(0x8A, bytes(buf[start:end])))
            pos = end
        if pos:
            del buf[:pos]

    def send_text(self, text):
        self.transport.write(client_frame(0x81, text.encode()))

    def close(self):
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(client_frame(0x88, (1000).to_bytes(2, "big")))
                self.transport.close()


async def ws_connect(port, path, handler=None, rcvbuf=None, timeout=15, extensions=None):
    loop = asyncio.get_running_loop()
    ws = WS(handshake_request(port, path, extensions), handler)
    if rcvbuf:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
        await loop.create_connection(lambda: ws, sock=sock)
    else:
        await asyncio.wait_for(loop.create_connection(lambda: ws, HOST, port), timeout)
    try:
        await asyncio.wait_for(ws.handshake, timeout)
    except BaseException:
        if ws.transport:
            ws.transport.abort()
        raise
    return ws


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's number, which Python does not name


class SocketWriter:
    """The transport of a websocket that ws_connect_stamped reads itself (only what WS uses)."""

    def __init__(self, sock, loop):
        self.sock, self.loop = sock, loop

    def write(self, data):
        with contextlib.suppress(OSError):
            self.sock.sendall(data)  # a client's frames here are a few bytes: they never block

    def is_closing(self):
        return self.sock.fileno() < 0

    def close(self):
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock)
            self.sock.close()

    abort = close


def kernel_time(ancillary):
    """When the kernel received what recvmsg read (SO_TIMESTAMPNS), on CLOCK; now when it did not say."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds * 1_000_000_000 + nanoseconds - time.time_ns() + CLOCK()
    return CLOCK()


async def ws_connect_stamped(port, path, handler=None, timeout=15, extensions=None):
    """ws_connect, but frames are timed by when the kernel received them, not when this process
    got round to reading them: with hundreds of sockets in one process, the last one read waits
    for the handlers of all the others, so more frames to each (presence frames, say) would
    delay the time stamps of the load generator's own reading, which is not the server's doing."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
    except BaseException:
        sock.close()
        raise
    ws = WS(handshake_request(port, path, extensions), handler)
    transport = SocketWriter(sock, loop)

    def readable():
        try:
            data, ancillary, _, _ = sock.recvmsg(262_144, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            ws.feed(data, kernel_time(ancillary))
        else:
            transport.close()
            ws.connection_lost(None)

    loop.add_reader(sock, readable)
    ws.connection_made(transport)
    try:
        await asyncio.wait_for(ws.handshake, timeout)
    except BaseException:
        transport.close()
        raise
    return ws


async def ws_connect_many(port, path, count, handler=None, concurrency=64, timeout=60, extensions=None, connect=ws_connect):
    semaphore = asyncio.Semaphore(concurrency)

    async def one():
        async with semaphore:
            return await connect(port, path, handler, extensions=extensions)

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except BaseException:
        for task in tasks:
            task.cancel()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
        raise


def close_all(connections):
    for ws in connections:
        ws.close()


class StalledClient:
    """A raw socket with a tiny receive buffer that does the handshake by hand and then never
    reads, so nothing (kernel, library) drains what the server sends it."""

    def __init__(self, sock):
        self.sock = sock
        self.dropped_at = None  # perf_counter() when its TCP connection left ESTABLISHED

    @classmethod
    async def connect(cls, port, path, rcvbuf=4096, timeout=15):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
            await loop.sock_sendall(sock, handshake_request(port, path))
            head = bytearray()
            deadline = time.monotonic() + timeout
            while not head.endswith(b"\r\n\r\n"):  # byte by byte: never read past the handshake
                if time.monotonic() > deadline or len(head) > 4096:
                    raise ConnectionError("no handshake response")
                byte = await asyncio.wait_for(loop.sock_recv(sock, 1), timeout)
                if not byte:
                    raise ConnectionError("closed during handshake")
                head += byte
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(f"handshake refused: {bytes(head[:40])!r}")
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def tcp_state(self):
        with contextlib.suppress(OSError):
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        return 7

    def poll(self):
        if self.dropped_at is None and self.tcp_state() != 1:  # 1 = TCP_ESTABLISHED
            self.dropped_at = time.perf_counter()

    async def resume(self, timeout):
        """Start reading at last: what arrives before the close says when the server gave up on it."""
        loop = asyncio.get_running_loop()
        seqs = []

        def handler(ws, payload, now):
            seqs.append(int(payload.split(b" ", 2)[1]))

        ws = WS(None, handler)
        try:
            await loop.create_connection(lambda: ws, sock=self.sock)
            code = await asyncio.wait_for(asyncio.shield(ws.closed), timeout)
        except (asyncio.TimeoutError, OSError):
            code = None
        finally:
            if ws.transport:
                ws.transport.abort()
            else:
                self.sock.close()
        return code, seqs


# ---------------------------------------------------------------- statistics and the table


def percentile(values, p):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(ns):
    return ns / 1e6


class Table:
    def __init__(self):
        self.rows = []

    def add(self, scenario, metric, chat, bare="n/a", ratio=None, target="", result="", note=""):
        self.rows.append([scenario, metric, chat, bare, ratio, target, result, note])

    def render(self):
        """One table: a heading line per scenario, then its metrics."""
        header = ["scenario / metric", "chat", "bare", "chat/bare", "target", "result", "notes"]
        body = []
        for scenario, metric, chat, bare, ratio, target, result, note in self.rows:
            body.append((scenario, ["  " + metric, fmt(chat), fmt(bare), ratio_text(ratio, chat, bare), target, result, note]))
        widths = [max(len(row[i]) for row in [header] + [r for _, r in body]) for i in range(len(header) - 1)]

        def line(row):
            cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in (1, 2, 3)]
            cells += [row[4].ljust(widths[4]), row[5].ljust(widths[5]), row[6]]
            return "  ".join(cells).rstrip()

        lines = [line(header), "-" * (sum(widths) + 2 * len(widths) + 8)]
        previous = None
        for scenario, row in body:
            if scenario != previous:
                lines.append(scenario)
                previous = scenario
            lines.append(line(row))
        return "\n".join(lines)


def fmt(value):
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio_text(ratio, chat, bare):
    if ratio == "n/a" or bare == "n/a":
        return "n/a"
    if ratio is None:
        if isinstance(chat, (int, float)) and isinstance(bare, (int, float)) and bare:
            ratio = chat / bare
        else:
            return "n/a"
    return "-" if isinstance(ratio, float) and math.isnan(ratio) else f"{ratio:.2f}x"


def verdict(ok):
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------- servers


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="chat-bench-"))
        self.procs = Processes(self.tmp)
        self.table = Table()
        self.secret = "bench-" + secrets.token_urlsafe(32)
        self.postgres_databases = []
        self.started = time.monotonic()
        # the limits row came last but one: +45 s, +90 s (four rounds of each setting); the protocol row
        # (~20 s, ~35 s): +30 s, +45 s; presence (~20 s, ~40 s): +30 s, +50 s; sockets (~30-80 s,
        # ~60-170 s): +80 s, +170 s; metrics (the limits row's rounds again): +45 s, +90 s. A full run
        # takes about 500 s.
        self.deadline = self.started + (380 if args.quick else 670)
        self.notes = []

    # -- servers

    def chat_env(self, rounds=4, database_url=None, broadcast_url=None, channel=None, limits=None, metrics="on"):
        env = {k: v for k, v in os.environ.items() if k not in (
            "BROADCAST_URL", "DATABASE_URL", "BROADCAST_CHANNEL", "METRICS_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
        if database_url is None:
            database_url = f"sqlite+aiosqlite:///{self.tmp / ('chat-' + secrets.token_hex(4) + '.db')}"
        env.update(SECRET_KEY=self.secret, BCRYPT_ROUNDS=str(rounds), DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
        env.update(LIMITS_OFF)  # explicitly, whatever this shell has set
        env.update(limits or {})
        env["METRICS"] = metrics  # explicitly, whatever this shell has set; /metrics open, one process's own
        if broadcast_url:
            env["BROADCAST_URL"] = broadcast_url
        if channel:
            env["BROADCAST_CHANNEL"] = channel
        return env

    async def start_chat(self, rounds=4, database_url=None, broadcast_url=None, channel=None, name="chat", limits=None,
                         http=SHIPPED_HTTP, metrics="on"):
        """A chat server served as deployed (SERVE_FLAGS, `--http http`, metrics on unless `metrics` is
        "off") with every limit against abuse off, but for those `limits` sets (env var: value)."""
        port = free_port()
        env = self.chat_env(rounds, database_url, broadcast_url, channel, limits, metrics)
        command = [sys.executable, "-m", "uvicorn", "chat:app", "--host", HOST, "--port", str(port),
                   *SERVE_FLAGS, "--http", http, "--log-level", "warning"]
        process = self.procs.start(name, command, env)
        process.port = port
        process.database_url = env["DATABASE_URL"]
        await self.wait_http(process, port, "/health")
        return process

    async def start_bare(self, compression=None):
        port = free_port()
        command = [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(port)]
        if compression:
            command += ["--bare-compression", compression]
        process = self.procs.start("bare", command)
        process.port = port
        await self.wait_tcp(process, port)
        return process

    async def stop(self, process):
        """Stop a server by its PID with this event loop still running: the connections the scenario
        just closed send their close frames and FINs meanwhile. (Blocking in `wait()` right after
        close_all() held them back, and the bare server then waited out its 10 s close timeout
        before the SIGKILL.)"""
        await asyncio.sleep(0.05)
        await asyncio.to_thread(self.procs.stop, process)

    async def wait_http(self, process, port, path, seconds=30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.bench_name} exited with {process.returncode}:\n{self.procs.log_tail(process)}")
            with contextlib.suppress(OSError, EOFError, asyncio.TimeoutError, ValueError, IndexError):
                status, _ = await http_request(port, "GET", path, timeout=2)
                if status == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{process.bench_name} on port {port} did not become healthy")

    async def wait_tcp(self, process, port, seconds=20):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.bench_name} exited with {process.returncode}:\n{self.procs.log_tail(process)}")
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{process.bench_name} on port {port} did not start")

    async def user_token(self, port, username=None):
        username = username or "bench" + secrets.token_hex(3)
        body = {"username": username, "password": PASSWORD}
        status, data = await http_request(port, "POST", "/auth/register", body, timeout=30)
        if status != 200:
            raise RuntimeError(f"register failed: {status} {data[:200]!r}")
        status, data = await http_request(port, "POST", "/auth/login", body, timeout=30)
        if status != 200:
            raise RuntimeError(f"login failed: {status} {data[:200]!r}")
        return username, json.loads(data)["access_token"]

    def remaining(self):
        return self.deadline - time.monotonic()


async def http_request(port, method, path, body=None, headers=(), timeout=10):
    """One HTTP/1.1 request on a fresh connection; returns (status, body bytes)."""

    async def go():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            payload = json.dumps(body).encode() if body is not None else b""
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n{extra}\r\n".encode() + payload
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            data = await reader.readexactly(length) if length is not None else await reader.read()
            return status, data
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


# ---------------------------------------------------------------- scenario 1: fan-out


def latency_handler(latencies):
    append = latencies.append

    def handler(ws, payload, now):
        parts = payload.split(b" ", 3)  # b"user:", seq, send time, [padding]
        seq = int(parts[1])
        append(now - int(parts[2]))
        count_arrival(ws, seq)

    return handler


def count_arrival(ws, seq):
    """One more frame for `ws`: in order, a duplicate, or out of order."""
    ws.got += 1
    if seq > ws.last:
        ws.last = seq
    elif seq == ws.last:
        ws.dups += 1
    else:
        ws.ooo += 1


JSON_TEXT = b'"text": "'  # chat's format=json frames come from json.dumps: ", " and ": " separators
PRESENCE_START = b'{"type": "presence"'  # and its presence frames start with their type


def json_latency_handler(latencies, presence):
    """latency_handler for format=json frames ({"id", "username", "text", "created_at", "type"}): the
    text is found without parsing the JSON. Presence frames (and anything else) are not timed but
    kept in the list `presence` as they came, for presence_counts() after the round: the load
    generator's time on each frame delays the time stamps of the sockets it reads next, so it
    spends on them as little as it can."""
    append = latencies.append
    keep = presence.append

    def handler(ws, payload, now):
        start = -1 if payload.startswith(PRESENCE_START) else payload.find(JSON_TEXT)
        if start < 0:
            keep(payload)
            return
        start += len(JSON_TEXT)
        seq, sent = payload[start : payload.find(b'"', start)].split(b" ", 2)[:2]  # the text: seq, send time
        seq = int(seq)
        append(now - int(sent))
        count_arrival(ws, seq)

    return handler


def presence_counts(frames):
    """A Counter of (username, online) for the presence frames that json_latency_handler kept."""
    counts = collections.Counter()
    for payload in frames:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            frame = json.loads(payload)
            if frame["type"] == "presence":
                counts[frame["username"], frame["online"]] += 1
    return counts


async def wait_for_deliveries(connections, expected_each, seconds, at_most=20):
    """Until every connection got `expected_each` frames, or `seconds` pass without progress
    (and never longer than `at_most` seconds)."""
    total_expected = expected_each * len(connections)
    last_total, last_change = -1, time.monotonic()
    give_up = last_change + at_most
    while time.monotonic() < give_up:
        total = sum(ws.got for ws in connections)
        if total >= total_expected:
            return
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > seconds:
            return
        await asyncio.sleep(0.05)


def loss_counts(connections, expected_each):
    lost = sum(max(0, expected_each - (ws.got - ws.dups)) for ws in connections)
    ooo = sum(ws.ooo for ws in connections)
    dups = sum(ws.dups for ws in connections)
    return lost, ooo, dups


async def fanout_run(server, path, clients, rate, duration, make_handler=latency_handler, during=None, connect=ws_connect):
    """`clients` websockets on `path`, one of them sending `rate` msg/s for `duration` s. `make_handler`
    makes the frame handler from the latency list; `during(stop)`, when given, runs while the messages
    are sent (stopped when the last one is sent) and its result is the run's "during"."""
    latencies = []
    handler = make_handler(latencies)
    t = time.perf_counter()
    connections = await ws_connect_many(server.port, path, clients, handler, connect=connect)
    connect_s = time.perf_counter() - t
    background = None
    try:
        await asyncio.sleep(0.5)
        sender = connections[0]
        count = int(rate * duration)
        with CpuMeter([server.pid]) as cpu:
            stop = asyncio.Event()
            if during is not None:
                background = asyncio.ensure_future(during(stop))
            start = time.perf_counter()
            for i in range(count):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sender.send_text(f"{i} {CLOCK()}")
            stop.set()
            await wait_for_deliveries(connections, count, 5)
            elapsed = time.perf_counter() - start
        extra = await asyncio.wait_for(background, 10) if background is not None else None
        lost, ooo, dups = loss_counts(connections, count)
        closed = sum(1 for ws in connections if ws.closed.done())
        return {
            "p50": ms(percentile(latencies, 50)), "p99": ms(percentile(latencies, 99)), "max": ms(max(latencies, default=0)),
            "rate": len(latencies) / elapsed, "lost": lost, "ooo": ooo, "dups": dups, "closed": closed,
            "connect": connect_s, "cpu": cpu, "latencies": latencies, "during": extra,
        }
    finally:
        if background is not None and not background.done():
            background.cancel()
        close_all(connections)


async def scenario_fanout(bench):
    q = bench.quick
    clients, rate, duration = (200, 20, 4) if q else (500, 20, 10)
    chat = await bench.start_chat()
    _, token = await bench.user_token(chat.port)
    c = await fanout_run(chat, f"/ws?token={token}", clients, rate, duration)
    await bench.stop(chat)
    bare = await bench.start_bare()
    b = await fanout_run(bare, "/ws", clients, rate, duration)
    await bench.stop(bare)
    name = f"1 fan-out: {clients} websocket clients, one of them sending {rate} msg/s for {duration} s"
    t = bench.table
    t.add(name, "latency p50 (ms)", c["p50"], b["p50"], note=f"chat {c['cpu'].note()}")
    t.add(name, "latency p99 (ms)", c["p99"], b["p99"], target="<= 3x bare p99",
          result=verdict(c["p99"] <= 3 * b["p99"]), note=f"bare {b['cpu'].note()}")
    t.add(name, "latency max (ms)", c["max"], b["max"])
    t.add(name, "deliveries/s", c["rate"], b["rate"], note=f"offered {clients * rate:,}/s")
    t.add(name, "lost / out-of-order", f"{c['lost']} / {c['ooo']}", f"{b['lost']} / {b['ooo']}", ratio="n/a",
          target="0 / 0", result=verdict(c["lost"] == 0 and c["ooo"] == 0),
          note=f"dups {c['dups']}, closed early {c['closed']}")
    t.add(name, f"connect {clients} clients (s)", c["connect"], b["connect"])


# ---------------------------------------------------------------- scenario 2: slow clients


async def slow_run(server, path, readers, stalled, total, rate, size, drain_s):
    latencies = []
    handler = latency_handler(latencies)
    arrivals = [0.0] * total  # when reader 0 got each message (perf_counter)

    def first_reader(ws, payload, now):
        handler(ws, payload, now)
        arrivals[ws.last] = time.perf_counter()

    reader_connections = [await ws_connect(server.port, path, first_reader)]
    reader_connections += await ws_connect_many(server.port, path, readers - 1, handler)
    sender = await ws_connect(server.port, path)  # reads, and only counts
    stalled_clients = [await StalledClient.connect(server.port, path) for _ in range(stalled)]
    result = {}
    try:
        await asyncio.sleep(0.5)
        padding = "x" * size
        with CpuMeter([server.pid]) as cpu:
            start = time.perf_counter()
            next_poll = 0.0
            for i in range(total):
                now = time.perf_counter()
                if now >= next_poll:
                    for s in stalled_clients:
                        s.poll()
                    next_poll = now + 0.02
                delay = start + i / rate - now
                if delay > 0:
                    await asyncio.sleep(delay)
                prefix = f"{i} {CLOCK()} "
                sender.send_text(prefix + padding[: size - len(prefix)])
            send_s = time.perf_counter() - start
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline and sum(ws.got for ws in reader_connections) < total * readers:
                for s in stalled_clients:
                    s.poll()
                await asyncio.sleep(0.02)
        for s in stalled_clients:
            s.poll()
        last_arrival = max(arrivals)
        lost, ooo, _ = loss_counts(reader_connections, total)
        result.update(
            p50=ms(percentile(latencies, 50)), p99=ms(percentile(latencies, 99)), max=ms(max(latencies, default=0)),
            lost=lost, ooo=ooo, cpu=cpu, send_s=send_s, closed=sum(1 for ws in reader_connections if ws.closed.done()),
            got=reader_connections[0].got, rate=reader_connections[0].got / max(1e-6, last_arrival - start),
        )
        # The stalled clients now read at last: the last message before the close frame is where
        # the server gave up on them (it stopped queueing when the next one was delivered).
        outcomes = await asyncio.gather(*(s.resume(timeout=3) for s in stalled_clients))
        drops = []
        for s, (code, seqs) in zip(stalled_clients, outcomes):
            last = max(seqs) if seqs else -1
            removed = arrivals[last + 1] - start if code is not None and last + 1 < total and arrivals[last + 1] else None
            drops.append({"tcp": None if s.dropped_at is None else s.dropped_at - start, "code": code,
                          "last": last, "removed": removed, "got": len(seqs)})
        result["drops"] = drops
        return result
    finally:
        close_all(reader_connections + [sender])
        for s in stalled_clients:
            with contextlib.suppress(OSError):
                s.sock.close()


def describe_drops(drops, total):
    """The value for the table (seconds after the start when the last stalled client was dropped) and a note."""
    if not drops:
        return "-", ""
    tcp = [d["tcp"] for d in drops if d["tcp"] is not None]
    removed = [d["removed"] for d in drops if d["removed"] is not None]
    codes = "/".join(sorted({str(d["code"]) for d in drops}))
    lasts = [d["last"] for d in drops]
    if len(tcp) == len(drops):
        return max(tcp), f"TCP reset {min(tcp):.1f}-{max(tcp):.1f}s after the start"
    note = f"TCP still open at the end for {len(drops) - len(tcp)}/{len(drops)}"
    if len(removed) == len(drops):
        value = max(removed)
        note += (f"; removed from the broadcast {min(removed):.1f}-{max(removed):.1f}s after the start "
                 f"(last message queued #{min(lasts)}-#{max(lasts)}), close {codes} once they read again")
    else:
        value = "not dropped"
        note += f"; once reading again they got messages up to #{min(lasts)}-#{max(lasts)} of {total}, close {codes}"
    return value, note


async def scenario_slow(bench):
    q = bench.quick
    readers, stalled, total, rate, size, drain = (20, 5, 1200, 400, 900, 3) if q else (20, 5, 6000, 400, 900, 5)
    chat = await bench.start_chat()
    _, token = await bench.user_token(chat.port)
    with_stalled = await slow_run(chat, f"/ws?token={token}", readers, stalled, total, rate, size, drain)
    await bench.stop(chat)
    chat = await bench.start_chat()
    _, token = await bench.user_token(chat.port)
    without = await slow_run(chat, f"/ws?token={token}", readers, 0, total, rate, size, drain)
    await bench.stop(chat)
    bare = await bench.start_bare()
    bare_with = await slow_run(bare, "/ws", readers, stalled, total, rate, size, drain)
    await bench.stop(bare)
    name = (f"2 slow clients: {readers} readers + {stalled} that never read (4 KiB SO_RCVBUF), "
            f"{total} messages of {size} chars at {rate}/s from a separate sender")
    t = bench.table
    ratio = with_stalled["p99"] / without["p99"]

    def kept_up(run):
        if run["rate"] >= 0.95 * rate:
            return ""
        return f"; only {run['rate']:.0f} msgs/s got through of {rate} offered (latency is queueing)"

    t.add(name, "readers p99, no stalled (ms)", without["p99"],
          note=f"p50 {without['p50']:.1f} ms{kept_up(without)}; {without['cpu'].note()}")
    t.add(name, "readers p99, 5 stalled (ms)", with_stalled["p99"], bare_with["p99"],
          target="<= 2x no-stalled p99", result=verdict(ratio <= 2),
          note=f"{ratio:.2f}x the no-stalled p99; p50 {with_stalled['p50']:.1f} ms{kept_up(with_stalled)}; "
               f"{with_stalled['cpu'].note()}")
    t.add(name, "readers max, 5 stalled (ms)", with_stalled["max"], bare_with["max"], note=f"bare {bare_with['cpu'].note()}")
    t.add(name, f"readers missing at +{drain}s / out-of-order", f"{with_stalled['lost']} / {with_stalled['ooo']}",
          f"{bare_with['lost']} / {bare_with['ooo']}", ratio="n/a",
          note=f"of {total * readers:,}; no-stalled run: {without['lost']} / {without['ooo']}; "
               f"readers closed early {with_stalled['closed']}")
    value, note = describe_drops(with_stalled["drops"], total)
    bare_value, bare_note = describe_drops(bare_with["drops"], total)
    t.add(name, "stalled dropped after (s)", value, bare_value, ratio="n/a", note=f"chat: {note}")
    t.add(name, "", "", "", ratio="n/a",
          note=f"bare: {bare_note} (drops at {BARE_WRITE_LIMIT // 1024} KiB unsent); the kernel alone absorbs ~3 MB "
               "per stalled socket on loopback before any server sees backpressure")


# ---------------------------------------------------------------- scenario 3: login storm


async def rtt_probe(ws, stop, samples):
    """Send a message, wait for its own echo, repeat every 10 ms: (send time, round trip ns)."""
    loop = asyncio.get_running_loop()
    seq = 0

    def handler(ws, payload, now):
        parts = payload.split(b" ", 3)
        if ws.waiter and int(parts[1]) == ws.waiter[0] and not ws.waiter[1].done():
            ws.waiter[1].set_result(now - int(parts[2]))

    ws.handler = handler
    while not stop.is_set():
        future = loop.create_future()
        ws.waiter = (seq, future)
        sent = time.perf_counter()
        ws.send_text(f"{seq} {CLOCK()}")
        try:
            samples.append((sent, await asyncio.wait_for(future, 5)))
        except asyncio.TimeoutError:
            samples.append((sent, 5e9))
        seq += 1
        await asyncio.sleep(0.01)


async def storm_run(server, path, before_s, logins, username, storm=True):
    ws = await ws_connect(server.port, path)
    samples = []
    stop = asyncio.Event()
    probe = asyncio.ensure_future(rtt_probe(ws, stop, samples))
    try:
        await asyncio.sleep(before_s)
        storm_start = time.perf_counter()
        durations = []
        statuses = []
        with CpuMeter([server.pid]) as cpu:
            if storm:
                async def login():
                    t = time.perf_counter()
                    status, _ = await http_request(server.port, "POST", "/auth/login",
                                                   {"username": username, "password": PASSWORD}, timeout=60)
                    durations.append(time.perf_counter() - t)
                    statuses.append(status)

                await asyncio.wait_for(asyncio.gather(*(login() for _ in range(logins))), 90)
            else:
                await asyncio.sleep(before_s)
        storm_end = time.perf_counter()
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(probe, 6)
        ws.close()
    before = [rtt for sent, rtt in samples if sent < storm_start]
    during = [rtt for sent, rtt in samples if storm_start <= sent < storm_end]
    return {
        "before": ms(percentile(before, 99)), "during": ms(percentile(during, 99)),
        "before_n": len(before), "during_n": len(during), "during_max": ms(max(during, default=0)),
        "storm_s": storm_end - storm_start, "login_p50": percentile(durations, 50),
        "ok": sum(1 for s in statuses if s == 200), "cpu": cpu,
    }


async def scenario_storm(bench):
    q = bench.quick
    logins, before_s = (8, 1.5) if q else (20, 3.0)
    chat = await bench.start_chat(rounds=12, name="chat-rounds12")
    username, token = await bench.user_token(chat.port)
    r = await storm_run(chat, f"/ws?token={token}", before_s, logins, username)
    await bench.stop(chat)
    bare = await bench.start_bare()
    b = await storm_run(bare, "/ws", before_s, 0, None, storm=False)
    await bench.stop(bare)
    name = (f"3 login storm: {logins} concurrent logins on a server with BCRYPT_ROUNDS=12, while one client "
            "measures its websocket round trip (send, receive its own echo)")
    t = bench.table
    ratio = r["during"] / r["before"]
    t.add(name, "ws round trip p99 before (ms)", r["before"], b["before"], note=f"{r['before_n']} round trips; bare: no storm")
    t.add(name, "ws round trip p99 during (ms)", r["during"], ratio="n/a", target="<= 5x before",
          result=verdict(ratio <= 5),
          note=f"{ratio:.2f}x before; max {r['during_max']:.1f} ms; {r['during_n']} round trips; {r['cpu'].note()}")
    t.add(name, "storm duration (s)", r["storm_s"], ratio="n/a",
          note=f"{r['ok']}/{logins} logins 200, median login {r['login_p50']:.2f} s")


# ---------------------------------------------------------------- scenario 4: history


def get_request(port, path, token):
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def post_request(port, path, body):
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def http_load(port, path, token, seconds, concurrency=8, requests=None):
    """Keep-alive connections, each sending its request again as soon as the answer is in: a GET of
    `path` with `token` on `concurrency` connections, or one connection per raw request in `requests`."""
    requests = requests or [get_request(port, path, token)] * concurrency
    counts = {"ok": 0, "bad": 0, "bytes": 0}
    latencies = []

    async def worker(deadline, request):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < deadline:
                t = CLOCK()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                lower = head.lower()
                index = lower.find(b"content-length:")
                if index >= 0:
                    length = int(head[index + 15 : head.find(b"\r\n", index)])
                body = await reader.readexactly(length)
                latencies.append(CLOCK() - t)
                if head[9:12] == b"200":
                    counts["ok"] += 1
                    counts["bytes"] += len(body)
                else:
                    counts["bad"] += 1
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(worker(time.perf_counter() + 0.3, r) for r in requests)), 30)
    counts.update(ok=0, bad=0, bytes=0)
    latencies.clear()
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(start + seconds, r) for r in requests)), seconds + 30)
    elapsed = time.perf_counter() - start
    return {"rps": counts["ok"] / elapsed, "bad": counts["bad"], "p99": ms(percentile(latencies, 99)),
            "size": counts["bytes"] / max(1, counts["ok"]), "latencies": latencies}


def insert_messages(db_path, username, count, start=0):
    connection = sqlite3.connect(db_path, timeout=30)
    try:
        with connection:
            connection.executemany(
                "INSERT INTO messages (username, text) VALUES (?, ?)",
                ((username, f"history message number {i} with a little text") for i in range(start, start + count)),
            )
        return connection.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        connection.close()


async def scenario_history(bench):
    seconds = 1.5 if bench.quick else 3.0
    big = 100_000
    chat = await bench.start_chat()
    db_path = chat.database_url.split("///", 1)[1]
    username, token = await bench.user_token(chat.port)
    stored = await asyncio.to_thread(insert_messages, db_path, username, 100)
    path = "/auth/messages"
    with CpuMeter([chat.pid]) as cpu_small:
        small = await http_load(chat.port, path, token, seconds)
    t = time.perf_counter()
    stored_big = await asyncio.to_thread(insert_messages, db_path, username, big - stored, stored)
    insert_s = time.perf_counter() - t
    with CpuMeter([chat.pid]) as cpu_big:
        large = await http_load(chat.port, path, token, seconds)
    middle = await http_load(chat.port, f"{path}?before={big // 2}", token, seconds / 2)
    await bench.stop(chat)
    name = "4 history: GET /auth/messages (latest 100), 8 keep-alive connections"
    tb = bench.table
    tb.add(name, f"requests/s, {stored} stored", small["rps"],
           note=f"p99 {small['p99']:.1f} ms, {small['size']:.0f} B/response; {cpu_small.note()}")
    ratio = small["rps"] / large["rps"] if large["rps"] else float("inf")
    tb.add(name, f"requests/s, {stored_big:,} stored", large["rps"], target="<= 1.5x slower than 100",
           result=verdict(ratio <= 1.5),
           note=f"{ratio:.2f}x slower; p99 {large['p99']:.1f} ms; {cpu_big.note()}; 100k rows inserted in {insert_s:.1f}s")
    tb.add(name, f"requests/s, ?before={big // 2}", middle["rps"],
           note=f"p99 {middle['p99']:.1f} ms; non-200: {small['bad'] + large['bad'] + middle['bad']}")


# ---------------------------------------------------------------- scenario 5: ingest


async def until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def pump(senders, listener, seconds, window, text):
    """Senders send as fast as the server takes it, at most `window` messages ahead of the listener."""
    wake = asyncio.Event()
    listener.handler = lambda ws, payload, now: wake.set()
    sent = 0
    end = time.perf_counter() + seconds
    stalls = 0
    while time.perf_counter() < end:
        room = window - (sent - listener.frames)
        if room <= 0:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), 2)
            except asyncio.TimeoutError:
                stalls += 1
                if stalls > 3 or listener.closed.done():
                    break
            continue
        for _ in range(room):
            senders[sent % len(senders)].send_text(text)
            sent += 1
        await asyncio.sleep(0)
    return sent


async def ingest_run(server, path, senders_n, seconds, window=100, db_path=None):
    listener = await ws_connect(server.port, path)
    senders = await ws_connect_many(server.port, path, senders_n)
    everyone = [listener] + senders
    try:
        base = listener.frames
        warm = await pump(senders, listener, 0.5, window, "warm up")
        await until(lambda: listener.frames - base >= warm, 5)  # the measured window starts empty
        frames_before = sum(ws.frames for ws in everyone)
        heard_before = listener.frames
        with CpuMeter([server.pid]) as cpu:
            start = time.perf_counter()
            sent = await pump(senders, listener, seconds, window, f"ingest {TAG}")
            elapsed = time.perf_counter() - start
            heard = listener.frames - heard_before
            delivered = sum(ws.frames for ws in everyone) - frames_before
        await until(lambda: listener.frames - heard_before >= sent, 5)  # the last ones in flight
        stored = None
        if db_path:
            stored = await asyncio.to_thread(count_rows, db_path, f"ingest {TAG}")
        return {"stored_rate": heard / elapsed, "delivered_rate": delivered / elapsed, "sent": sent, "stored": stored,
                "closed": sum(1 for ws in everyone if ws.closed.done()), "cpu": cpu}
    finally:
        close_all(everyone)


def count_rows(db_path, text):
    connection = sqlite3.connect(db_path, timeout=30)
    try:
        return connection.execute("SELECT count(*) FROM messages WHERE text = ?", (text,)).fetchone()[0]
    finally:
        connection.close()


async def scenario_ingest(bench):
    seconds = 2.5 if bench.quick else 5.0
    senders = 20
    chat = await bench.start_chat()
    db_path = chat.database_url.split("///", 1)[1]
    _, token = await bench.user_token(chat.port)
    c = await ingest_run(chat, f"/ws?token={token}", senders, seconds, db_path=db_path)
    await bench.stop(chat)
    bare = await bench.start_bare()
    b = await ingest_run(bare, "/ws", senders, seconds)
    await bench.stop(bare)
    name = f"5 ingest: {senders} senders as fast as the server takes them (<= 100 messages in flight) + 1 listener, {seconds:g} s"
    t = bench.table
    t.add(name, "messages stored/s", c["stored_rate"], b["stored_rate"],
          note=f"chat {c['cpu'].note()}; bare relays without storing")
    t.add(name, "deliveries/s (21 connections)", c["delivered_rate"], b["delivered_rate"],
          note=f"bare {b['cpu'].note()}; stored in the DB {c['stored']} of {c['sent']} sent; closed early {c['closed']}")


# ---------------------------------------------------------------- scenario 6: idle memory


async def idle_run(server, path, count, extensions=None):
    """Server RSS before and after `count` idle websockets; with `extensions`, every client offers
    them, and "accepted" is what the server answered (its Sec-WebSocket-Extensions, or None)."""
    warm = await ws_connect_many(server.port, path, 10, extensions=extensions)
    close_all(warm)
    await asyncio.sleep(1.0)
    before = rss_kib(server.pid)
    t = time.perf_counter()
    connections = await ws_connect_many(server.port, path, count, concurrency=100, timeout=90, extensions=extensions)
    connect_s = time.perf_counter() - t
    try:
        await asyncio.sleep(1.5)
        after = rss_kib(server.pid)
        alive = sum(1 for ws in connections if not ws.closed.done())
        answers = {response_header(ws.response_head, "Sec-WebSocket-Extensions") for ws in connections}
        return {"per": (after - before) / count, "before": before, "after": after, "alive": alive, "connect": connect_s,
                "accepted": " | ".join(sorted(str(a) for a in answers))}
    finally:
        close_all(connections)


async def scenario_idle(bench):
    """RSS per idle websocket, first with clients that offer no extension, then with clients that
    offer permessage-deflate as browsers do: chat (uvicorn accepts it unless --ws-per-message-deflate
    is false), the bare server as everywhere else (compression off: it declines), and the bare server
    with websockets' deflate on (the like-for-like ceiling)."""
    count = 500 if bench.quick else 2000

    async def chat_run(extensions=None):
        chat = await bench.start_chat()  # a fresh server each time: memory freed by a previous run is not reused
        _, token = await bench.user_token(chat.port)
        result = await idle_run(chat, f"/ws?token={token}", count, extensions)
        await bench.stop(chat)
        return result

    async def bare_run(extensions=None, compression=None):
        bare = await bench.start_bare(compression)
        result = await idle_run(bare, "/ws", count, extensions)
        await bench.stop(bare)
        return result

    c = await chat_run()
    b = await bare_run()
    cd = await chat_run(BROWSER_EXTENSIONS)
    bd = await bare_run(BROWSER_EXTENSIONS)
    bdd = await bare_run(BROWSER_EXTENSIONS, "deflate")
    name = f"6 idle: server RSS (VmRSS) before and after opening {count:,} websockets"
    t = bench.table
    ratio = c["per"] / b["per"] if b["per"] > 0 else float("inf")
    t.add(name, "RSS per connection (KiB)", c["per"], b["per"], target="<= 2x bare", result=verdict(ratio <= 2),
          note=f"chat RSS {c['before'] // 1024}->{c['after'] // 1024} MiB, bare {b['before'] // 1024}->{b['after'] // 1024} MiB; "
               f"open at the end {c['alive']}/{count}; RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; "
               "clients offer no extension")
    t.add(name, f"connect {count} (s)", c["connect"], b["connect"])

    def accepted(run):
        return "declined (no Sec-WebSocket-Extensions)" if run["accepted"] == "None" else f"accepted: {run['accepted']}"

    t.add(name, "RSS per connection, deflate offered (KiB)", cd["per"], bd["per"], target="informational",
          note=f"clients offer {BROWSER_EXTENSIONS!r} as browsers do; chat {accepted(cd)}, "
               f"{cd['per'] / c['per']:.2f}x chat without the offer; bare (compression off) {accepted(bd)}; "
               f"open at the end {cd['alive']}/{count}")
    t.add(name, "RSS per connection, deflate on both (KiB)", cd["per"], bdd["per"], target="informational",
          note=f"bare with websockets' compression='deflate' {accepted(bdd)}, {bdd['per'] / b['per']:.2f}x bare "
               f"without it; connect {count}: chat {cd['connect']:.2f} s, bare {bdd['connect']:.2f} s")


# ---------------------------------------------------------------- scenario 7: scale-out


async def postgres_admin(sql, url=POSTGRES_ADMIN_URL):
    import asyncpg

    connection = await asyncpg.connect(url, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def redis_answers(url):
    import redis.asyncio

    client = redis.asyncio.from_url(url, socket_connect_timeout=2)
    try:
        return await asyncio.wait_for(client.ping(), 3)
    except Exception:
        return False
    finally:
        await client.aclose()


async def start_redis(bench):
    """The Redis to use and a channel of our own. chat.py publishes on BROADCAST_CHANNEL
    (default "chat:messages"); pub/sub channels are global across Redis DB numbers, so a unique
    channel is what keeps our traffic apart from anyone else's on a shared Redis. A chat.py
    without that variable gets a private redis-server instead (when one is installed)."""
    shared = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
    supports_channel = "BROADCAST_CHANNEL" in (HERE / "chat.py").read_text()
    if supports_channel and await redis_answers(shared):
        return None, shared, f"shared {shared}, channel of its own"
    if not shutil.which("redis-server"):
        return None, shared, f"{shared} (shared channel!)"
    port = free_port()
    process = bench.procs.start("redis", ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                                          "--appendonly", "no", "--protected-mode", "no"], cwd=bench.tmp)
    await bench.wait_tcp(process, port)
    return process, f"redis://{HOST}:{port}/0", "private redis-server"


# Messages in flight (sent, not yet heard back) in the scale-out row. With 64, two processes were
# bound by the window, not by the servers (1.06x one process at 55% CPU each, against 1.41-1.53x
# with 256); one process, bound by its CPU, measures the same with either.
SCALEOUT_WINDOW = 256


# Row 7's listeners. The load generator read each of its 110 sockets as soon as a frame arrived
# and parsed every frame in Python: 63% of a core at 150,000 frames/s, on a 2-core machine where
# the servers under test needed the rest, and now that a process sends millions of frames a
# second, the limit of the row. So only the probe, which paces the senders, is read at once;
# the others are read every POLL_SECONDS (SO_RCVLOWAT cut the wake-ups too, but then the kernel
# ACKs each segment at once, in the sending server's time: the server got 17% slower). One
# listener per process parses every frame as before and checks that each is this run's; the
# rest count their frames by the first byte, at C speed (count_frames). At the end every socket
# must have counted the same frames. What waits unread when a count is taken is about the same
# at the start and the end of the measured window, so it cancels out.
POLL_SECONDS = 0.02


def count_frames(ws, data):
    """Count a listener's frames without parsing them: a text frame starts with 0x81 and a close
    with 0x88, and neither byte occurs anywhere else in the frames row 7 sends (ASCII lines under
    126 bytes, so a one-byte length; no ping comes within uvicorn's 20 s ping interval)."""
    ws.frames += data.count(0x81)
    if 0x88 in data and not ws.closed.done():
        ws.closed.set_result(None)


def read_in_batches(parsed, counted, stop):
    """Hand the reading of `parsed` (each frame parsed) and `counted` (frames counted, see
    count_frames) to a task that reads them all every POLL_SECONDS, until `stop`."""
    socks = []
    for ws in parsed + counted:
        ws.transport.pause_reading()
        sock = socket.socket(fileno=os.dup(ws.transport.get_extra_info("socket").fileno()))
        sock.setblocking(False)
        socks.append((ws, sock, ws.data_received if ws in parsed else functools.partial(count_frames, ws)))

    async def poll():
        try:
            while not stop.is_set():
                for ws, sock, take in socks:
                    while True:
                        try:
                            data = sock.recv(262144)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            data = b""
                        if not data:
                            break
                        take(data)
                await asyncio.sleep(POLL_SECONDS)
        finally:
            for ws, sock, _ in socks:
                sock.close()
                if not ws.transport.is_closing():
                    ws.transport.resume_reading()

    return asyncio.ensure_future(poll())


async def scaleout_run(processes, path_for, listeners, senders_n, seconds, window=SCALEOUT_WINDOW):
    tag = TAG
    foreign = {"n": 0}

    def count_foreign(ws, payload, now):
        if tag.encode() not in payload:
            foreign["n"] += 1

    connections = []
    stop_polling = asyncio.Event()
    polling = None
    try:
        # Listeners and senders spread round-robin across the processes.
        listen = []
        for i in range(listeners):
            server = processes[i % len(processes)]
            listen.append(ws_connect(server.port, path_for(server), count_foreign))
        connections += await asyncio.wait_for(asyncio.gather(*listen), 60)
        senders = []
        for i in range(senders_n):
            server = processes[i % len(processes)]
            senders.append(await ws_connect(server.port, path_for(server)))
        connections += senders
        probe = connections[0]  # the pump's flow control listens here
        probe.handler = None
        parsed = connections[1 : 1 + len(processes)]  # one on each process
        polling = read_in_batches(parsed, connections[1 + len(processes):], stop_polling)
        base = probe.frames
        warm = await pump(senders, probe, 0.5, window, f"warm {tag}")
        await until(lambda: probe.frames - base >= warm, 5)  # the measured window starts empty
        frames_before = sum(ws.frames for ws in connections)
        heard_before = probe.frames
        with CpuMeter([p.pid for p in processes]) as cpu:
            start = time.perf_counter()
            sent = await pump(senders, probe, seconds, window, f"scale {tag}")
            elapsed = time.perf_counter() - start
            delivered = sum(ws.frames for ws in connections) - frames_before
            heard = probe.frames - heard_before
        await until(lambda: probe.frames - heard_before >= sent, 10)  # then every socket has had every frame
        await asyncio.sleep(5 * POLL_SECONDS)
        counts = [ws.frames for ws in connections]
        return {"delivered": delivered / elapsed, "stored": heard / elapsed, "sent": sent, "foreign": foreign["n"],
                "closed": sum(1 for ws in connections if ws.closed.done()), "cpu": cpu,
                "counts": (min(counts), max(counts))}
    finally:
        stop_polling.set()
        if polling:
            await polling
        close_all(connections)


async def scenario_scaleout(bench):
    seconds = 2.5 if bench.quick else 6.0
    listeners, senders = (60, 6) if bench.quick else (100, 10)
    try:
        database = "chat_bench_" + secrets.token_hex(5)
        await postgres_admin(f"CREATE DATABASE {database}")
    except Exception as error:
        bench.table.add("7 scale-out", "skipped", f"PostgreSQL unavailable: {error}")
        return
    bench.postgres_databases.append(database)
    redis_process, redis_url, redis_note = await start_redis(bench)
    channel = f"chat-bench-{TAG}"
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    database_url = f"{base}/{database}"
    a = await bench.start_chat(database_url=database_url, broadcast_url=redis_url, channel=channel, name="chat-pg-a")
    _, token = await bench.user_token(a.port)
    path_for = lambda server: f"/ws?token={token}"  # noqa: E731 - the same SECRET_KEY everywhere
    one = await scaleout_run([a], path_for, listeners, senders, seconds)
    b = await bench.start_chat(database_url=database_url, broadcast_url=redis_url, channel=channel, name="chat-pg-b")
    two = await scaleout_run([a, b], path_for, listeners, senders, seconds)
    await bench.stop(b)
    await bench.stop(a)
    if redis_process:
        await bench.stop(redis_process)
    name = (f"7 scale-out on PostgreSQL + Redis: {listeners} listeners + {senders} senders flat out "
            f"(at most {SCALEOUT_WINDOW} messages in flight) for {seconds:g} s, "
            "spread over one process, then two")
    t = bench.table
    t.add(name, "deliveries/s, 1 process", one["delivered"], note=f"{one['stored']:.0f} msgs/s stored; {one['cpu'].note()}")
    t.add(name, "deliveries/s, 2 processes", two["delivered"],
          note=f"{two['delivered'] / one['delivered']:.2f}x one process; {two['stored']:.0f} msgs/s stored; {two['cpu'].note()}")
    agree = all(run["counts"][0] == run["counts"][1] for run in (one, two))
    t.add(name, "foreign frames / closed early", f"{one['foreign'] + two['foreign']} / {one['closed'] + two['closed']}",
          note=f"Redis: {redis_note}; 'others' CPU includes PostgreSQL and Redis; frames each socket got at the end: "
               + ("the same on all" if agree else f"DIFFER: {one['counts']}, {two['counts']}"))


# ---------------------------------------------------------------- scenario 8: the cost of the limits


def mean_cpu_note(runs):
    """CpuMeter.note() over several rounds (each a dict with a one-server "cpu" meter): the mean of
    each figure, flagged as a single meter flags it."""
    meter = CpuMeter([])
    meter.server_pct = [sum(r["cpu"].server_pct[0] for r in runs) / len(runs)]
    meter.client_pct = sum(r["cpu"].client_pct for r in runs) / len(runs)
    meter.others_pct = sum(r["cpu"].others_pct for r in runs) / len(runs)
    return meter.note()


async def on_off_rounds(bench, settings, at_end=None):
    """Scenarios 1 and 5 again, on two servers started with `settings["off"]` and `settings["on"]` (start_chat
    keyword arguments that differ in one setting only). The rounds alternate off, on, on, off, on, off, off,
    on (a drift in the machine's load weighs on both alike) and what each setting measured is pooled: with
    two rounds each, ingest at 35,000 messages/s moved by 10 to 15% between rounds of the same setting. `at_end(servers)`,
    when given, runs after the last round, before the servers stop; its result is the return's "at_end"."""
    q = bench.quick
    clients, rate, duration = (500, 20, 2) if q else (500, 20, 5)
    senders, seconds = 20, (1.5 if q else 3.0)
    servers, paths = {}, {}
    for key in ("off", "on"):
        servers[key] = await bench.start_chat(**settings[key])
        _, token = await bench.user_token(servers[key].port)
        paths[key] = f"/ws?token={token}"
    order = ("off", "on", "on", "off", "on", "off", "off", "on")
    fan = {"off": [], "on": []}
    ing = {"off": [], "on": []}
    for key in order:
        fan[key].append(await fanout_run(servers[key], paths[key], clients, rate, duration))
        await asyncio.sleep(0.5)  # the other server is done closing the last round's sockets
    for key in order:
        ing[key].append(await ingest_run(servers[key], paths[key], senders, seconds))
        await asyncio.sleep(0.5)
    extra = await at_end(servers) if at_end is not None else None
    stored = {}
    for key, server in servers.items():
        db_path = server.database_url.split("///", 1)[1]
        stored[key] = await asyncio.to_thread(count_rows, db_path, f"ingest {TAG}")
        await bench.stop(server)

    def pooled(key):
        latencies = [x for r in fan[key] for x in r["latencies"]]
        return {
            "p50": ms(percentile(latencies, 50)), "p99": ms(percentile(latencies, 99)),
            "rounds": "/".join(f"{r['p99']:.1f}" for r in fan[key]),
            "cpu": mean_cpu_note(fan[key]),
            "lost": sum(r["lost"] + r["ooo"] for r in fan[key]),
            "closed": sum(r["closed"] for r in fan[key]) + sum(r["closed"] for r in ing[key]),
            "stored_rate": sum(r["stored_rate"] for r in ing[key]) / len(ing[key]),
            "stored_rounds": "/".join(f"{r['stored_rate']:,.0f}" for r in ing[key]),
            "ingest_cpu": mean_cpu_note(ing[key]), "sent": sum(r["sent"] for r in ing[key]),
        }

    return {"clients": clients, "rate": rate, "duration": duration, "seconds": seconds,
            "off": pooled("off"), "on": pooled("on"), "stored": stored, "at_end": extra}


def on_off_name(number, what, runs):
    return (f"{number} {what}; fan-out as in 1 with {runs['clients']} clients, {runs['rate']} msg/s for "
            f"{runs['duration']} s, and ingest as in 5 for {runs['seconds']:g} s; 4 rounds each, off/on/on/off/on/off/off/on")


def add_on_off_rows(table, name, what, runs, most, note=""):
    """The rows of on_off_rounds: pooled fan-out p99 and ingest rate with `what` off and on; PASS when on
    is at most `most` times worse than off on both."""
    off, on, stored = runs["off"], runs["on"], runs["stored"]
    p99_ratio = on["p99"] / off["p99"]
    ingest_ratio = off["stored_rate"] / on["stored_rate"] if on["stored_rate"] else float("inf")
    table.add(name, f"fan-out p99, {what} off (ms)", off["p99"],
              note=f"rounds {off['rounds']} ms; p50 {off['p50']:.1f} ms; {off['cpu']}")
    table.add(name, f"fan-out p99, {what} on (ms)", on["p99"], target=f"on/off <= {most:g}x",
              result=verdict(p99_ratio <= most),
              note=f"{p99_ratio:.2f}x off; rounds {on['rounds']} ms; p50 {on['p50']:.1f} ms; {on['cpu']}")
    table.add(name, f"ingest stored/s, {what} off", off["stored_rate"],
              note=f"rounds {off['stored_rounds']}; {off['ingest_cpu']}")
    table.add(name, f"ingest stored/s, {what} on", on["stored_rate"], target=f"off/on <= {most:g}x",
              result=verdict(ingest_ratio <= most),
              note=f"{ingest_ratio:.2f}x slower than off; rounds {on['stored_rounds']}; {on['ingest_cpu']}")
    table.add(name, f"closed early / lost+ooo, {what} on", f"{on['closed']} / {on['lost']}", ratio="n/a",
              target="0 / 0", result=verdict(on["closed"] == 0 and on["lost"] == 0),
              note=f"{what} off: {off['closed']} / {off['lost']}; ingest stored in the DB: on {stored['on']} of "
                   f"{on['sent']}, off {stored['off']} of {off['sent']}{note}")


async def scenario_limits(bench):
    """The cost of MESSAGE_LIMIT: on_off_rounds on two servers that differ only in it, off, and on but too
    high to refuse anything, so every message still pays for its count."""
    runs = await on_off_rounds(bench, {
        "off": {"name": "chat-message-limit-off"},
        "on": {"name": "chat-message-limit-on", "limits": {"MESSAGE_LIMIT": HIGH_MESSAGE_LIMIT}},
    })
    name = on_off_name(8, f"limits cost: MESSAGE_LIMIT={HIGH_MESSAGE_LIMIT!r} (on, never refuses) against off", runs)
    add_on_off_rows(bench.table, name, "limit", runs, 1.1, note="; other limits off on both servers")


# ---------------------------------------------------------------- scenario 9: the cost of the HTTP protocol


async def scenario_protocol(bench):
    """What `--http chat:BoundedHttpProtocol` costs against uvicorn's stock httptools protocol (no bound
    on request heads) and its h11 one (16 KiB head cap, no head timeout): scenario 4's history load and
    a login load on three servers that differ only in --http. BCRYPT_ROUNDS is 4 on all three, so a
    login is not all bcrypt and the protocol's share can show. The rounds run A B C C B A (a drift in
    the machine's load weighs on all alike) and each setting's two rounds are pooled."""
    q = bench.quick
    seconds = 1.0 if q else 2.0
    history_connections, login_connections = 8, 4
    servers, history, logins = {}, {}, {}
    for label, http in PROTOCOLS:
        server = await bench.start_chat(rounds=4, name=f"chat-http-{http.split(':')[-1]}", http=http)
        servers[label] = server
        username, token = await bench.user_token(server.port)
        db_path = server.database_url.split("///", 1)[1]
        await asyncio.to_thread(insert_messages, db_path, username, 100)
        history[label] = get_request(server.port, "/auth/messages", token)
        # One user per connection: chat serialises logins per (name, address), which would otherwise
        # turn the concurrent connections into a queue.
        requests = []
        for _ in range(login_connections):
            body = {"username": "bench" + secrets.token_hex(4), "password": PASSWORD}
            status, data = await http_request(server.port, "POST", "/auth/register", body, timeout=30)
            if status != 200:
                raise RuntimeError(f"register failed: {status} {data[:200]!r}")
            requests.append(post_request(server.port, "/auth/login", body))
        logins[label] = requests
    labels = [label for label, _ in PROTOCOLS]
    order = labels + labels[::-1]
    runs = {"history": {label: [] for label in labels}, "login": {label: [] for label in labels}}
    for kind, requests in (("history", lambda label: [history[label]] * history_connections),
                           ("login", lambda label: logins[label])):
        for label in order:
            server = servers[label]
            with CpuMeter([server.pid]) as cpu:
                result = await http_load(server.port, None, None, seconds, requests=requests(label))
            result["cpu"] = cpu
            runs[kind][label].append(result)
            await asyncio.sleep(0.2)
    for server in servers.values():
        await bench.stop(server)

    def pooled(kind, label):
        rounds = runs[kind][label]
        return {
            "rps": sum(r["rps"] for r in rounds) / len(rounds),
            "p99": ms(percentile([x for r in rounds for x in r["latencies"]], 99)),
            "rounds": "/".join(f"{r['rps']:,.0f}" for r in rounds),
            "bad": sum(r["bad"] for r in rounds), "cpu": mean_cpu_note(rounds),
        }

    stock = PROTOCOLS[1][0]
    name = (f"9 protocol cost: --http {SHIPPED_HTTP} (shipped) against stock httptools (unbounded heads) and h11 "
            f"(16 KiB head cap, no head timeout); history as in 4 ({history_connections} keep-alive connections), "
            f"login with the right password ({login_connections} keep-alive connections, a user each, BCRYPT_ROUNDS=4 "
            f"so bcrypt does not hide the protocol); {seconds:g} s rounds, 2 each, A/B/C/C/B/A")
    t = bench.table
    for kind, metric in (("history", "history requests/s"), ("login", "logins/s")):
        figures = {label: pooled(kind, label) for label in labels}
        base = figures[stock]
        for label in labels:
            f = figures[label]
            if label == stock:
                versus = f"p99 {f['p99']:.1f} ms"
            else:
                versus = (f"{f['rps'] / base['rps']:.2f}x stock httptools; "
                          f"p99 {f['p99']:.1f} ms ({f['p99'] / base['p99']:.2f}x stock)")
            bad = f"; NON-200: {f['bad']}" if f["bad"] else ""
            t.add(name, f"{metric}, {label}", f["rps"], target="informational",
                  note=f"{versus}; rounds {f['rounds']}; {f['cpu']}{bad}")


# ---------------------------------------------------------------- scenario 10: presence churn


async def presence_churn(port, path, period, stop):
    """Until `stop` is set: every `period` s a websocket of a user of its own opens (that user's join)
    and closes half a period later (their leave). Slots it fell behind on are skipped, not caught up.
    Each open comes at a random moment in the first half of its slot: on the exact beat, with the
    fan-out sending every 50 ms from the same start, every join and leave fell on a message, each
    time, which no real client's timing does."""
    cycles = failed = skipped = 0
    start = time.perf_counter()
    slot = 0
    ws = None
    try:
        while not stop.is_set():
            at = start + slot * period + random.uniform(0, period / 2)
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop.is_set():
                break
            slot += 1
            try:
                ws = await ws_connect(port, path, timeout=5)
            except (OSError, asyncio.TimeoutError):
                failed += 1
                continue
            await asyncio.sleep(max(0.0, at + period / 2 - time.perf_counter()))
            ws.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(ws.closed), 2)
            ws = None
            cycles += 1
            due = int((time.perf_counter() - start) / period)
            if due > slot:
                skipped += due - slot
                slot = due
    finally:
        if ws is not None:
            ws.close()
    await asyncio.sleep(0.5)  # the last leave may wait up to chat's PRESENCE_DELAY (0.1 s) for a message
    return {"cycles": cycles, "failed": failed, "skipped": skipped}


async def scenario_presence(bench):
    """Scenario 1's fan-out on one server, its clients all on format=json&presence=1 (so every join and
    leave is a frame to each of them), without and with one more user whose only socket opens and
    closes every 100 ms, from a process of its own: in the process of the 500 clients, its opens and
    closes would hold up their reading, which is not the server's cost. The rounds alternate off,
    on, on, off, on, off, off, on, so that a drift in the machine's speed weighs on both alike (a
    round's p99 varies by 10-20% on this VM). Then the same
    with clients on format=json alone: what presence itself costs (a join and a leave tracked, a
    socket opened and closed) apart from the frames that subscribers asked for."""
    q = bench.quick
    clients, rate, duration, period = (500, 20, 3, 0.1) if q else (500, 20, 4, 0.1)
    chat = await bench.start_chat(name="chat-presence")
    _, token = await bench.user_token(chat.port)
    churner, churn_token = await bench.user_token(chat.port)
    path = f"/ws?token={token}&format=json&presence=1"
    churn_path = f"/ws?token={churn_token}&format=json&presence=1"  # as the web page connects
    config = {"port": chat.port, "path": churn_path, "count": 0, "concurrency": 1}
    churn_worker = LoadWorker(bench.procs.start("churn", [sys.executable, str(Path(__file__).resolve()), "--load-worker",
                                                     json.dumps(config)], pipes=True))
    await churn_worker.open()
    await churn_worker.read(30)  # ready

    async def during(stop):
        await churn_worker.ask(f"churn {period}")
        await stop.wait()
        return await churn_worker.ask("stop churn")

    rounds = ("off", "on", "on", "off") if q else ("off", "on", "on", "off", "on", "off", "off", "on")
    order = rounds + tuple(f"plain {key}" for key in rounds)
    runs = {key: [] for key in order}
    for key in order:
        presence = []

        def make_handler(latencies, presence=presence):
            return json_latency_handler(latencies, presence)

        run = await fanout_run(chat, path.removesuffix("&presence=1") if key.startswith("plain") else path,
                               clients, rate, duration, make_handler, during if key.endswith("on") else None,
                               connect=ws_connect_stamped)
        presence = presence_counts(presence)
        run["joins"], run["leaves"] = presence[churner, True], presence[churner, False]
        run["presence_frames"] = sum(presence.values())
        runs[key].append(run)
        await asyncio.sleep(0.5)  # the server is done closing this round's sockets
    status, body = await http_request(chat.port, "GET", "/auth/online", headers=[("Authorization", f"Bearer {token}")])
    online_after = json.loads(body) if status == 200 else f"HTTP {status}"
    churn_worker.close()
    bench.procs.stop(churn_worker.process)
    await bench.stop(chat)

    def pooled(key):
        rounds = runs[key]
        latencies = [x for r in rounds for x in r["latencies"]]
        return {
            "p50": ms(percentile(latencies, 50)), "p99": ms(percentile(latencies, 99)),
            "max": ms(max(latencies, default=0)), "rounds": "/".join(f"{r['p99']:.1f}" for r in rounds),
            "cpu": mean_cpu_note(rounds), "lost": sum(r["lost"] for r in rounds), "ooo": sum(r["ooo"] for r in rounds),
            "closed": sum(r["closed"] for r in rounds), "joins": sum(r["joins"] for r in rounds),
            "leaves": sum(r["leaves"] for r in rounds), "frames": sum(r["presence_frames"] for r in rounds),
            "cycles": sum(r["during"]["cycles"] for r in rounds if r["during"]),
            "failed": sum(r["during"]["failed"] for r in rounds if r["during"]),
            "skipped": sum(r["during"]["skipped"] for r in rounds if r["during"]),
        }

    off, on, plain_off, plain_on = pooled("off"), pooled("on"), pooled("plain off"), pooled("plain on")
    ratio, plain_ratio = on["p99"] / off["p99"], plain_on["p99"] / plain_off["p99"]
    name = (f"10 presence churn: fan-out as in 1 ({clients} clients on format=json&presence=1, {rate} msg/s for "
            f"{duration} s), without and with a user of their own joining and leaving every {period * 1000:.0f} ms; "
            f"one server, {len(rounds) // 2} rounds each, {'/'.join(rounds)}; then the same with clients on format=json alone")
    t = bench.table
    t.add(name, "fan-out p99, no churn (ms)", off["p99"],
          note=f"rounds {off['rounds']} ms; p50 {off['p50']:.1f} ms, max {off['max']:.1f} ms; {off['cpu']}")
    t.add(name, "fan-out p99, churn (ms)", on["p99"], target="churn/no churn <= 1.1x", result=verdict(ratio <= 1.1),
          note=f"{ratio:.2f}x no churn; rounds {on['rounds']} ms; p50 {on['p50']:.1f} ms, max {on['max']:.1f} ms; {on['cpu']}")
    joins, leaves = on["joins"] / clients, on["leaves"] / clients
    t.add(name, "joins / leaves each client saw", f"{joins:.1f} / {leaves:.1f}", target="= opens / closes",
          result=verdict(joins == on["cycles"] and leaves == on["cycles"]),
          note=f"the churn socket opened and closed {on['cycles']} times ({on['failed']} failed to open, "
               f"{on['skipped']} 100 ms slots skipped); {on['frames']:,} presence frames delivered in all; "
               f"GET /auth/online at the end: {online_after}")
    t.add(name, "lost / out-of-order, churn", f"{on['lost']} / {on['ooo']}", target="0 / 0",
          result=verdict(on["lost"] == 0 and on["ooo"] == 0),
          note=f"closed early {on['closed']}; no churn: {off['lost']} / {off['ooo']}, closed early {off['closed']}")
    t.add(name, "fan-out p99, no churn, no presence frames (ms)", plain_off["p99"],
          note=f"rounds {plain_off['rounds']} ms; p50 {plain_off['p50']:.1f} ms; {plain_off['cpu']}")
    t.add(name, "fan-out p99, churn, no presence frames (ms)", plain_on["p99"], target="churn/no churn <= 1.1x",
          result=verdict(plain_ratio <= 1.1),
          note=f"{plain_ratio:.2f}x no churn; rounds {plain_on['rounds']} ms; p50 {plain_on['p50']:.1f} ms; "
               f"{plain_on['cycles']} opens and closes, {plain_on['frames']} presence frames delivered (0 expected); "
               f"lost / out-of-order {plain_on['lost']} / {plain_on['ooo']}; {plain_on['cpu']}")


# ---------------------------------------------------------------- scenario 11: 10,000 sockets

LOAD_WORKERS = 2  # load-generator processes for the sockets row: one per core at most (2 cores here)
BUCKET_NS = 100_000  # the load generators report latencies as a histogram of 0.1 ms buckets
STEP_RATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # msg/s, tried in order
STEP_P99_MS = 250


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_load_worker(config):
    """`bench.py --load-worker JSON`: a load-generator process of the sockets row (see load_worker)."""
    raise_nofile_limit(config["count"] + 1024)
    loop = new_event_loop()
    try:
        loop.run_until_complete(load_worker(config))
    finally:
        loop.close()


async def load_worker(config):
    """Opens `count` websockets to `port` + `path` when told to, and reports what they received:
    one command a line on stdin (connect, reset, count, report, close), one JSON line on stdout
    each. Latencies use the monotonic clock (system-wide), which the sending bench stamped.
    The presence row's churning user is one too: `churn <period>` starts presence_churn on
    `path`, `stop churn` stops it and reports."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    latencies = []
    timed = latency_handler(latencies)
    got = [0]
    last = [0]

    def handler(ws, payload, now):
        timed(ws, payload, now)
        got[0] += 1
        if now > last[0]:
            last[0] = now

    connections = []
    emit({"event": "ready"})
    try:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "connect":
                semaphore = asyncio.Semaphore(config["concurrency"])

                async def one():
                    async with semaphore:
                        return await ws_connect(config["port"], config["path"], handler, timeout=30)

                t = time.perf_counter()
                results = await asyncio.gather(*(one() for _ in range(config["count"])), return_exceptions=True)
                connections = [r for r in results if isinstance(r, WS)]
                errors = [r for r in results if not isinstance(r, WS)]
                emit({"event": "connected", "ok": len(connections), "failed": len(errors),
                      "seconds": time.perf_counter() - t, "error": repr(errors[0])[:200] if errors else None})
            elif command == "reset":
                latencies.clear()
                got[0] = last[0] = 0
                emit({"event": "reset"})
            elif command == "count":
                emit({"got": got[0], "closed": sum(1 for ws in connections if ws.closed.done())})
            elif command == "report":
                hist = collections.Counter(x // BUCKET_NS for x in latencies)
                emit({"got": got[0], "closed": sum(1 for ws in connections if ws.closed.done()),
                      "hist": {str(k): v for k, v in hist.items()}, "max": max(latencies, default=0), "last": last[0],
                      "ooo": sum(ws.ooo for ws in connections), "dups": sum(ws.dups for ws in connections)})
            elif command.startswith("churn "):
                stop_churn = asyncio.Event()
                churning = asyncio.ensure_future(presence_churn(config["port"], config["path"], float(command.split()[1]), stop_churn))
                emit({"event": "churning"})
            elif command == "stop churn":
                stop_churn.set()
                emit(await churning)
            elif command == "close":
                close_all(connections)
                connections = []
                await asyncio.sleep(0.3)  # the close frames and FINs go out
                emit({"event": "closed"})
                break
    finally:
        close_all(connections)
        transport.close()


class LoadWorker:
    """The bench's end of a load-generator process: a command line in, a JSON line out."""

    def __init__(self, process):
        self.process = process
        self.transport = None

    async def open(self):
        self.reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        self.transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.reader), self.process.stdout)

    async def read(self, timeout):
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise RuntimeError(f"load worker exited: {Processes.log_tail(self.process)}")
        return json.loads(line)

    async def ask(self, command, timeout=30):
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return await self.read(timeout)

    def close(self):
        if self.transport is not None:
            self.transport.close()


def hist_percentile(hist, total, p):
    """The p-th percentile (ns, a bucket's upper edge) of a merged latency histogram."""
    if not total:
        return float("nan")
    rank, seen = max(1, math.ceil(p / 100 * total)), 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) * BUCKET_NS
    return float("nan")


async def broadcast_step(server, workers, sender, connected, rate, messages, first_seq):
    """`messages` messages at `rate` msg/s from `sender` to every socket: what arrived, how fast,
    how late, and the CPU each process used."""
    for worker in workers:
        await worker.ask("reset")
    expected = messages * connected
    with CpuMeter([server.pid] + [w.process.pid for w in workers]) as cpu:
        start_ns, start = CLOCK(), time.perf_counter()
        for i in range(messages):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sender.send_text(f"{first_seq + i} {CLOCK()}")
        last_total, last_change = -1, time.monotonic()
        give_up = last_change + 10
        while time.monotonic() < give_up:  # until all arrived, or 1 s without progress
            counts = [await worker.ask("count") for worker in workers]
            total = sum(c["got"] for c in counts)
            if total >= expected:
                break
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            elif time.monotonic() - last_change > 1:
                break
            await asyncio.sleep(0.05)
    reports = [await worker.ask("report") for worker in workers]
    hist = collections.Counter()
    for report in reports:
        hist.update({int(k): v for k, v in report["hist"].items()})
    got = sum(r["got"] for r in reports)
    span = max(messages / rate, (max(r["last"] for r in reports) - start_ns) / 1e9)
    server_cpu_s = cpu.server_pct[0] / 100 * cpu.seconds
    delivered = got / span
    step = {
        "rate": rate, "messages": messages, "expected": expected, "got": got, "delivered": delivered,
        "offered": rate * connected, "per_core": got / server_cpu_s if server_cpu_s > 0 else float("nan"),
        "p50": ms(hist_percentile(hist, got, 50)), "p99": ms(hist_percentile(hist, got, 99)),
        "max": ms(max(r["max"] for r in reports)), "closed": sum(r["closed"] for r in reports),
        "ooo": sum(r["ooo"] for r in reports), "cpu": cpu,
    }
    step["held"] = (got == expected and step["closed"] == 0 and step["p99"] <= STEP_P99_MS
                    and delivered >= 0.9 * step["offered"])
    return step


def sockets_cpu_note(cpu):
    """CPU of the server, each load generator, this bench process (the sender) and the rest."""
    server, *generators = cpu.server_pct
    text = (f"cpu% srv {server:.0f} load gen {'+'.join(f'{g:.0f}' for g in generators)} "
            f"bench {cpu.client_pct:.0f} others {cpu.others_pct:.0f}")
    if any(g >= 90 for g in generators):
        text += " CLIENT-BOUND"
    if cpu.others_pct >= 50:
        text += " NOISY"
    return text


async def settle(pid, seconds=60):
    """Wait until the process has been (nearly) idle for half a second, `seconds` at most."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(0.5)
        if cpu_seconds(pid) - before < 0.05:
            return


async def sockets_run(bench, server, paths, sender_path, count, rates, step_s, deadline):
    """`count` websockets on `server` from LOAD_WORKERS processes (paths[i] for worker i), then
    broadcast steps at each of `rates` until one does not hold (or `deadline`, time.monotonic())."""
    warm = await ws_connect_many(server.port, paths[0], 10)
    close_all(warm)
    await asyncio.sleep(1.0)
    rss_before = rss_kib(server.pid)
    workers = []
    sender = None
    try:
        shares = [count // LOAD_WORKERS + (1 if i < count % LOAD_WORKERS else 0) for i in range(LOAD_WORKERS)]
        for i, share in enumerate(shares):
            config = {"port": server.port, "path": paths[i % len(paths)], "count": share, "concurrency": 64}
            process = bench.procs.start(f"load-{i}", [sys.executable, str(Path(__file__).resolve()),
                                                      "--load-worker", json.dumps(config)], pipes=True)
            worker = LoadWorker(process)
            workers.append(worker)
            await worker.open()
        for worker in workers:
            await worker.read(30)  # ready
        t = time.perf_counter()
        for worker in workers:
            worker.process.stdin.write(b"connect\n")
            worker.process.stdin.flush()
        answers = [await worker.read(180) for worker in workers]
        connect_s = time.perf_counter() - t
        connected = sum(a["ok"] for a in answers)
        failed = sum(a["failed"] for a in answers)
        errors = "; ".join(a["error"] for a in answers if a["error"])
        # The handshakes are done, but the server may still be admitting the sockets (a token
        # check and a user look-up each): measure the broadcast once it has settled.
        await settle(server.pid)
        rss_after = rss_kib(server.pid)
        sender = await ws_connect(server.port, sender_path)
        await asyncio.sleep(0.5)
        steps = []
        seq = 0
        for rate in rates:
            messages = max(4, round(rate * step_s))
            if time.monotonic() + messages / rate + 4 > deadline:
                break
            step = await broadcast_step(server, workers, sender, connected, rate, messages, seq)
            seq += messages
            steps.append(step)
            if not step["held"]:
                break
            await asyncio.sleep(0.3)
        return {"connect": connect_s, "connected": connected, "failed": failed, "errors": errors,
                "rss_before": rss_before, "rss_after": rss_after, "per": (rss_after - rss_before) / max(1, connected),
                "steps": steps}
    finally:
        if sender is not None:
            sender.close()
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.ask("close", timeout=10)
        for worker in workers:
            worker.close()
            await bench.stop(worker.process)


def step_label(step):
    return f"{step['rate']:g}" + ("" if step["held"] else " (failed)")


def describe_step(step):
    return (f"{step['rate']:g} msg/s: {step['delivered']:,.0f} deliveries/s of {step['offered']:,.0f} offered, "
            f"p99 {step['p99']:.0f} ms, {step['got']:,}/{step['expected']:,} arrived, closed {step['closed']}")


async def scenario_sockets(bench):
    """10,000 websockets (2,000 with --quick) on one chat process, opened by LOAD_WORKERS processes,
    and one more that broadcasts to them all at stepped rates: the best step that held (every frame
    delivered, nobody closed, p99 <= 250 ms) is the row's figures. The bare server then gets the
    same sockets and the same rates from chat's best step on (a few steps at most)."""
    q = bench.quick
    count, step_s = (2_000, 1.5) if q else (10_000, 3.0)
    raise_nofile_limit(count + 1024)  # the chat server and the load generators inherit it
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < count + 256:
        bench.table.add("11 sockets", "skipped", f"RLIMIT_NOFILE {soft} is under {count + 256}")
        return
    budget_end = time.monotonic() + (80 if q else 140)
    chat = await bench.start_chat(name="chat-sockets")
    paths = []
    for _ in range(LOAD_WORKERS):
        _, token = await bench.user_token(chat.port)  # a user per load generator (MAX_SOCKETS_PER_USER is off)
        paths.append(f"/ws?token={token}")
    _, token = await bench.user_token(chat.port)
    c = await sockets_run(bench, chat, paths, f"/ws?token={token}", count, STEP_RATES, step_s, budget_end - 25)
    await bench.stop(chat)
    held = [s for s in c["steps"] if s["held"]]
    best = held[-1] if held else (c["steps"][0] if c["steps"] else None)
    b = None
    if best is not None and time.monotonic() < budget_end - 15:
        bare = await bench.start_bare()
        rates = [r for r in STEP_RATES if r >= best["rate"]][:3]
        b = await sockets_run(bench, bare, ["/ws"], "/ws", count, rates, step_s, budget_end)
        await bench.stop(bare)
    name = (f"11 sockets: {count:,} websockets on one process from {LOAD_WORKERS} load-generator processes, "
            f"broadcast from one more at stepped rates ({step_s:g} s steps, at least 4 messages) until p99 > "
            f"{STEP_P99_MS} ms or deliveries fall behind; figures at the best step that held")
    t = bench.table
    bare_best = None
    if b and b["steps"]:
        same = [s for s in b["steps"] if s["rate"] == best["rate"]]
        bare_best = same[0] if same else None
    bare = (lambda key: bare_best[key] if bare_best else "n/a")  # noqa: E731
    t.add(name, f"connect {count:,} (s)", c["connect"], b["connect"] if b else "n/a",
          note=f"opened {c['connected']:,}, failed {c['failed']}{'; ' + c['errors'] if c['errors'] else ''}"
               + (f"; bare opened {b['connected']:,}, failed {b['failed']}" if b else ""))
    t.add(name, "RSS per connection (KiB)", c["per"], b["per"] if b else "n/a",
          note=f"chat RSS {c['rss_before'] // 1024}->{c['rss_after'] // 1024} MiB"
               + (f", bare {b['rss_before'] // 1024}->{b['rss_after'] // 1024} MiB" if b else ""))
    if best is None:
        t.add(name, "broadcast", "no step ran", note="time budget")
        return
    label = "best step that held" if held else "NO STEP HELD; first step"
    t.add(name, "send rate (msg/s)", best["rate"], bare("rate"), ratio="n/a",
          note=f"{label}; steps: " + ", ".join(step_label(s) for s in c["steps"]))
    t.add(name, "deliveries/s", best["delivered"], bare("delivered"),
          note=f"offered {best['offered']:,.0f}/s; chat {sockets_cpu_note(best['cpu'])}")
    t.add(name, "deliveries/s per server core", best["per_core"], bare("per_core"), target=">= 20,000 at p99 < 250 ms",
          result=verdict(held != [] and best["per_core"] >= 20_000),
          note="deliveries / server CPU seconds" + (f"; bare {sockets_cpu_note(bare_best['cpu'])}" if bare_best else ""))
    t.add(name, "latency p50 (ms)", best["p50"], bare("p50"))
    t.add(name, "latency p99 (ms)", best["p99"], bare("p99"), target=f"< {STEP_P99_MS} ms",
          result=verdict(best["p99"] < STEP_P99_MS))
    t.add(name, "latency max (ms)", best["max"], bare("max"),
          note=f"out-of-order {best['ooo']}, closed early {best['closed']}")
    failed = [s for s in c["steps"] if not s["held"]]
    if failed:
        t.add(name, "first step that did not hold (msg/s)", failed[0]["rate"], ratio="n/a",
              note=f"{describe_step(failed[0])}, p50 {failed[0]['p50']:.0f} ms, per server core "
                   f"{failed[0]['per_core']:,.0f}/s; {sockets_cpu_note(failed[0]['cpu'])}")
    if b and b["steps"]:
        b_held = [s for s in b["steps"] if s["held"]]
        tried = ", ".join(step_label(s) for s in b["steps"])
        t.add(name, "bare: best step that held (msg/s)", "n/a", b_held[-1]["rate"] if b_held else "none", ratio="n/a",
              note=f"bare steps from chat's best: {tried}"
                   + (f"; {describe_step(b_held[-1])}, per server core {b_held[-1]['per_core']:,.0f}/s" if b_held else ""))


# ---------------------------------------------------------------- scenario 12: the cost of the metrics


def metric_value(text, name):
    """A sample's value in Prometheus' text format (the first line for `name` without labels), or None."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            with contextlib.suppress(ValueError):
                return float(value.split()[0])
    return None


def count_all_rows(db_path):
    connection = sqlite3.connect(db_path, timeout=30)
    try:
        return connection.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        connection.close()


async def metrics_at_end(servers):
    """GET /metrics on both servers after the last round, and the on server's stored-messages counter
    beside the rows in its database (the two must agree)."""
    answers = {}
    for key, server in servers.items():
        status, body = await http_request(server.port, "GET", "/metrics", timeout=10)
        answers[key] = {"status": status,
                        "stored": metric_value(body.decode("utf-8", "replace"), "chat_messages_stored_total")}
    db_path = servers["on"].database_url.split("///", 1)[1]
    answers["rows"] = await asyncio.to_thread(count_all_rows, db_path)
    return answers


async def scenario_metrics(bench):
    """The cost of the Prometheus metrics: on_off_rounds on two servers that differ only in METRICS, on
    (the default, as in every other row) and off (every metric a no-op). At the end the on server's
    /metrics must answer 200 with messages counted (proof that they were on), the off server's 404."""
    runs = await on_off_rounds(bench, {
        "off": {"name": "chat-metrics-off", "metrics": "off"},
        "on": {"name": "chat-metrics-on", "metrics": "on"},
    }, at_end=metrics_at_end)
    name = on_off_name(12, "metrics cost: METRICS=on (the default) against off (every metric a no-op)", runs)
    t = bench.table
    add_on_off_rows(t, name, "metrics", runs, 1.05, note="; limits against abuse off on both servers")
    answers = runs["at_end"]
    on, off = answers["on"], answers["off"]
    counted = on["stored"] if on["stored"] is not None else "none"
    t.add(name, "/metrics at the end, metrics on", f"HTTP {on['status']}, {fmt(counted)} stored", ratio="n/a",
          target="200, stored > 0", result=verdict(on["status"] == 200 and (on["stored"] or 0) > 0 and off["status"] == 404),
          note=f"chat_messages_stored_total {fmt(counted)}, messages in its DB {answers['rows']:,}; "
               f"metrics off: /metrics answered HTTP {off['status']} (404 expected)")


# ---------------------------------------------------------------- main


SCENARIOS = {
    "fanout": (scenario_fanout, 70, 30),
    "slow": (scenario_slow, 100, 30),
    "storm": (scenario_storm, 50, 20),
    "history": (scenario_history, 40, 15),
    "ingest": (scenario_ingest, 40, 15),
    "idle": (scenario_idle, 60, 20),
    "scaleout": (scenario_scaleout, 60, 20),
    "limits": (scenario_limits, 110, 40),
    "protocol": (scenario_protocol, 60, 25),
    "presence": (scenario_presence, 130, 60),
    "sockets": (scenario_sockets, 170, 60),
    "metrics": (scenario_metrics, 110, 40),
}


def machine_lines(bench):
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import uvicorn
    import websockets

    fs = "?"
    with contextlib.suppress(Exception):
        fs = subprocess.run(["df", "--output=fstype", str(bench.tmp)], capture_output=True, text=True).stdout.split()[-1]
    return [
        f"machine: nproc {len(os.sched_getaffinity(0))}, {model}, Python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"software: uvicorn {uvicorn.__version__}, websockets {websockets.__version__}, "
        f"event loop {'uvloop' if uvloop else 'asyncio'} (client and both servers); temp DB on {fs}",
        "client: one process, lean hand-rolled websocket protocol; latency = receive time - send time "
        "stamped in the text by the same process (the sockets row: two load-generator processes, "
        "the same monotonic clock; the presence row: the kernel's receive time, SO_TIMESTAMPNS)",
        "limits against abuse are off in every row except the limits row "
        f"({', '.join(f'{k}={v}' for k, v in LIMITS_OFF.items())}; row 8 sets MESSAGE_LIMIT={HIGH_MESSAGE_LIMIT!r}); "
        "metrics are on (METRICS=on, the default) in every row; row 12 also runs a server with METRICS=off",
        f"chat servers: uvicorn chat:app {' '.join(SERVE_FLAGS)} --http {SHIPPED_HTTP} (as deployed); "
        f"row 9 swaps --http for {', '.join(http for _, http in PROTOCOLS[1:])}",
    ]


async def run(bench, names):
    print("\n".join(machine_lines(bench)), flush=True)
    for name in names:
        function, budget, minimum = SCENARIOS[name]
        remaining = bench.remaining()
        if remaining < minimum:
            bench.table.add(name, "skipped", "time budget")
            continue
        t = time.monotonic()
        print(f"... {name}", end="", flush=True)
        try:
            await asyncio.wait_for(function(bench), min(budget, remaining))
            print(f" {time.monotonic() - t:.0f}s", flush=True)
        except asyncio.TimeoutError:
            print(" timed out", flush=True)
            bench.table.add(name, "TIMEOUT", f"over {min(budget, remaining):.0f}s")
        except Exception as error:
            print(f" failed: {error!r}", flush=True)
            bench.table.add(name, "ERROR", repr(error)[:150])
        finally:
            for process in list(bench.procs.items):  # a failed scenario leaves nothing behind
                with contextlib.suppress(Exception):  # (a cancelled bench.stop may be stopping it too)
                    bench.procs.stop(process)


def raise_nofile_limit(needed=8192):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))  # inherited by the servers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shortened run (about six and a half minutes at most)")
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare-compression", help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile_limit()
    if args.bare_server:
        run_bare_server(args.bare_server, args.bare_compression)
        return
    if args.load_worker:
        run_load_worker(json.loads(args.load_worker))
        return
    names = list(SCENARIOS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    bench = Bench(args)
    started = time.monotonic()
    loop = new_event_loop()
    try:
        loop.run_until_complete(run(bench, names))
        print()
        print(bench.table.render())
        print(f"\ntotal {time.monotonic() - started:.0f}s")
    finally:
        tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in tasks:  # an interrupted scenario closes its connections in its finally blocks
            task.cancel()
        if tasks:
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.wait(tasks, timeout=5))
        bench.procs.stop_all()
        for database in bench.postgres_databases:
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(
                    postgres_admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"), 15))
        loop.close()
        shutil.rmtree(bench.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
