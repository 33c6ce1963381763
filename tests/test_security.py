"""Trying to break in: whatever a client sends, the service answers with a clean error, stores
nothing it should not, leaks nothing, and lets no forged, expired or reused token through."""

import asyncio
import base64
import concurrent.futures
import json
import os
import secrets
import subprocess
import sys
import threading
import time

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import chat
from conftest import PASSWORD, ROOT, free_port, register_and_login, unique_name, ws_url

# Signing with HS512 on purpose (it must be refused) makes PyJWT warn about the key's length.
pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")

# ---------------------------------------------------------------- helpers


def post_raw(http, path, content):
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


def post_json(http, path, body):
    # json.dumps escapes non-ASCII, so even a lone surrogate ("\ud800") goes out as valid JSON.
    return post_raw(http, path, json.dumps(body).encode())


def register(http, username, password=PASSWORD):
    return post_json(http, "/auth/register", {"username": username, "password": password})


def login(http, username, password=PASSWORD):
    return post_json(http, "/auth/login", {"username": username, "password": password})


def refresh(http, token):
    return post_json(http, "/auth/refresh", {"refresh_token": token})


def logout(http, token):
    return post_json(http, "/auth/logout", {"refresh_token": token})


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def assert_error(response, status, *words, leaks=()):
    """A JSON {"detail": sentence} error with this status, naming each word, showing no leak."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str) and body["detail"]
    for word in words:
        assert word.lower() in body["detail"].lower(), (word, body)
    for secret in ("Traceback", "SELECT ", "INSERT ", chat.SECRET_KEY, PASSWORD, *leaks):
        assert secret not in response.text


def db_value(client, query, **values):
    """One value from the app's own database, read on the TestClient's event loop."""
    return client.portal.call(chat.database.fetch_val, query, values)


def count_users_named(client, username):
    return db_value(client, "SELECT count(*) FROM users WHERE username = :username", username=username)


def count_refresh_tokens(client, username):
    return db_value(client, "SELECT count(*) FROM refresh_tokens WHERE username = :username", username=username)


# ---------------------------------------------------------------- 1. input rules

MALFORMED_CREDENTIALS = [
    (b"username=bob&password=secret123", ["JSON"]),
    (b"{\"username\": \"bob\",", ["JSON"]),
    (b"", ["JSON"]),
    (b"\xff\xfe not utf-8", ["JSON"]),
    (b"[" * 5000, ["JSON"]),  # nesting deep enough to exhaust a recursive parser
    (b"[\"bob\", \"secret123\"]", ["object"]),
    (b"42", ["object"]),
    (b"\"bob\"", ["object"]),
    (b"null", ["object"]),
    (b"{}", ["username", "required"]),
    (b"{\"username\": \"bob\"}", ["password", "required"]),
    (b"{\"password\": \"secret123\"}", ["username", "required"]),
    (b"{\"username\": 12345, \"password\": \"secret123\"}", ["username", "string"]),
    (b"{\"username\": null, \"password\": \"secret123\"}", ["username", "string"]),
    (b"{\"username\": [\"bob\"], \"password\": \"secret123\"}", ["username", "string"]),
    (b"{\"username\": {\"$ne\": \"\"}, \"password\": \"secret123\"}", ["username", "string"]),
    (b"{\"username\": \"bob\", \"password\": 12345678}", ["password", "string"]),
    (b"{\"username\": \"bob\", \"password\": null}", ["password", "string"]),
    (b"{\"username\": \"bob\", \"password\": true}", ["password", "string"]),
]


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
@pytest.mark.parametrize("content, words", MALFORMED_CREDENTIALS)
def test_malformed_credentials_get_400_saying_what_is_wrong(client, path, content, words):
    assert_error(post_raw(client, path, content), 400, *words)


@pytest.mark.parametrize("path", ["/auth/refresh", "/auth/logout"])
@pytest.mark.parametrize("content, words", [
    (b"not json", ["JSON"]),
    (b"[\"token\"]", ["object"]),
    (b"{}", ["refresh_token", "required"]),
    (b"{\"refresh_token\": 1}", ["refresh_token", "string"]),
    (b"{\"refresh_token\": null}", ["refresh_token", "string"]),
    (b"{\"refresh_token\": [\"a.b.c\"]}", ["refresh_token", "string"]),
])
def test_malformed_token_bodies_get_400_saying_what_is_wrong(client, path, content, words):
    assert_error(post_raw(client, path, content), 400, *words)


BAD_USERNAMES = [
    "",
    "a" * 21,
    "bob:smith",
    "bob smith",
    "bob\nsmith",
    "bob\n",
    " bob",
    "bob\t",
    "héllo",
    "日本語",
    "Ａlice",  # a full-width letter
    "bob\u200b",  # a zero-width space
    "bob\x00",
    "x' OR '1'='1",
    "admin'--",
    "bob\"; DROP TABLE users; --",
    "../etc/passwd",
    "<b>bob</b>",
]


@pytest.mark.parametrize("username", BAD_USERNAMES)
def test_bad_usernames_are_refused_and_nothing_is_created(client, username):
    assert_error(register(client, username), 400, "username")
    assert_error(login(client, username), 401, "Invalid username or password")
    if "\x00" not in username:  # PostgreSQL cannot even compare a text with a NUL in it
        assert count_users_named(client, username) == 0


def test_a_twenty_character_name_of_every_allowed_kind_is_accepted(client):
    username = f"A.b_c-{secrets.token_hex(4)}".ljust(20, "9")
    assert register(client, username).status_code == 200
    assert login(client, username).status_code == 200


BAD_PASSWORDS = [
    ("1234567", "8"),  # 7 characters
    ("ééééééé", "8"),  # 7 characters, 14 bytes: characters count, not bytes
    ("a" * 73, "72"),
    ("€" * 25, "72"),  # 25 characters, 75 bytes
    ("€" * 24 + "a", "72"),  # 73 bytes
]


@pytest.mark.parametrize("password, words", BAD_PASSWORDS)
def test_bad_passwords_are_refused_and_the_name_stays_free(client, password, words):
    username = unique_name()
    assert_error(register(client, username, password), 400, "password", words, leaks=[password])
    assert_error(login(client, username, password), 401, "Invalid username or password")
    assert count_users_named(client, username) == 0
    assert register(client, username).status_code == 200


@pytest.mark.parametrize("password", ["a" * 8, "é" * 30, "a" * 72, "€" * 24, "🙂" * 18, "pass word\ttab"])
def test_passwords_up_to_72_bytes_are_accepted_and_used_whole(client, password):
    username = unique_name()
    assert register(client, username, password).status_code == 200
    assert login(client, username, password).status_code == 200
    # Not truncated: a different last character, or one more, is a wrong password.
    for wrong in (password[:-1] + "!", password + "a"):
        assert_error(login(client, username, wrong), 401, "Invalid username or password")


@pytest.mark.parametrize("path, body", [
    ("/auth/register", {"username": "bob\ud800", "password": PASSWORD}),
    ("/auth/register", {"username": unique_name(), "password": "secret-\ud800-123"}),
    ("/auth/login", {"username": "bob\ud800", "password": PASSWORD}),
    ("/auth/login", {"username": "bob", "password": "secret\udfff123"}),
    ("/auth/refresh", {"refresh_token": "a.b.c\ud800"}),
    ("/auth/logout", {"refresh_token": "a.b.c\ud800"}),
])
def test_lone_surrogates_are_refused_as_invalid_text(client, path, body):
    """JSON can spell "\\ud800", which is no character at all: no database can store it."""
    field = next(name for name, value in body.items() if not value.isprintable())
    assert_error(post_json(client, path, body), 400, field)


def test_login_with_a_nul_in_the_name_is_just_a_failed_login(client):
    """PostgreSQL rejects a NUL in any text; the name can never exist, so this is a plain 401."""
    assert_error(login(client, "bob\x00"), 401, "Invalid username or password")
    assert_error(login(client, "\x00"), 401, "Invalid username or password")


def test_usernames_are_unique_whatever_the_case_and_kept_as_registered(client):
    username = "Alice" + secrets.token_hex(4)
    assert register(client, username).status_code == 200
    for variant in (username.lower(), username.upper(), username.swapcase()):
        assert_error(register(client, variant, "another-password"), 400, "Username already exists")
        response = login(client, variant)
        assert response.status_code == 200
        assert jwt.decode(response.json()["access_token"], chat.SECRET_KEY, algorithms=["HS256"])["sub"] == username
    assert_error(login(client, username.lower(), "another-password"), 401, "Invalid username or password")


def test_concurrent_registrations_of_one_name_in_different_cases_let_exactly_one_in(server):
    username = "Race" + secrets.token_hex(4)
    variants = [username, username.lower(), username.upper(), username.swapcase(), username, username.lower()]
    responses = all_at_once(server, [lambda http, name=name: register(http, name) for name in variants])
    assert sorted(response.status_code for response in responses) == [200] + [400] * 5
    for response in responses:
        if response.status_code == 400:
            assert response.json() == {"detail": "Username already exists"}


def all_at_once(base_url, calls):
    """Run each call(http) in its own thread, each with its own connection, released together."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        with httpx.Client(base_url=base_url, timeout=30) as http:
            http.get("/health")  # connect first, so that the requests themselves start together
            barrier.wait()
            return call(http)

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# ---------------------------------------------------------------- 2. login


