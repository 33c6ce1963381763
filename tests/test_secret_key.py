"""Zero configuration that holds: without SECRET_KEY on SQLite, the signing key is kept in a file
beside the database, shared by every process on the machine and surviving restarts."""

import os
import stat
import subprocess
import sys

import httpx

from conftest import ROOT, TMP, register_and_login, running_server, server_log, unique_name

NO_KEY = {"SECRET_KEY": None}


def sqlite_env(folder):
    """A fresh SQLite database in `folder`, with no SECRET_KEY in the environment."""
    folder.mkdir(parents=True, exist_ok=True)
    return {**NO_KEY, "DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'chat.db'}"}


def messages_status(base_url, access_token):
    return httpx.get(base_url + "/auth/messages", headers={"Authorization": f"Bearer {access_token}"}).status_code


def test_without_secret_key_tokens_survive_a_restart_and_the_key_file_is_private():
    folder = TMP / unique_name("key-restart-")
    env = sqlite_env(folder)
    key_file = folder / "chat.db.key"
    with running_server(env=env) as (base_url, process):
        with httpx.Client(base_url=base_url) as http:
            _, tokens = register_and_login(http)
        assert str(key_file) in server_log(process)  # the log names the file ...
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert key not in server_log(process)  # ... never the key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with running_server(env=env) as (base_url, _):
        assert messages_status(base_url, tokens["access_token"]) == 200
        refreshed = httpx.post(base_url + "/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert refreshed.status_code == 200
    assert key_file.read_text().strip() == key


def test_two_processes_started_together_accept_each_others_tokens():
    env = sqlite_env(TMP / unique_name("key-pair-"))
    with running_server(env=env) as (first, _), running_server(env=env) as (second, _):
        with httpx.Client(base_url=first) as http:
            _, from_first = register_and_login(http)
        with httpx.Client(base_url=second) as http:
            _, from_second = register_and_login(http)
        assert messages_status(second, from_first["access_token"]) == 200
        assert messages_status(first, from_second["access_token"]) == 200


def test_workers_starting_at_once_agree_on_one_key():
    folder = TMP / unique_name("key-race-")
    env = {**os.environ, **sqlite_env(folder)}
    del env["SECRET_KEY"]
    command = [sys.executable, "-c", "import chat; print(chat.SECRET_KEY)"]
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
    keys = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert len(keys) == 1 and len(keys.pop()) >= 32
    assert [path.name for path in folder.iterdir()] == ["chat.db.key"]  # no draft left behind


def test_secret_key_set_wins_over_the_key_file():
    env = {**os.environ, **sqlite_env(TMP / unique_name("key-set-"))}
    del env["SECRET_KEY"]
    command = [sys.executable, "-c", "import chat; print(chat.SECRET_KEY)"]
    from_file = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    given = "a-real-secret-" + "x" * 30
    from_env = subprocess.run(command, cwd=ROOT, env={**env, "SECRET_KEY": given}, capture_output=True, text=True, timeout=60)
    assert len(from_file.stdout.strip()) >= 32
    assert from_env.stdout.strip() == given


def test_postgresql_without_secret_key_stops_with_one_line():
    env = {**os.environ, "DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/test"}
    del env["SECRET_KEY"]
    result = subprocess.run([sys.executable, "-c", "import chat"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SECRET_KEY" in lines[0] and "PostgreSQL" in lines[0], result.stderr


def test_make_clean_removes_the_key_file_with_the_database(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    (tmp_path / "Makefile").write_text(makefile)
    for name in ("chat.db", "chat.db-wal", "chat.db-shm", "chat.db.key"):
        (tmp_path / name).write_text("x")
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, timeout=60)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Makefile"]
