"""Tokens out of URLs and logs (SPEC section 8), against a real uvicorn server: a websocket can
carry its access token in the `bearer.<token>` subprotocol, no token ever appears in a log line,
and a websocket lives no longer than the access token it was opened with (close 4001)."""

import asyncio
import contextlib
import json
import os
import secrets
import time

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import PASSWORD, closed_with, register_and_login, running_server, server_log, ws_url

# Signing with a short key on purpose (a forged token) makes PyJWT warn about the key's length.
pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")


def run(coroutine, seconds=60):
    return asyncio.run(asyncio.wait_for(coroutine, seconds))


def socket_url(base_url, **query):
    query_string = "&".join(f"{key}={value}" for key, value in query.items())
    return base_url.replace("http://", "ws://") + "/ws" + (f"?{query_string}" if query_string else "")


def open_socket(base_url, token, way, **query):
    """A websocket carrying `token` the given way: "query" (?token=) or "subprotocol" (bearer.<token>)."""
    if way == "query":
        return connect(ws_url(base_url, token, **query), open_timeout=10)
    return connect(socket_url(base_url, **query), subprotocols=["chat", f"bearer.{token}"], open_timeout=10)


def access_token(username, lifetime_seconds, key=None, token_type="access"):
    """A token signed like the server's own (conftest puts SECRET_KEY in the servers' environment),
    with a lifetime of our choosing: ACCESS_TOKEN_EXPIRE_MINUTES cannot go below a minute."""
    now = int(time.time())
    claims = {"sub": username, "type": token_type, "iat": now, "exp": now + lifetime_seconds}
    return jwt.encode(claims, key or os.environ["SECRET_KEY"], algorithm="HS256")