@pytest.fixture
def checked_hashes(monkeypatch):
    """The password hashes the app checks, recorded."""
    checked = []
    real = chat.password_matches

    def spy(password, password_hash):
        checked.append(password_hash)
        return real(password, password_hash)

    monkeypatch.setattr(chat, "password_matches", spy)
    return checked


@pytest.mark.parametrize("who, password", [
    ("unknown", PASSWORD),
    ("known", "wrong-password"),
    ("known", "x" * 200),  # over bcrypt's 72 bytes: refused, but still after a hash check
    ("unknown", "x" * 200),
    ("unknown", "é" * 100),
])
def test_failed_logins_look_alike_and_always_check_a_hash(client, user, checked_hashes, who, password):
    username = user[0] if who == "known" else unique_name("ghost")
    assert_error(login(client, username, password), 401, "Invalid username or password", leaks=[password])
    assert len(checked_hashes) == 1, "an unknown name must cost a bcrypt check, like a wrong password"
    assert checked_hashes[0].startswith("$2")


# ---------------------------------------------------------------- 3. tokens


def claims_of(token):
    return jwt.decode(token, chat.SECRET_KEY, algorithms=["HS256"], options={"verify_exp": False})


def sign(claims, key=None, algorithm="HS256"):
    return jwt.encode(claims, key or chat.SECRET_KEY, algorithm=algorithm)


