"""End-to-end smoke test, as a script would do it: start a real server on a free port with a
throw-away database, register, log in, refresh, read history, and chat between two websocket
clients. Stops at the first failure with a line saying what failed; exits 0 when all is well.

    python smoke.py                      # starts its own server
    python smoke.py http://host:port     # aims at a running server instead
"""

import asyncio
import datetime
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from websockets.asyncio.client import connect


def fail(what):
    sys.exit(f"smoke: FAILED: {what}")


def check(condition, what):
    if not condition:
        fail(what)
    print(f"smoke: ok: {what}")


def expect(response, status, what):
    if response.status_code != status:
        fail(f"{what}: expected {status}, got {response.status_code} {response.text}")
    print(f"smoke: ok: {what}")
    return response.json()


def start_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="chat-smoke-")
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{folder}/chat.db",
        "SECRET_KEY": secrets.token_urlsafe(32),
        "BCRYPT_ROUNDS": os.environ.get("BCRYPT_ROUNDS", "4"),
    }
    env.pop("BROADCAST_URL", None)
    command = [sys.executable, "-m", "uvicorn", "chat:app", "--host", "127.0.0.1", "--port", str(port),
               "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--http", "chat:BoundedHttpProtocol",
               "--ws", "chat:ChatWebSocketProtocol", "--limit-concurrency", "16384",
               "--log-level", "warning"]
    here = os.path.dirname(os.path.abspath(__file__))
    process = subprocess.Popen(command, cwd=here, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"the server exited with code {process.returncode} before answering")
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return base_url, process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.terminate()
    fail("the server did not answer /health within 30 s")


def is_utc_time(value):
    """ISO 8601 UTC with milliseconds and Z, as the server stamps messages: 2026-11-25T21:04:05.123Z."""
    try:
        return isinstance(value, str) and value.endswith("Z") and len(value) == 24 and bool(
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return False


async def chat_between_two(base_url, alice, bob):
    ws_base = base_url.replace("http", "ws", 1) + "/ws?token="
    async with connect(ws_base + alice["token"]) as alice_ws, connect(ws_base + bob["token"]) as bob_ws:
        with httpx.Client(base_url=base_url, timeout=10) as http:
            listed = expect(http.get("/auth/online", headers={"Authorization": f"Bearer {alice['token']}"}),
                            200, "GET /auth/online")
            names = {row.get("username") for row in listed}
            check({alice["name"], bob["name"]} <= names, "both connected users are listed as online")
        async with connect(ws_base + bob["token"] + "&format=json") as as_json:
            await as_json.send("a json frame")
            frame = json.loads(await asyncio.wait_for(as_json.recv(), 5))
            check(frame.get("type") == "message" and is_utc_time(frame.get("created_at")),
                  f"a format=json frame has type and created_at ({frame!r})")
        for ws in (alice_ws, bob_ws):
            await asyncio.wait_for(ws.recv(), 5)  # the json frame's text, as the others see it
        await alice_ws.send("hello from alice")
        for name, ws in (("alice", alice_ws), ("bob", bob_ws)):
            frame = await asyncio.wait_for(ws.recv(), 5)
            check(frame == f"{alice['name']}: hello from alice", f"{name} received alice's message ({frame!r})")
        await bob_ws.send("hi alice")
        for name, ws in (("alice", alice_ws), ("bob", bob_ws)):
            frame = await asyncio.wait_for(ws.recv(), 5)
            check(frame == f"{bob['name']}: hi alice", f"{name} received bob's message ({frame!r})")
    async with connect(ws_base + "not-a-token") as ws:
        try:
            await asyncio.wait_for(ws.recv(), 5)
            fail("a websocket with a bad token was not closed")
        except Exception:
            pass
        check(ws.close_code == 1008, f"a bad token is closed with 1008 (got {ws.close_code})")


def run(base_url):
    suffix = secrets.token_hex(3)
    password = "smoke-test-password"
    users = {}
    with httpx.Client(base_url=base_url, timeout=10) as http:
        expect(http.get("/health"), 200, "GET /health")
        metrics = http.get("/metrics")
        if metrics.status_code == 401:  # behind METRICS_TOKEN: answering at all is what a smoke test can check
            print("smoke: ok: GET /metrics answers (401: it needs METRICS_TOKEN)")
        else:
            check(metrics.status_code == 200 and "chat_messages_stored_total" in metrics.text,
                  f"GET /metrics gives Prometheus metrics ({metrics.status_code})")
        for name in ("alice", "bob"):
            username = f"{name}_{suffix}"
            body = expect(http.post("/auth/register", json={"username": username, "password": password}),
                          200, f"register {username}")
            check(body == {"message": "Registration successful"}, "registration message")
            tokens = expect(http.post("/auth/login", json={"username": username, "password": password}),
                            200, f"log in {username}")
            check(tokens.get("token_type") == "bearer", "token_type is bearer")
            users[name] = {"name": username, "token": tokens["access_token"], "refresh": tokens["refresh_token"]}
        expect(http.post("/auth/register", json={"username": users["alice"]["name"], "password": password}),
               400, "registering a taken name is refused")
        expect(http.post("/auth/login", json={"username": users["alice"]["name"], "password": "wrong-password"}),
               401, "a wrong password is refused")
        tokens = expect(http.post("/auth/refresh", json={"refresh_token": users["alice"]["refresh"]}),
                        200, "refresh gives a new token pair")
        users["alice"]["token"] = tokens["access_token"]
        expect(http.get("/auth/messages"), 401, "history without a token is refused")

        asyncio.run(chat_between_two(base_url, users["alice"], users["bob"]))

        history = expect(http.get("/auth/messages", headers={"Authorization": f"Bearer {users['bob']['token']}"}),
                         200, "GET /auth/messages")
        mine = [m for m in history if m["username"] in (users["alice"]["name"], users["bob"]["name"])]
        check([(m["username"], m["text"]) for m in mine] == [
            (users["bob"]["name"], "a json frame"), (users["alice"]["name"], "hello from alice"),
            (users["bob"]["name"], "hi alice")], "history holds the messages in order")
        check(all(is_utc_time(m.get("created_at")) for m in mine), "history items have created_at in UTC")


def main():
    if len(sys.argv) > 1:
        run(sys.argv[1].rstrip("/"))
    else:
        base_url, process = start_server()
        try:
            run(base_url)
        finally:
            process.terminate()
            process.wait(timeout=15)
    print("smoke: all checks passed")


if __name__ == "__main__":
    main()
