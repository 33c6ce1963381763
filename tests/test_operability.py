"""What an operator sees (SPEC section 10): GET /metrics in Prometheus text format, summed over
`uvicorn --workers N`, METRICS_TOKEN, and the log lines: the configuration at start-up without
secrets, refusals logged at most once a minute, and LOG_FORMAT=json."""

import asyncio
import json
import re
import secrets
import subprocess

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from conftest import REDIS_URL, register_and_login, running_server, server_log, ws_url


def scrape(base_url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(base_url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text):
    """{(name, frozenset(labels)): value} of a scrape."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(text, name, **labels):
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_happens_and_label_routes_by_template():
    with running_server(env={"LOGIN_LIMIT": "2 per hour"}) as (base_url, _):
        before = scrape(base_url)
        with httpx.Client(base_url=base_url) as http:
            name, tokens = register_and_login(http)
            for _ in range(3):
                http.post("/auth/login", json={"username": "nobody", "password": "wrong password"})
            http.get("/auth/messages?limit=5", headers={"Authorization": f"Bearer {tokens['access_token']}"})
            http.get("/no/such/path-" + secrets.token_hex(4))

        async def chat():
            async with connect(ws_url(base_url, tokens["access_token"])) as a, connect(ws_url(base_url, tokens["access_token"])) as b:
                during = scrape(base_url)
                for n in range(3):
                    await a.send(f"metric {n}")
                for ws in (a, b):
                    for _ in range(3):
                        await asyncio.wait_for(ws.recv(), 10)
                return during

        during = asyncio.run(chat())
        after = scrape(base_url)
    assert value(during, "chat_websockets_open") == 2 and value(after, "chat_websockets_open") == 0
    assert value(after, "chat_messages_stored_total") - value(before, "chat_messages_stored_total") == 3
    assert value(after, "chat_frames_delivered_total") - value(before, "chat_frames_delivered_total") == 6
    assert value(after, "chat_logins_total", result="success") == 1
    assert value(after, "chat_logins_total", result="failure") == 2
    assert value(after, "chat_logins_total", result="limited") == 1
    assert value(after, "chat_limit_refusals_total", kind="login") == 1
    assert value(after, "chat_delivery_delay_seconds_count") - value(before, "chat_delivery_delay_seconds_count") == 3
    assert value(after, "chat_http_request_duration_seconds_count", method="GET", route="/auth/messages", status="200") == 1
    assert value(after, "chat_http_request_duration_seconds_count", method="GET", route="unmatched", status="404") == 1
    assert "path-" not in after and "limit=5" not in after  # raw paths never become labels
    for family in text_string_to_metric_families(after):
        if family.name.startswith("chat_"):
            assert family.type != "counter" or family.samples[0].name.endswith("_total") or family.samples[0].name.endswith("_created")
            assert family.type != "histogram" or family.name.endswith("_seconds")


def test_metrics_token_guards_the_metrics():
    token = secrets.token_urlsafe(16)
    with running_server(env={"METRICS_TOKEN": token}) as (base_url, process):
        assert httpx.get(base_url + "/metrics").status_code == 401
        assert httpx.get(base_url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert "chat_messages_stored_total" in scrape(base_url, token)
        assert token not in server_log(process)


def test_with_two_workers_one_scrape_shows_the_sum_over_both():
    with running_server(env={"SECRET_KEY": "two-workers-" + "k" * 30}, args=["--workers", "2"]) as (base_url, process):
        with httpx.Client(base_url=base_url) as http:
            _, tokens = register_and_login(http)
        port = int(base_url.rsplit(":", 1)[1])

        async def open_on_both():
            sockets = []
            for _ in range(40):  # the kernel spreads connections over the two workers
                sockets.append(await connect(ws_url(base_url, tokens["access_token"])))
                if len(worker_pids(port, sockets) - {None}) == 2 and len(sockets) >= 6:
                    break
            assert len(worker_pids(port, sockets) - {None}) == 2, "the sockets all went to one worker"
            scrapes = [value(scrape(base_url), "chat_websockets_open") for _ in range(6)]
            for ws in sockets:
                await ws.close()
            return len(sockets), scrapes

        opened, scrapes = asyncio.run(open_on_both())
    assert scrapes == [opened] * 6  # every scrape, whichever worker answers, sees both workers' sockets


def worker_pids(port, sockets):
    """The server processes that hold these client sockets' connections."""
    output = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                            capture_output=True, text=True, timeout=10).stdout
    owner = {int(peer): int(pid) for peer, pid in re.findall(r":\d+\s+\S+:(\d+)\s+users:\(\(.*?pid=(\d+)", output)}
    return {owner.get(ws.local_address[1]) for ws in sockets}


def test_the_start_up_line_gives_the_configuration_without_secrets():
    secret, redis_password, token = "key-" + secrets.token_hex(16), "pw" + secrets.token_hex(8), secrets.token_hex(8)
    broadcast = REDIS_URL.replace("redis://", f"redis://:{redis_password}@")
    env = {"SECRET_KEY": secret, "BROADCAST_URL": broadcast, "METRICS_TOKEN": token, "BROADCAST_CHANNEL": "t-" + token}
    with running_server(env=env, args=["--log-level", "info"]) as (_, process):
        log = server_log(process)
    (line,) = [line for line in log.splitlines() if "chat started" in line]
    assert "database sqlite" in line or "database postgresql" in line
    assert "limits login off" in line and "sockets per user" in line  # the tests turn limits off
    assert "redis://:***@" in line and "behind METRICS_TOKEN" in line
    for leaked in (secret, redis_password, token):
        assert leaked not in log


def test_limit_refusals_are_logged_at_most_once_a_minute():
    with running_server(env={"LOGIN_LIMIT": "1 per hour"}, args=["--log-level", "info"]) as (base_url, process):
        with httpx.Client(base_url=base_url) as http:
            statuses = [http.post("/auth/login", json={"username": "mallory", "password": "wrong password"}).status_code
                        for _ in range(6)]
        log = server_log(process)
    assert statuses == [401] + [429] * 5
    assert log.count("refused past the login limit") == 1


def test_log_format_json_makes_every_line_a_json_object():
    with running_server(env={"LOG_FORMAT": "json"}, args=["--log-level", "info"]) as (base_url, process):
        httpx.get(base_url + "/health")
        log = server_log(process)
    lines = [json.loads(line) for line in log.splitlines()]  # fails on any line that is not JSON
    assert any(line["logger"] == "chat" and "chat started" in line["message"] for line in lines)
    assert any(line["logger"] == "uvicorn.access" and "/health" in line["message"] for line in lines)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


def test_metrics_off_answers_404_and_says_why():
    with running_server(env={"METRICS": "off"}) as (base_url, _):
        response = httpx.get(base_url + "/metrics")
        assert (response.status_code, response.json()) == (404, {"detail": "Metrics are off (METRICS=off)"})
        nowhere = httpx.get(base_url + "/no-such-path")  # a 404 of Starlette's own still reads as a sentence
        assert (nowhere.status_code, nowhere.json()) == (404, {"detail": "There is nothing at this path"})