def b64_json(value):
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def without(claims, name):
    return {key: value for key, value in claims.items() if key != name}


def forge(kind, token):
    """A token built from a real one: same claims, but broken in one way."""
    claims = claims_of(token)
    header, _, signature = token.split(".")
    now = int(time.time())
    forgeries = {
        "alg none": lambda: f"{b64_json({'alg': 'none', 'typ': 'JWT'})}.{b64_json(claims)}.",
        "wrong key": lambda: sign(claims, key="not-the-secret-key-" + secrets.token_hex(16)),
        "HS384 with the right key": lambda: sign(claims, algorithm="HS384"),
        "HS512 with the right key": lambda: sign(claims, algorithm="HS512"),
        "expired": lambda: sign({**claims, "iat": now - 7200, "exp": now - 60}),
        "no type": lambda: sign(without(claims, "type")),
        "no iat": lambda: sign(without(claims, "iat")),
        "no exp": lambda: sign(without(claims, "exp")),
        "no jti": lambda: sign(without(claims, "jti")),
        "numeric sub": lambda: sign({**claims, "sub": 12345}),
        "tampered payload": lambda: f"{header}.{b64_json({**claims, 'sub': 'someone-else'})}.{signature}",
        "garbage": lambda: "garbage",
        "dots only": lambda: "..",
        "empty": lambda: "",
    }
    return forgeries[kind]()


