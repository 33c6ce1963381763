"""chat.app mounted inside another Starlette app (SPEC section 7): `Mount("/chat", app=chat.app)`
works for HTTP, the websocket and the web page, whether or not the parent runs chat's lifespan."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import chat
from conftest import PASSWORD, ROOT, running_server, unique_name, ws_url


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


async def parent_home(request):
    return PlainTextResponse("the parent app")


def parent_app(with_chat_lifespan):
    routes = [Route("/", parent_home), Mount("/chat", app=chat.app)]
    return Starlette(routes=routes, lifespan=chat.lifespan if with_chat_lifespan else None)


def check_http_through_the_mount(http):
    """Register, log in, refresh, read history and fetch the page, all under /chat."""
    assert http.get("/").text == "the parent app"
    assert http.get("/chat/health").json() == {"status": "ok"}
    username = unique_name("m")
    response = http.post("/chat/auth/register", json={"username": username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    response = http.post("/chat/auth/login", json={"username": username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    tokens = response.json()
    response = http.post("/chat/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 200, response.text
    tokens = response.json()
    response = http.get("/chat/auth/messages", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert response.status_code == 200, response.text
    assert isinstance(response.json(), list)
    response = http.get("/chat/auth/messages")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid or expired token"}
    page = http.get("/chat/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>" in page.text.lower() or "<html" in page.text.lower()
    assert http.get("/chat/no-such-path").status_code == 404
    return username, tokens


# ---------------------------------------------------------------- in process: HTTP through TestClient


def test_mounted_with_chat_lifespan_serves_http_and_the_page():
    with TestClient(parent_app(with_chat_lifespan=True), raise_server_exceptions=False) as http:
        check_http_through_the_mount(http)


def test_mounted_without_any_lifespan_sets_itself_up_on_first_request():
    app = parent_app(with_chat_lifespan=False)
    with TestClient(app, raise_server_exceptions=False) as http:
        try:
            check_http_through_the_mount(http)
        finally:
            # Nobody runs chat's shutdown here; disconnect on the loop that connected, so that
            # later in-process tests start from a clean slate.
            http.portal.call(chat.stop_service)


# Run in a process of its own (the environment, hence DATABASE_URL, is this run's), so that
# whatever it leaves behind in chat's module state cannot harm the other in-process tests.
WITHOUT_WITH = """
import secrets
import chat
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

http = TestClient(Starlette(routes=[Mount("/chat", app=chat.app)]), raise_server_exceptions=False)
credentials = {"username": "w" + secrets.token_hex(4), "password": "correct-horse-1"}
for step in range(3):  # every request runs on a new event loop
    if step == 0:
        response = http.post("/chat/auth/register", json=credentials)
    elif step == 1:
        response = http.post("/chat/auth/login", json=credentials)
        token = response.json().get("access_token")
    else:
        response = http.get("/chat/auth/messages", headers={"Authorization": "Bearer " + token})
    assert response.status_code == 200, (step, response.status_code, response.text)
    health = http.get("/chat/health")
    assert health.status_code == 200, ("health after step", step, health.status_code, health.text)
assert http.get("/chat/").headers["content-type"].startswith("text/html")
print("all requests answered")
"""


def test_mounted_without_lifespan_in_a_test_client_used_without_with():
    """Without `with`, TestClient runs every request on a new event loop and never a lifespan:
    the way many people test an app they embed. Every request must still work."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_WITH],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=60,
    )
    assert "all requests answered" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------- a real server: the websocket

PARENT_MODULE = '''
import chat
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route


async def home(request):
    return PlainTextResponse("the parent app")


app = Starlette(routes=[Route("/", home), Mount("/chat", app=chat.app)]{lifespan})
'''


@contextlib.contextmanager
def running_parent(tmp_path, with_chat_lifespan):
    """A real uvicorn serving `parent:app`, a module in tmp_path that mounts chat.app at /chat."""
    lifespan = ", lifespan=chat.lifespan" if with_chat_lifespan else ""
    (tmp_path / "parent.py").write_text(PARENT_MODULE.format(lifespan=lifespan))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    with running_server(env=env, app="parent:app", health_path="/chat/health") as (base_url, process):
        yield base_url, process


@pytest.mark.parametrize("with_chat_lifespan", [True, False], ids=["chat-lifespan", "no-lifespan"])
def test_a_real_server_with_chat_mounted_serves_the_websocket(tmp_path, with_chat_lifespan):
    with running_parent(tmp_path, with_chat_lifespan) as (base_url, process):
        with httpx.Client(base_url=base_url, timeout=10) as http:
            username, tokens = check_http_through_the_mount(http)
            token = tokens["access_token"]
            mounted = base_url + "/chat"
            text = "hello from under /chat " + unique_name("t")
            headers = {"Authorization": f"Bearer {token}"}
            before = max([m["id"] for m in http.get("/chat/auth/messages", headers=headers).json()], default=0)

            async def scenario():
                async with connect(ws_url(mounted, token, format="json")) as a, connect(ws_url(mounted, token, after=before)) as b:
                    await a.send(text)
                    frame = json.loads(await asyncio.wait_for(a.recv(), 10))
                    assert frame["username"] == username and frame["text"] == text
                    assert await asyncio.wait_for(b.recv(), 10) == f"{username}: {text}"
                    # catching up with after= works under the prefix too
                    async with connect(ws_url(mounted, token, format="json", after=frame["id"] - 1)) as c:
                        assert json.loads(await asyncio.wait_for(c.recv(), 10)) == frame
                    async with connect(ws_url(mounted, "garbage")) as bad:
                        with pytest.raises(ConnectionClosed):
                            await asyncio.wait_for(bad.recv(), 10)
                        assert bad.close_code == 1008
                    return frame

            frame = run(scenario())
            history = http.get("/chat/auth/messages", headers=headers).json()
            assert frame in history

        if with_chat_lifespan:
            # chat's lifespan runs in the parent, so shutdown closes websockets with 1001 there too.
            async def shutdown_scenario():
                async with connect(ws_url(base_url + "/chat", token)) as ws:
                    await ws.send("still there?")
                    await asyncio.wait_for(ws.recv(), 10)
                    process.send_signal(signal.SIGTERM)
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await asyncio.wait_for(ws.recv(), 10)
                    return ws.close_code

            assert run(shutdown_scenario()) == 1001
            process.wait(timeout=15)