def history(http, tokens, **query):
    response = http.get("/auth/messages", params={"limit": 1000, **query},
                        headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- the bearer.<token> subprotocol


def test_the_token_in_the_subprotocol_authenticates_and_the_server_answers_chat(server, http):
    alice, bob = register_and_login(http), register_and_login(http)

    async def scenario():
        async with open_socket(server, alice[1]["access_token"], "subprotocol") as a, \
                open_socket(server, bob[1]["access_token"], "query") as b:
            assert a.subprotocol == "chat"  # never the bearer.<token> one: it is not echoed back
            assert a.response.headers["Sec-WebSocket-Protocol"] == "chat"
            await a.send("through the subprotocol")
            expected = f"{alice[0]}: through the subprotocol"  # the subprotocol's user, not anyone else
            assert await asyncio.wait_for(a.recv(), 10) == expected
            assert await asyncio.wait_for(b.recv(), 10) == expected

    run(scenario())
    last = history(http, alice[1])[-1]
    assert (last["username"], last["text"]) == (alice[0], "through the subprotocol")


def test_the_subprotocol_works_with_the_other_query_parameters(server, http):
    alice = register_and_login(http)

    async def scenario():
        async with open_socket(server, alice[1]["access_token"], "subprotocol", format="json") as ws:
            await ws.send("json through the subprotocol")
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (frame["username"], frame["text"]) == (alice[0], "json through the subprotocol")
            async with open_socket(server, alice[1]["access_token"], "subprotocol", after=frame["id"] - 1) as late:
                assert await asyncio.wait_for(late.recv(), 10) == f"{alice[0]}: json through the subprotocol"

    run(scenario())


BAD_TOKENS = {
    "garbage": lambda name, tokens: "garbage",
    "a refresh token": lambda name, tokens: tokens["refresh_token"],
    "expired beyond the leeway": lambda name, tokens: access_token(name, -60),
    "wrongly signed": lambda name, tokens: access_token(name, 600, key="not-the-server-key-" + secrets.token_hex(8)),
    "a refresh-typed token": lambda name, tokens: access_token(name, 600, token_type="refresh"),
}


@pytest.mark.parametrize("way", ["query", "subprotocol"])
@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_a_bad_token_either_way_is_accepted_then_closed_with_1008(server, http, kind, way):
    name, tokens = register_and_login(http)

    async def scenario():
        async with open_socket(server, BAD_TOKENS[kind](name, tokens), way) as ws:  # no HTTP 403
            if way == "subprotocol":
                assert ws.subprotocol == "chat"
            return await closed_with(ws)

    assert run(scenario())[0] == 1008


def test_offering_chat_without_a_bearer_token_is_closed_with_1008(server):
    async def scenario():
        async with connect(socket_url(server), subprotocols=["chat"], open_timeout=10) as ws:
            assert ws.subprotocol == "chat"
            return await closed_with(ws)

    assert run(scenario())[0] == 1008


# ---------------------------------------------------------------- no token in any log line


def leaked_parts(log, secrets_to_hide, length=20):
    """Every `length`-character piece of any secret that appears in the log."""
    return sorted({secret[i:i + length] for secret in secrets_to_hide
                   for i in range(len(secret) - length + 1) if secret[i:i + length] in log})


def use_every_way_a_token_travels(base_url):
    """Register, log in, refresh, log out, read messages, and open websockets with ?token= and with
    the subprotocol (good and bad tokens, a path that does not exist); returns every token used."""
    seen = []
    with httpx.Client(base_url=base_url, timeout=10) as http:
        name, tokens = register_and_login(http)
        seen += [tokens["access_token"], tokens["refresh_token"]]
        refreshed = http.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert refreshed.status_code == 200, refreshed.text
        seen += [refreshed.json()["access_token"], refreshed.json()["refresh_token"]]
        assert http.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 401  # reuse
        assert http.post("/auth/logout", json={"refresh_token": refreshed.json()["refresh_token"]}).status_code == 200
        again = http.post("/auth/login", json={"username": name, "password": PASSWORD})
        assert again.status_code == 200, again.text
        second = again.json()
        seen += [second["access_token"], second["refresh_token"]]
        access = second["access_token"]
        assert http.get("/auth/messages", headers={"Authorization": f"Bearer {access}"}).status_code == 200
        # Tokens in HTTP query strings too: the service ignores them, but they are in the access log's path.
        assert http.get("/auth/messages", params={"token": access}).status_code == 401
        assert http.get("/health", params={"access_token": access, "refresh_token": second["refresh_token"]}).status_code == 200
        short = access_token(name, 1)
        seen.append(short)

        async def sockets():
            async with open_socket(base_url, access, "query", format="json") as ws:
                await ws.send("by query")
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["text"] == "by query"
            async with connect(socket_url(base_url, format="json", token=access), open_timeout=10) as ws:  # token not first
                await ws.send("by query, second")
                await asyncio.wait_for(ws.recv(), 10)
            # A percent-encoded key is the same key to the server, so it must be masked the same.
            async with connect(base_url.replace("http://", "ws://") + f"/ws?tok%65n={access}", open_timeout=10) as ws:
                await ws.send("by query, encoded key")
                assert await asyncio.wait_for(ws.recv(), 10) == f"{name}: by query, encoded key"
            async with open_socket(base_url, access, "subprotocol") as ws:
                await ws.send("by subprotocol")
                assert await asyncio.wait_for(ws.recv(), 10) == f"{name}: by subprotocol"
            for way in ("query", "subprotocol"):
                async with open_socket(base_url, second["refresh_token"], way) as ws:
                    assert (await closed_with(ws))[0] == 1008
                async with open_socket(base_url, short, way) as ws:  # expires while open: 4001
                    assert (await closed_with(ws))[0] == 4001
            with pytest.raises(InvalidStatus):  # no such route: uvicorn logs the refused handshake
                async with connect(base_url.replace("http://", "ws://") + f"/nowhere?token={access}", open_timeout=10):
                    pass

        run(sockets())
    return seen


@pytest.mark.parametrize("level", ["info", "debug", "trace"])
def test_no_token_appears_in_any_log_line(level):
    """Uvicorn's access log and error log, at info and at the more talkative levels an operator
    turns on to debug: tokens (or any 20-character piece of one) never show; ?token= shows as ***."""
    with running_server(args=["--log-level", level, "--access-log"]) as (base_url, process):
        used = use_every_way_a_token_travels(base_url)
    log = server_log(process)
    # The log was really on, and really saw the requests that carried tokens.
    assert '"POST /auth/login HTTP/1.1" 200' in log, log
    assert '"WebSocket /ws?token=***" [accepted]' in log, log
    assert '"WebSocket /ws?format=json&token=***" [accepted]' in log, log
    assert "/auth/messages?token=*** HTTP/1.1" in log, log
    assert "/health?access_token=***&refresh_token=*** HTTP/1.1" in log, log
    assert "/nowhere?token=***" in log, log
    assert '"WebSocket /ws?tok%65n=***" [accepted]' in log, log
    leaks = leaked_parts(log, used)
    leaking_lines = [line for line in log.splitlines() if any(part in line for part in leaks)]
    assert not leaks, "tokens in the log:\n" + "\n".join(line[:300] for line in leaking_lines[:10])


# ---------------------------------------------------------------- a websocket dies with its token


@pytest.mark.parametrize("way", ["query", "subprotocol"])
def test_a_websocket_is_closed_with_4001_when_its_token_expires(server, http, way):
    """A message sent before expiry is stored and delivered; at `exp` the server closes with
    4001 "Token expired"; nothing the client sent after the server closed it is stored."""
    alice = register_and_login(http)
    bob = register_and_login(http)
    start = history(http, bob[1])[-1]["id"] if history(http, bob[1]) else 0
    token = access_token(alice[0], 2)
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]

    async def scenario():
        async with open_socket(server, bob[1]["access_token"], "query", format="json") as b:
            async with open_socket(server, token, way, format="json") as a:
                sent, echoed = [], []
                await a.send("before expiry")
                sent.append("before expiry")
                frame = json.loads(await asyncio.wait_for(a.recv(), 10))
                assert (frame["username"], frame["text"]) == (alice[0], "before expiry")
                echoed.append(frame["text"])

                give_up_at = expires_at + 3

                async def keep_sending():
                    """A burst of frames that reaches the server around `exp`, so that the server
                    still has some to read after its expiry timer fired; then more, right up to the
                    close, and after it if the client could."""
                    n = 0
                    with contextlib.suppress(ConnectionClosed):
                        await asyncio.sleep(max(0.0, expires_at - 0.03 - time.time()))
                        for _ in range(200):
                            text = f"late {n}"
                            await a.send(text)
                            sent.append(text)
                            n += 1
                        while time.time() < give_up_at:
                            await asyncio.sleep(0.02)
                            text = f"late {n}"
                            await a.send(text)
                            sent.append(text)
                            n += 1

                sender = asyncio.create_task(keep_sending())
                closed_at = None
                try:
                    while time.time() < give_up_at:
                        raw = await asyncio.wait_for(a.recv(), max(0.01, give_up_at - time.time()))
                        echoed.append(json.loads(raw)["text"])
                except ConnectionClosed:
                    closed_at = time.time()
                except asyncio.TimeoutError:
                    pass
                await asyncio.wait_for(sender, 10)
                assert closed_at is not None, "still open 3 s after the token expired"
                code, reason = a.close_code, a.close_reason

            # Bob stays: what he got from alice is exactly what was stored, and nothing more comes.
            await asyncio.sleep(0.5)
            from_alice = []
            with pytest.raises(asyncio.TimeoutError):
                while True:
                    frame = json.loads(await asyncio.wait_for(b.recv(), 0.3))
                    if frame["username"] == alice[0]:
                        from_alice.append(frame["text"])
            return code, reason, closed_at, sent, echoed, from_alice

    code, reason, closed_at, sent, echoed, bob_got = run(scenario())
    assert (code, reason) == (4001, "Token expired")
    assert expires_at - 0.3 <= closed_at <= expires_at + 2.0, (closed_at, expires_at)  # at exp, not before
    stored = [m["text"] for m in history(http, bob[1], after=start) if m["username"] == alice[0]]
    assert stored == bob_got
    assert stored[0] == "before expiry"
    assert stored == sent[:len(stored)]  # in order, none skipped
    # Everything stored had been echoed to alice before her close, but for at most one frame
    # that was being stored at the very moment the token expired.
    assert echoed == stored[:len(echoed)], (echoed, stored)
    assert len(stored) - len(echoed) <= 1, f"{len(stored)} stored, but only {len(echoed)} echoed before the close"


def test_a_token_expired_within_the_leeway_is_accepted_and_closed_with_4001_at_once(server, http):
    """The server decodes with 10 s of leeway for clock skew: a token 3 s past its exp still opens
    a socket, which its expiry timer then closes at once."""
    name, _tokens = register_and_login(http)
    token = access_token(name, -3)

    async def scenario():
        opened = time.monotonic()
        async with open_socket(server, token, "subprotocol") as ws:
            result = await closed_with(ws, seconds=3)
        return result, time.monotonic() - opened

    (code, reason), seconds = run(scenario())
    assert (code, reason) == (4001, "Token expired")
    assert seconds < 2