FORGERIES = ["alg none", "wrong key", "HS384 with the right key", "HS512 with the right key", "expired",
             "no type", "no iat", "no exp", "numeric sub", "tampered payload", "garbage", "dots only", "empty"]


def test_token_payloads_carry_sub_exp_type_iat_and_refresh_tokens_a_unique_jti(client, user):
    username, tokens = user
    access, refresh_claims = claims_of(tokens["access_token"]), claims_of(tokens["refresh_token"])
    assert {"sub", "exp", "type", "iat"} <= set(access) and access["type"] == "access"
    assert {"sub", "exp", "type", "iat", "jti"} <= set(refresh_claims) and refresh_claims["type"] == "refresh"
    assert access["sub"] == refresh_claims["sub"] == username
    assert access["iat"] < access["exp"] and abs(access["iat"] - time.time()) < 60
    second_login = login(client, username).json()["refresh_token"]
    rotated = refresh(client, tokens["refresh_token"]).json()["refresh_token"]
    jtis = {claims_of(token)["jti"] for token in (tokens["refresh_token"], second_login, rotated)}
    assert len(jtis) == 3 and all(len(jti) >= 16 for jti in jtis)


def assert_rejected_bearer(response):
    assert_error(response, 401, "Invalid or expired token")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("kind", FORGERIES + ["refresh token"])
def test_forged_and_wrong_type_access_tokens_are_refused_over_http(client, user, kind):
    _, tokens = user
    token = tokens["refresh_token"] if kind == "refresh token" else forge(kind, tokens["access_token"])
    assert_rejected_bearer(client.get("/auth/messages", headers=bearer(token)))
    assert client.get("/auth/messages", headers=bearer(tokens["access_token"])).status_code == 200


@pytest.mark.parametrize("authorization", [None, "", "Basic Ym9iOnNlY3JldA==", "Bearer", "Bearer ", "Token x.y.z",
                                           "Bearer a.b.c", "Bearer Bearer"])
