"""The seed's HTTP API, exactly as the seed document describes it, through the in-process app."""

import datetime
import os
import re
import subprocess
import sys
import time

import jwt
import pytest

import chat
from conftest import PASSWORD, ROOT, register_and_login, running_server, unique_name


def bearer(tokens):
    return {"Authorization": f"Bearer {tokens['access_token']}"}


def test_register_returns_the_seed_message(client):
    response = client.post("/auth/register", json={"username": unique_name(), "password": PASSWORD})
    assert response.status_code == 200
    assert response.json() == {"message": "Registration successful"}


def test_register_twice_is_refused(client):
    name = unique_name()
    client.post("/auth/register", json={"username": name, "password": PASSWORD})
    response = client.post("/auth/register", json={"username": name, "password": "another-password"})
    assert response.status_code == 400
    assert response.json() == {"detail": "Username already exists"}


def test_login_returns_a_bearer_token_pair(client):
    name, tokens = register_and_login(client)
    assert set(tokens) == {"access_token", "refresh_token", "token_type"}
    assert tokens["token_type"] == "bearer"
    claims = jwt.decode(tokens["access_token"], chat.SECRET_KEY, algorithms=["HS256"])
    assert claims["sub"] == name


@pytest.mark.parametrize("username, password", [("nobody_here", PASSWORD), (None, "wrong-password")])
def test_login_refuses_unknown_user_and_wrong_password_alike(client, user, username, password):
    response = client.post("/auth/login", json={"username": username or user[0], "password": password})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid username or password"}


def test_token_lifetimes_follow_the_configuration(client, user):
    _, tokens = user
    access = jwt.decode(tokens["access_token"], chat.SECRET_KEY, algorithms=["HS256"])
    refresh = jwt.decode(tokens["refresh_token"], chat.SECRET_KEY, algorithms=["HS256"])
    now = time.time()
    assert abs(access["exp"] - now - 15 * 60) < 30
    assert abs(refresh["exp"] - now - 7 * 86400) < 30


def test_lifetimes_come_from_the_environment():
    code = "import chat; print(chat.ACCESS_TOKEN_EXPIRE_MINUTES, chat.REFRESH_TOKEN_EXPIRE_DAYS, chat.BCRYPT_ROUNDS)"
    env = {**os.environ, "ACCESS_TOKEN_EXPIRE_MINUTES": "5", "REFRESH_TOKEN_EXPIRE_DAYS": "2", "BCRYPT_ROUNDS": "5"}
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert output.stdout.split() == ["5", "2", "5"]


def test_refresh_returns_a_new_working_pair(client, user):
    _, tokens = user
    response = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 200
    fresh = response.json()
    assert fresh["token_type"] == "bearer"
    assert fresh["refresh_token"] != tokens["refresh_token"]
    assert client.get("/auth/messages", headers=bearer(fresh)).status_code == 200


def test_refresh_with_garbage_is_refused(client):
    response = client.post("/auth/refresh", json={"refresh_token": "garbage"})
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid refresh token"}


def test_messages_need_a_valid_access_token(client, user):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {user[1]['refresh_token']}"}):
        response = client.get("/auth/messages", headers=headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "Invalid or expired token"}
        assert response.headers["www-authenticate"] == "Bearer"


def store(client, username, *texts):
    """Store messages directly; returns their ids."""
    return [client.portal.call(chat.insert_messages, [(username, text)], chat.iso_utc(time.time()))[0] for text in texts]


def test_messages_are_listed_ascending_with_seed_fields_and_their_time(client, user):
    name, tokens = user
    before = datetime.datetime.now(datetime.timezone.utc)
    ids = store(client, name, "first", "second", "third")
    after = datetime.datetime.now(datetime.timezone.utc)
    response = client.get("/auth/messages", headers=bearer(tokens))
    assert response.status_code == 200
    messages = response.json()
    assert [{key: m[key] for key in ("id", "username", "text", "type")} for m in messages[-3:]] == [
        {"id": ids[0], "username": name, "text": "first", "type": "message"},
        {"id": ids[1], "username": name, "text": "second", "type": "message"},
        {"id": ids[2], "username": name, "text": "third", "type": "message"},
    ]
    for message in messages[-3:]:
        assert set(message) == {"id", "username", "text", "created_at", "type"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", message["created_at"]), message
        stored = datetime.datetime.fromisoformat(message["created_at"].replace("Z", "+00:00"))
        assert before - datetime.timedelta(milliseconds=1) <= stored <= after
    assert [m["id"] for m in messages] == sorted(m["id"] for m in messages)


def test_messages_paging_with_limit_before_and_after(client, user):
    name, tokens = user
    ids = store(client, name, *[f"page {n}" for n in range(6)])
    get = lambda query: [m["id"] for m in client.get(f"/auth/messages?{query}", headers=bearer(tokens)).json()]
    assert get("limit=2") == ids[-2:]
    assert get(f"limit=2&before={ids[3]}") == ids[1:3]
    assert get(f"limit=2&after={ids[1]}") == ids[2:4]
    assert get(f"after={ids[-1]}") == []


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "before=-1", "after=1.5", "limit=",
                                   "limit=%EF%BC%91%EF%BC%90", "after=%D9%A3"])  # fullwidth 10, Arabic-Indic 3
def test_messages_bad_query_values_are_400(client, user, query):
    response = client.get(f"/auth/messages?{query}", headers=bearer(user[1]))
    assert response.status_code == 400
    assert "must be a whole number" in response.json()["detail"]


def test_passwords_are_stored_only_as_bcrypt_hashes(client):
    name = unique_name()
    client.post("/auth/register", json={"username": name, "password": PASSWORD})
    stored = client.portal.call(chat.find_user, name)["password"]
    assert stored != PASSWORD and stored.startswith("$2b$04$")


def test_bcrypt_runs_off_the_event_loop(client, monkeypatch):
    threads = []
    real_hash = chat.hash_password

    def spying_hash(password):
        import threading

        threads.append(threading.current_thread().name)
        return real_hash(password)

    monkeypatch.setattr(chat, "hash_password", spying_hash)
    register_and_login(client)
    assert threads and all(name.startswith("bcrypt") for name in threads)


def test_sqlite_uses_wal_and_a_busy_timeout(client):
    if not chat.USES_SQLITE:
        pytest.skip("SQLite only")
    assert client.portal.call(chat.database.fetch_val, "PRAGMA journal_mode") == "wal"
    assert client.portal.call(chat.database.fetch_val, "PRAGMA busy_timeout") >= 5000


def test_users_and_messages_survive_a_restart():
    with running_server() as (base_url, _):
        import httpx

        with httpx.Client(base_url=base_url) as http:
            name, tokens = register_and_login(http)
    with running_server() as (base_url, _):
        with httpx.Client(base_url=base_url) as http:
            response = http.post("/auth/login", json={"username": name, "password": PASSWORD})
            assert response.status_code == 200
            # the old access token still works: SECRET_KEY is set, so tokens survive too
            assert http.get("/auth/messages", headers=bearer(tokens)).status_code == 200


def test_schema_applies_twice_without_error(client):
    for statement in chat.schema_statements(chat.HERE / "schema.sql"):
        client.portal.call(chat.database.execute, statement)
    assert client.get("/health").json() == {"status": "ok"}


def test_a_new_database_records_the_latest_schema_version(client):
    assert client.portal.call(chat.database.fetch_val, "SELECT count(*) FROM schema_version") == 1
    assert client.portal.call(chat.database.fetch_val, "SELECT version FROM schema_version") == chat.SCHEMA_VERSION == 2