def test_missing_or_malformed_authorization_headers_are_refused(client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_rejected_bearer(client.get("/auth/messages", headers=headers))


def test_an_access_token_without_its_scheme_is_refused(client, user):
    assert_rejected_bearer(client.get("/auth/messages", headers={"Authorization": user[1]["access_token"]}))


@pytest.fixture(scope="module")
def server_tokens(server):
    with httpx.Client(base_url=server, timeout=10) as http:
        return register_and_login(http)[1]


async def close_code(url):
    """The code the server closes a websocket with, after a successful handshake."""
    async with connect(url, open_timeout=10, close_timeout=5) as websocket:
        try:
            frame = await asyncio.wait_for(websocket.recv(), timeout=10)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        return f"a frame instead of a close: {frame!r}"


@pytest.mark.parametrize("kind", FORGERIES + ["refresh token"])
def test_forged_and_wrong_type_tokens_get_the_websocket_closed_with_1008(server, server_tokens, kind):
    tokens = server_tokens
    token = tokens["refresh_token"] if kind == "refresh token" else forge(kind, tokens["access_token"])
    assert asyncio.run(close_code(ws_url(server, token))) == 1008


def test_a_websocket_without_a_token_is_closed_with_1008(server):
    assert asyncio.run(close_code(server.replace("http://", "ws://") + "/ws")) == 1008


@pytest.mark.parametrize("kind", FORGERIES + ["no jti", "access token"])
def test_forged_and_wrong_type_refresh_tokens_are_refused_and_harm_nothing(client, user, kind):
    _, tokens = user
    token = tokens["access_token"] if kind == "access token" else forge(kind, tokens["refresh_token"])
    assert_error(refresh(client, token), 401, "Invalid refresh token")
    assert refresh(client, tokens["refresh_token"]).status_code == 200  # not spent, not revoked


@pytest.mark.parametrize("kind", ["alg none", "wrong key", "HS512 with the right key", "no jti", "tampered payload",
                                  "garbage", "empty", "access token"])
def test_logout_refuses_forged_and_wrong_type_tokens(client, user, kind):
    _, tokens = user
    token = tokens["access_token"] if kind == "access token" else forge(kind, tokens["refresh_token"])
    assert_error(logout(client, token), 401, "Invalid refresh token")
    assert refresh(client, tokens["refresh_token"]).status_code == 200  # still valid


# ---------------------------------------------------------------- 4. refresh rotation


def test_a_refresh_token_works_once(client, user):
    _, tokens = user
    response = refresh(client, tokens["refresh_token"])
    assert response.status_code == 200
    rotated = response.json()
    assert set(rotated) == {"access_token", "refresh_token", "token_type"} and rotated["token_type"] == "bearer"
    assert client.get("/auth/messages", headers=bearer(rotated["access_token"])).status_code == 200
    assert_error(refresh(client, tokens["refresh_token"]), 401, "Invalid refresh token")


def test_reusing_a_spent_refresh_token_revokes_every_refresh_token_of_the_user(client, user, monkeypatch):
    import chat

    monkeypatch.setattr(chat, "REFRESH_REUSE_GRACE_SECONDS", 0)  # as if the grace had passed
    username, first = user
    sibling = login(client, username).json()  # another device's session
    rotated = refresh(client, first["refresh_token"]).json()
    assert_error(refresh(client, first["refresh_token"]), 401, "Invalid refresh token")  # the thief, or the victim
    for revoked in (rotated, sibling):
        assert_error(refresh(client, revoked["refresh_token"]), 401, "Invalid refresh token")
    assert count_refresh_tokens(client, username) == 0
    assert refresh(client, login(client, username).json()["refresh_token"]).status_code == 200  # can log in again


@pytest.mark.parametrize("round_number", range(5))
def test_concurrent_refreshes_with_one_token_let_exactly_one_through(server, round_number):
    with httpx.Client(base_url=server, timeout=10) as http:
        _, tokens = register_and_login(http)
    responses = all_at_once(server, [lambda http: refresh(http, tokens["refresh_token"])] * 4)
    assert sorted(response.status_code for response in responses) == [200, 401, 401, 401]
    # The losers are within the reuse grace: they revoke nothing, so the winner's new token works.
    (winner,) = [response.json() for response in responses if response.status_code == 200]
    with httpx.Client(base_url=server, timeout=10) as http:
        assert refresh(http, winner["refresh_token"]).status_code == 200


def test_a_used_refresh_token_shown_again_within_the_grace_is_a_plain_401(client, user):
    username, first = user
    rotated = refresh(client, first["refresh_token"]).json()
    assert_error(refresh(client, first["refresh_token"]), 401, "Invalid refresh token")
    assert refresh(client, rotated["refresh_token"]).status_code == 200  # nothing was revoked


def test_a_logged_out_refresh_token_shown_again_counts_as_theft(client, user):
    username, first = user
    sibling = login(client, username).json()
    assert logout(client, first["refresh_token"]).status_code == 200
    assert_error(refresh(client, first["refresh_token"]), 401, "Invalid refresh token")
    assert_error(refresh(client, sibling["refresh_token"]), 401, "Invalid refresh token")
    assert count_refresh_tokens(client, username) == 0


def test_logging_out_with_an_exchanged_refresh_token_ends_the_whole_chain(client, user):
    # refresh(R1) gives R2; logout(R1) must not leave R2 alive for a thief (RFC 9700 4.14).
    username, first = user
    rotated = refresh(client, first["refresh_token"]).json()
    assert logout(client, first["refresh_token"]).status_code == 200
    assert_error(refresh(client, rotated["refresh_token"]), 401, "Invalid refresh token")
    assert_error(refresh(client, first["refresh_token"]), 401, "Invalid refresh token")


def test_logging_out_twice_does_not_end_other_sessions(client, user):
    username, first = user
    sibling = login(client, username).json()
    for _ in range(2):
        assert logout(client, first["refresh_token"]).status_code == 200
    assert refresh(client, sibling["refresh_token"]).status_code == 200


def test_logout_revokes_the_refresh_token_and_is_idempotent(client, user):
    _, tokens = user
    for _ in range(2):
        response = logout(client, tokens["refresh_token"])
        assert response.status_code == 200 and response.json() == {"message": "Logged out"}
    assert_error(refresh(client, tokens["refresh_token"]), 401, "Invalid refresh token")


def test_logout_with_garbage_is_401(client):
    assert_error(logout(client, "garbage"), 401, "Invalid refresh token")


def test_expired_refresh_token_rows_are_purged(client, user):
    username, _ = user
    jti = "expired-" + secrets.token_hex(8)
    client.portal.call(
        chat.database.execute,
        "INSERT INTO refresh_tokens (jti, username, expires_at) VALUES (:jti, :username, :expires_at)",
        {"jti": jti, "username": username, "expires_at": int(time.time()) - 60},
    )
    assert db_value(client, "SELECT count(*) FROM refresh_tokens WHERE jti = :jti", jti=jti) == 1
    assert login(client, username).status_code == 200
    assert db_value(client, "SELECT count(*) FROM refresh_tokens WHERE jti = :jti", jti=jti) == 0
    assert db_value(client, "SELECT count(*) FROM refresh_tokens WHERE expires_at < :now", now=int(time.time())) == 0


# ---------------------------------------------------------------- 5. configuration


def run_with_env(command, **env):
    """Run a command in the project with these variables changed (None removes one)."""
    full_env = {**os.environ, **env}
    full_env = {name: value for name, value in full_env.items() if value is not None}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60)


def import_chat(**env):
    return run_with_env([sys.executable, "-c", "import chat"], **env)


def assert_one_clear_line(result, variable):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr


BAD_CONFIGURATION = [
    ("SECRET_KEY", "your-secret-key-change-this-in-production"),
    ("ACCESS_TOKEN_EXPIRE_MINUTES", "abc"),
    ("ACCESS_TOKEN_EXPIRE_MINUTES", "0"),
    ("ACCESS_TOKEN_EXPIRE_MINUTES", "1.5"),
    ("REFRESH_TOKEN_EXPIRE_DAYS", "-1"),
    ("REFRESH_TOKEN_EXPIRE_DAYS", "7 days"),
    ("BCRYPT_ROUNDS", "2"),
    ("BCRYPT_ROUNDS", "99"),
    ("DATABASE_URL", "mysql://x"),
    ("DATABASE_URL", "chat.db"),
    ("BROADCAST_URL", "http://x"),
    ("LOGIN_LIMIT", "lots"),
    ("REGISTER_LIMIT", "20 per fortnight"),
    ("MESSAGE_LIMIT", "-1 per second"),
    ("MAX_SOCKETS_PER_USER", "ten"),
]


@pytest.mark.parametrize("variable, value", BAD_CONFIGURATION)
def test_bad_configuration_stops_import_with_one_line_naming_the_variable(variable, value):
    assert_one_clear_line(import_chat(**{variable: value}), variable)


def test_uvicorn_with_bad_configuration_exits_with_the_line_and_no_traceback():
    command = [sys.executable, "-m", "uvicorn", "chat:app", "--host", "127.0.0.1", "--port", str(free_port())]
    assert_one_clear_line(run_with_env(command, ACCESS_TOKEN_EXPIRE_MINUTES="abc"), "ACCESS_TOKEN_EXPIRE_MINUTES")


# ---------------------------------------------------------------- 6. errors and limits


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/no/such/path", 404),
    ("POST", "/auth/nothing", 404),
    ("GET", "/auth/../../etc/passwd", 404),
    ("GET", "/auth/register", 405),
    ("PUT", "/auth/login", 405),
    ("DELETE", "/auth/messages", 405),
    ("POST", "/health", 405),
])
def test_unknown_paths_and_wrong_methods_get_json_errors(client, method, path, status):
    assert_error(client.request(method, path), status)


LIMIT = 64 * 1024


def padded_registration(size):
    """A valid registration body of exactly `size` bytes."""
    body = {"username": unique_name(), "password": PASSWORD, "padding": ""}
    body["padding"] = "x" * (size - len(json.dumps(body)))
    content = json.dumps(body).encode()
    assert len(content) == size
    return content


def in_chunks(content, size=4096):
    """A generator body: httpx sends it chunked, with no Content-Length."""
    return (content[start:start + size] for start in range(0, len(content), size))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_over_64_kib_get_413_and_64_kib_is_fine(http, chunked):
    for size, status in [(LIMIT + 1, 413), (LIMIT, 200), (10 * LIMIT, 413)]:
        content = padded_registration(size)
        response = post_raw(http, "/auth/register", in_chunks(content) if chunked else content)
        if status == 413:
            assert_error(response, 413, "64 KiB")
        else:
            assert response.status_code == 200, response.text


@pytest.mark.parametrize("function, method, path, body", [
    ("find_user", "POST", "/auth/login", {"username": "bob", "password": PASSWORD}),
    ("names_like", "POST", "/auth/register", {"username": "bob" + secrets.token_hex(4), "password": PASSWORD}),
    ("fetch_messages", "GET", "/auth/messages", None),
    ("issue_tokens", "POST", "/auth/login", None),
])
def test_an_unexpected_error_is_a_plain_500(client, user, monkeypatch, function, method, path, body):
    username, tokens = user
    leaky = f"SELECT password FROM users WHERE secret = '{chat.SECRET_KEY}' AND password = '{PASSWORD}'"

    async def explode(*args, **kwargs):
        raise RuntimeError(leaky)

    monkeypatch.setattr(chat, function, explode)
    body = body or {"username": username, "password": PASSWORD}
    headers = bearer(tokens["access_token"])
    response = client.request(method, path, json=body if method == "POST" else None, headers=headers)
    assert_error(response, 500)
    assert response.json() == {"detail": "Internal server error"}


def test_health_answers_ok(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# ---------------------------------------------------------------- 7. OpenAPI document

# Each HTTP route, with the error statuses its description must list besides 200.
ROUTES = {
    ("post", "/auth/register"): {"400", "413"},
    ("post", "/auth/login"): {"400", "401", "413"},
    ("post", "/auth/refresh"): {"400", "401", "413"},
    ("post", "/auth/logout"): {"400", "401", "413"},
    ("get", "/auth/messages"): {"400", "401"},
    ("get", "/health"): {"503"},
}


def json_schema_of(described):
    return described["content"]["application/json"]["schema"]


def test_openapi_json_is_json_and_describes_every_route_with_bodies_and_responses(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    document = json.loads(response.text)
    assert document["openapi"].startswith("3.")
    for (method, path), errors in ROUTES.items():
        operation = document["paths"][path][method]
        responses = {str(code): described for code, described in operation["responses"].items()}
        assert {"200", *errors} <= set(responses), (method, path)
        assert json_schema_of(responses["200"])
        if method == "post":
            assert json_schema_of(operation["requestBody"])
    messages = document["paths"]["/auth/messages"]["get"]
    assert {parameter["name"] for parameter in messages["parameters"]} == {"limit", "before", "after"}
    assert messages["security"]


# ---------------------------------------------------------------- 8. texts kept exactly

TRICKY_TEXTS = [
    "x' OR '1'='1",
    "'; DROP TABLE messages; --",
    'Robert"); DELETE FROM users WHERE ("1"="1',
    "\\' \\\" \\\\ %s %% {0} ${HOME} $1 ? :text",
    "<script>alert('x')</script> &amp; <b>bold</b>",
    "\u202eright-to-left override\u202c and a \u200fright-to-left mark",
    "שלום עולם مرحبا",
    "e\u0301\u0302\u0303 combining marks",
    "👩\u200d👩\u200d👧\u200d👦 a family joined by zero-width joiners",
    "🙂🚀\U0001F1FA\U0001F1F8 emoji and a flag",
    "\ufeffbyte order mark, \u200bzero-width space",
    "  kept with its spaces  ",
    "two\nlines\r\nand\ta tab",
    "\U0010fffd from the last plane",
    "€" * 1000,  # at the 1000-character limit, 3000 bytes
    "\x1b[31mred\x1b[0m, a bell\x07, a backspace\x08, DEL\x7f, C1\x85\x9b and \u2066isolates\u2069",
    "hi\n<victim>: I agree",
]
IGNORED_TEXTS = ["with a \x00 inside", "\x00", "", "  \n\t ", "\x1b\x07\u202e\u200b\r"]
# What the server makes of the texts it cleans: control characters other than newline and tab,
# and the invisible characters that reorder or hide text, are dropped (zero-width joiners stay).
CLEANED_TEXTS = {
    "\u202eright-to-left override\u202c and a \u200fright-to-left mark": "right-to-left override and a right-to-left mark",
    "\ufeffbyte order mark, \u200bzero-width space": "byte order mark, zero-width space",
    "two\nlines\r\nand\ta tab": "two\nlines\nand\ta tab",
    "\x1b[31mred\x1b[0m, a bell\x07, a backspace\x08, DEL\x7f, C1\x85\x9b and \u2066isolates\u2069": (
        "[31mred[0m, a bell, a backspace, DEL, C1 and isolates"
    ),
    "hi\n<victim>: I agree": "hi\n<victim>: I agree",  # newline kept: a frame is one message
}


async def receive_until(websocket, is_last):
    """Frames received up to and including the first for which `is_last(frame)` holds."""
    frames = []
    while not frames or not is_last(frames[-1]):
        frames.append(await asyncio.wait_for(websocket.recv(), timeout=10))
    return frames


async def chat_through_websockets(base_url, token, username):
    """Send every tricky text, each after a frame that must be ignored, then a marker; returns the
    frames of a format=json socket, the lines of a plain one, and the marker."""
    marker = "end " + secrets.token_hex(4)
    async with connect(ws_url(base_url, token, format="json")) as as_json, connect(ws_url(base_url, token)) as plain:
        for number, text in enumerate(TRICKY_TEXTS):
            await as_json.send(IGNORED_TEXTS[number % len(IGNORED_TEXTS)])
            await as_json.send(text)
        await as_json.send(marker)
        lines = await receive_until(plain, lambda line: line.endswith(marker))
        frames = [json.loads(frame) for frame in await receive_until(as_json, lambda frame: json.loads(frame)["text"] == marker)]
    return frames, lines, marker


def test_tricky_texts_are_kept_but_for_unsafe_characters_and_nul_texts_are_dropped(server, http):
    registered = "Mixed" + secrets.token_hex(4)
    _, tokens = register_and_login(http, registered)
    tokens = login(http, registered.lower()).json()  # logged in under another case: the name stays as registered
    frames, lines, marker = asyncio.run(chat_through_websockets(server, tokens["access_token"], registered))
    expected = [CLEANED_TEXTS.get(text, text) for text in TRICKY_TEXTS] + [marker]
    assert [frame["text"] for frame in frames] == expected
    assert {frame["username"] for frame in frames} == {registered}
    assert lines == [f"{registered}: {text}" for text in expected]
    first_id = frames[0]["id"]
    history = http.get(f"/auth/messages?after={first_id - 1}&limit=1000", headers=bearer(tokens["access_token"]))
    assert history.status_code == 200
    assert [(row["username"], row["text"]) for row in history.json()] == [(registered, text) for text in expected]
    assert [row["id"] for row in history.json()] == [frame["id"] for frame in frames]
