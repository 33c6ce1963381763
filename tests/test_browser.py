"""The web page (SPEC sections 6 and 8) in a real headless Chromium, driven by Playwright against
real uvicorn servers: register, chat between two people, text never HTML, sessions that survive a
reload, a refused access token, a token expiring under an open socket and a server restart, paging
back, a path prefix, the page's Content-Security-Policy (any violation fails any test), no token
in any URL, and the limits against abuse (429 on login, 4429 on websockets).

Chromium comes from Debian (`apt-get install chromium`); Playwright cannot download its own here.
Without it these tests skip, or fail when CI=true."""

import json
import os
import re
import struct
import time

import httpx
import jwt
import pytest
from websockets.sync.client import connect as ws_connect

from conftest import IN_CI, PASSWORD, ROOT, register_and_login, running_server, unique_name, ws_url

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the `browser` fixture
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 900, "height": 600}
# The README's picture; rewritten only when asked, so that a test run leaves the tree clean.
README_SCREENSHOT = ROOT / "docs" / "screenshot.png"


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        problem = "the playwright package is not installed (pip install -r requirements.txt)"
    elif not os.path.exists(CHROMIUM):
        problem = f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium` to run the browser tests"
    else:
        problem = None
    if problem and IN_CI:
        pytest.fail(problem)
    if problem:
        pytest.skip(problem + " (with CI=true this is a failure)")
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def is_csp_violation(message):
    """Chromium reports each Content-Security-Policy violation as a console error ("Refused to ...",
    or in newer versions "... violates the following Content Security Policy directive ...")."""
    text = message.text
    return message.type == "error" and ("Content Security Policy" in text or text.startswith("Refused to"))


@pytest.fixture
def open_page(browser):
    """open_page(url) gives a page in a browser context of its own (its own localStorage);
    open_page.tab(page) another tab of that context, on the same URL. Any uncaught script error,
    alert/confirm dialog or Content-Security-Policy violation fails the test (open_page.problems)."""
    contexts, problems = [], []

    def watch(page):
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.on("console", lambda message: is_csp_violation(message) and problems.append(f"CSP: {message.text}"))
        return page

    def open_page(url):
        context = browser.new_context(viewport=VIEWPORT)
        contexts.append(context)
        page = watch(context.new_page())
        page.goto(url)
        return page

    def tab(page):
        other = watch(page.context.new_page())
        other.goto(page.url)
        return other

    open_page.tab = tab
    open_page.problems = problems
    yield open_page
    for context in contexts:
        context.close()
    assert not problems


# ---------------------------------------------------------------- helpers


def submit_credentials(page, button, username, password=PASSWORD):
    page.fill("#username", username)
    page.fill("#password", password)
    page.click(f"#auth-form button[value={button}]")


def sign_up(page, username):
    submit_credentials(page, "register", username)
    expect_connected(page)


def log_in(page, username):
    submit_credentials(page, "login", username)
    expect_connected(page)


def expect_connected(page):
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")


def say(page, text):
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(page.locator("#text")).to_have_value("")


def shown(page):
    """Every message on the page as (id, username, text), top to bottom."""
    return [tuple(row) for row in page.eval_on_selector_all(
        "#messages li",
        "items => items.map(li => [Number(li.dataset.id), li.querySelector('.who').textContent,"
        " li.querySelector('.text').textContent])",
    )]


def wait_for_text(page, text):
    page.wait_for_function(
        "text => [...document.querySelectorAll('#messages .text')].some(e => e.textContent === text)", arg=text
    )


def storage(page, key):
    return page.evaluate("key => localStorage.getItem(key)", key)


def send_over_websocket(base_url, tokens, texts):
    """Send texts as a plain websocket client; returns once the server has echoed every one (stored)."""
    waiting = list(texts)
    with ws_connect(ws_url(base_url, tokens["access_token"], format="json"), open_timeout=10) as ws:
        for text in texts:
            ws.send(text)
        while waiting:
            message = json.loads(ws.recv(timeout=10))
            if message["text"] in waiting:
                waiting.remove(message["text"])


# Runs before the page's own script: keeps every websocket the page makes, with its close code and reason.
RECORD_SOCKETS = """
window.recordedSockets = [];
window.WebSocket = class extends window.WebSocket {
  constructor(...args) {
    super(...args);
    const record = { url: this.url, code: null, reason: null };
    window.recordedSockets.push(record);
    this.addEventListener('close', (event) => { record.code = event.code; record.reason = event.reason; });
  }
};
"""


def record_sockets(page):
    """From the next load on, the page's websockets are kept: read them with recorded_sockets(page)."""
    page.add_init_script(RECORD_SOCKETS)


def recorded_sockets(page):
    """[{url, code, reason}] for every websocket the page has opened, oldest first (code None while open)."""
    return page.evaluate("window.recordedSockets")


def last_id_shown(page):
    return max(row[0] for row in shown(page))


def access_token_expiring_in(username, seconds):
    """An access token of the test server's (same SECRET_KEY) that expires in `seconds`."""
    now = int(time.time())
    claims = {"sub": username, "type": "access", "iat": now, "exp": now + seconds}
    return jwt.encode(claims, os.environ["SECRET_KEY"], algorithm="HS256")


def assert_shown_once_in_order(page, texts):
    rows = shown(page)
    ids = [row[0] for row in rows]
    assert ids == sorted(set(ids)), "messages must be in id order, each once"
    assert [text for _, _, text in rows if text in texts] == list(texts)


# ---------------------------------------------------------------- tests on a shared server


def test_two_people_register_and_chat(open_page, server):
    alice, bob = unique_name("alice"), unique_name("bob")
    alice_page, bob_page = open_page(server + "/"), open_page(server + "/")
    sign_up(alice_page, alice)
    sign_up(bob_page, bob)
    assert alice_page.get_attribute("#text", "maxlength") == "1000"
    expect(alice_page.locator("#me")).to_have_text(alice)

    say(alice_page, f"hi {bob}, how are you?")
    wait_for_text(bob_page, f"hi {bob}, how are you?")
    say(bob_page, "fine thanks")
    wait_for_text(alice_page, "fine thanks")

    for page in (alice_page, bob_page):
        mine = [(who, text) for _, who, text in shown(page) if who in (alice, bob)]
        assert mine == [(alice, f"hi {bob}, how are you?"), (bob, "fine thanks")]
    assert storage(alice_page, "access_token") != storage(bob_page, "access_token")


def test_api_errors_are_shown_next_to_the_form(open_page, server, http):
    taken, _ = register_and_login(http)
    page = open_page(server + "/")
    error = page.locator("#auth-error")

    submit_credentials(page, "register", taken.upper())
    expect(error).to_have_text("Username already exists")
    submit_credentials(page, "login", taken, "not-the-password")
    expect(error).to_have_text("Invalid username or password")
    submit_credentials(page, "register", unique_name(), "short")
    expect(error).to_have_text("Password must be at least 8 characters")
    submit_credentials(page, "register", "no spaces allowed")
    expect(error).to_contain_text("Username must be")

    expect(page.locator("#chat-view")).to_be_hidden()
    assert storage(page, "access_token") is None
    log_in(page, taken)
    expect(error).to_have_text("")


def test_message_text_is_rendered_as_text_never_html(open_page, server, http):
    attacker, tokens = register_and_login(http)
    page = open_page(server + "/")
    sign_up(page, unique_name())
    evil = ["<img src=x onerror=alert(1)>", "<b>not bold</b> &amp; <script>alert(2)</script>"]
    send_over_websocket(server, tokens, evil)
    say(page, "<i>typed</i>")

    for _ in range(2):  # live, then again from history after a reload
        for text in evil + ["<i>typed</i>"]:
            wait_for_text(page, text)
        assert page.locator("#messages img, #messages b, #messages i, #messages script").count() == 0
        assert [text for _, who, text in shown(page) if who == attacker] == evil
        page.reload()
        expect_connected(page)


def test_reload_keeps_the_session_and_log_out_ends_it(open_page, server):
    username = unique_name()
    page = open_page(server + "/")
    sign_up(page, username)
    say(page, "before the reload")
    wait_for_text(page, "before the reload")

    page.reload()
    expect_connected(page)
    expect(page.locator("#auth-view")).to_be_hidden()
    expect(page.locator("#me")).to_have_text(username)
    wait_for_text(page, "before the reload")  # from history
    say(page, "after the reload")
    wait_for_text(page, "after the reload")
    assert_shown_once_in_order(page, ["before the reload", "after the reload"])

    refresh_token = storage(page, "refresh_token")
    with page.expect_response(lambda response: response.url.endswith("/auth/logout")) as logout:
        page.click("#logout")
    assert logout.value.status == 200
    expect(page.locator("#auth-view")).to_be_visible()
    assert storage(page, "access_token") is None and storage(page, "refresh_token") is None
    assert httpx.post(server + "/auth/refresh", json={"refresh_token": refresh_token}).status_code == 401
    page.reload()
    expect(page.locator("#auth-view")).to_be_visible()
    assert page.locator("#messages li").count() == 0


def test_a_refused_access_token_is_refreshed_silently(open_page, server, http):
    username, tokens = register_and_login(http)
    page = open_page(server + "/")
    page.evaluate(
        "refresh => { localStorage.setItem('access_token', 'garbage');"
        " localStorage.setItem('refresh_token', refresh); }",
        tokens["refresh_token"],
    )
    page.reload()
    expect_connected(page)
    expect(page.locator("#auth-view")).to_be_hidden()
    assert storage(page, "access_token") != "garbage"  # (may equal the old one: same user, same second)
    assert storage(page, "refresh_token") != tokens["refresh_token"]  # rotated, and the new one kept
    say(page, "still here")
    wait_for_text(page, "still here")
    assert [who for _, who, text in shown(page) if text == "still here"] == [username]


def test_the_page_runs_under_its_content_security_policy(open_page, server):
    policy = httpx.get(server + "/").headers["content-security-policy"]
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/]+=*';", policy)
    assert re.search(r"style-src 'sha256-[A-Za-z0-9+/]+=*';", policy)
    assert "unsafe" not in policy and "connect-src 'self'" in policy
    markup = (ROOT / "index.html").read_text()
    assert not re.search(r"<[^>]*\s(on[a-z]+|style)\s*=", markup), "no inline handlers or style attributes"
    assert not re.search(r"javascript:|\beval\(|new Function|innerHTML|insertAdjacentHTML|setAttribute\('style", markup)

    page = open_page(server + "/")
    sign_up(page, unique_name())
    say(page, "under a strict policy")
    wait_for_text(page, "under a strict policy")
    page.click("#logout")
    expect(page.locator("#auth-view")).to_be_visible()
    assert open_page.problems == []

    # The watch on the console really sees a violation: an inline style attribute is one.
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">not allowed</p>')")
    page.wait_for_timeout(200)
    assert any("inline style" in problem for problem in open_page.problems), open_page.problems
    open_page.problems.clear()


def test_no_token_in_any_url_the_page_opens(open_page, server):
    page = open_page(server + "/")
    urls, socket_urls = [], []
    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", lambda ws: socket_urls.append(ws.url))
    sign_up(page, unique_name())
    say(page, "no token in sight")
    wait_for_text(page, "no token in sight")
    page.reload()  # the session from localStorage connects the same way
    expect_connected(page)
    say(page, "still none")
    wait_for_text(page, "still none")

    assert len(socket_urls) == 2 and all("/ws?" in url for url in socket_urls)
    tokens = [storage(page, "access_token"), storage(page, "refresh_token")]
    for url in urls + socket_urls:
        assert "token" not in url.lower() and not any(token in url for token in tokens), url


def test_a_socket_closed_at_token_expiry_reconnects_unnoticed(open_page, server, http):
    """The server closes a socket with 4001 when its access token expires: the page refreshes the
    token and reconnects with after=, with no error shown and nothing lost or doubled."""
    username, tokens = register_and_login(http)
    _, other = register_and_login(http)
    send_over_websocket(server, other, ["before the expiry"])
    page = open_page(server + "/")
    record_sockets(page)
    lifetime = 9  # the page renews a token first when it has less than 5 s left
    short_lived = access_token_expiring_in(username, lifetime)
    page.evaluate(
        "([access, refresh]) => { localStorage.setItem('access_token', access);"
        " localStorage.setItem('refresh_token', refresh); }",
        [short_lived, tokens["refresh_token"]],
    )
    page.reload()
    expect_connected(page)
    wait_for_text(page, "before the expiry")
    assert storage(page, "access_token") == short_lived  # the socket was opened with it
    page.evaluate(  # every state the status shows from now on
        "() => { window.states = []; new MutationObserver(() => states.push(document.getElementById('status')"
        ".dataset.state)).observe(document.getElementById('status'), { attributes: true }); }"
    )
    last_before = last_id_shown(page)

    page.wait_for_function("old => localStorage.getItem('refresh_token') !== old", arg=tokens["refresh_token"],
                           timeout=(lifetime + 10) * 1000)
    page.wait_for_function("() => recordedSockets.length === 2 && recordedSockets[1].code === null")
    expect_connected(page)
    first, second = recorded_sockets(page)
    assert (first["code"], first["reason"]) == (4001, "Token expired")
    assert f"after={last_before}" in second["url"]
    assert storage(page, "access_token") != short_lived

    send_over_websocket(server, other, ["after the expiry"])
    say(page, "mine, after the expiry")
    wait_for_text(page, "after the expiry")
    wait_for_text(page, "mine, after the expiry")
    assert_shown_once_in_order(page, ["before the expiry", "after the expiry", "mine, after the expiry"])
    expect(page.locator("#chat-error")).to_have_text("")
    expect(page.locator("#auth-view")).to_be_hidden()
    assert not {"offline", "signed-out"} & set(page.evaluate("states")), page.evaluate("states")


def test_load_older_pages_back_through_history(open_page, server, http):
    username, tokens = register_and_login(http)
    texts = [f"{username} number {i}" for i in range(60)]
    send_over_websocket(server, tokens, texts)
    page = open_page(server + "/")
    log_in(page, username)
    wait_for_text(page, texts[-1])
    assert [text for _, _, text in shown(page) if text in texts] == texts[-50:]

    page.click("#older")
    wait_for_text(page, texts[0])
    assert_shown_once_in_order(page, texts)


# ---------------------------------------------------------------- tests with servers of their own


def test_a_server_restart_loses_no_message(open_page, http):
    _, bob = register_and_login(http)
    with running_server() as (base_url, process):
        page = open_page(base_url + "/")
        sign_up(page, unique_name())
        send_over_websocket(base_url, bob, ["one, before the restart"])
        wait_for_text(page, "one, before the restart")

        process.terminate()
        process.wait(timeout=15)
        expect(page.locator("#status")).not_to_have_attribute("data-state", "connected")
        # While it is down the access token stops working too: the page must refresh after a 1008.
        page.evaluate("localStorage.setItem('access_token', 'garbage')")
        # Another server on the same database takes a message the page cannot see live.
        with running_server() as (other_url, _):
            send_over_websocket(other_url, bob, ["two, while the page was away"])

        port = int(base_url.rsplit(":", 1)[1])
        with running_server(port=port):
            wait_for_text(page, "two, while the page was away")  # caught up with after=
            expect_connected(page)
            assert storage(page, "access_token") != "garbage"
            send_over_websocket(base_url, bob, ["three, live again"])
            say(page, "four, from the page")
            wait_for_text(page, "four, from the page")
            wait_for_text(page, "three, live again")
            assert_shown_once_in_order(page, ["one, before the restart", "two, while the page was away",
                                              "three, live again", "four, from the page"])


def test_too_many_logins_say_when_to_try_again(open_page):
    with running_server(env={"LOGIN_LIMIT": "2 per minute", "REGISTER_LIMIT": "1 per minute"}) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=10) as http:
            username, _ = register_and_login(http)  # the one registration this address may make
        page = open_page(base_url + "/")
        error = page.locator("#auth-error")
        too_many = re.compile(r"^Too many attempts, try again in (\d+) s$")

        submit_credentials(page, "register", unique_name())
        expect(error).to_have_text(too_many)
        for _ in range(2):
            submit_credentials(page, "login", username, "not-the-password")
            expect(error).to_have_text("Invalid username or password")
        submit_credentials(page, "login", username)  # right, but too late
        expect(error).to_have_text(too_many)
        seconds = int(too_many.match(error.text_content()).group(1))
        assert 1 <= seconds <= 60
        expect(error).to_have_text(f"Too many attempts, try again in {seconds - 1} s")  # it counts down
        expect(page.locator("#chat-view")).to_be_hidden()
        assert storage(page, "access_token") is None


def test_sending_too_fast_pauses_the_chat_then_reconnects(open_page):
    """Past MESSAGE_LIMIT the server closes with 4429: the page says so and reconnects after a
    few seconds, once, not in a loop."""
    with running_server(env={"MESSAGE_LIMIT": "3 per minute"}) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=10) as http:
            _, other = register_and_login(http)
        page = open_page(base_url + "/")
        record_sockets(page)
        page.reload()
        sign_up(page, unique_name())
        texts = [f"quick {i}" for i in range(4)]
        for text in texts:
            say(page, text)

        expect(page.locator("#chat-error")).to_contain_text("too fast")
        expect(page.locator("#status")).to_have_attribute("data-state", "offline")
        paused_at = time.monotonic()
        expect_connected(page)
        assert time.monotonic() - paused_at > 1.5  # waited, rather than reconnected at once
        page.wait_for_timeout(2000)
        sockets = recorded_sockets(page)
        assert [(s["code"], s["reason"]) for s in sockets] == [(4429, "Too many messages"), (None, None)]
        assert f"after={last_id_shown(page)}" in sockets[1]["url"]

        send_over_websocket(base_url, other, ["still listening"])
        wait_for_text(page, "still listening")
        assert_shown_once_in_order(page, texts[:3] + ["still listening"])  # the fourth was refused


def test_too_many_connections_back_off_until_one_closes(open_page):
    with running_server(env={"MAX_SOCKETS_PER_USER": "1"}) as (base_url, _):
        first = open_page(base_url + "/")
        sign_up(first, unique_name())
        second = open_page.tab(first)  # the same user in a second tab
        record_sockets(second)
        second.reload()
        expect(second.locator("#chat-error")).to_contain_text("Too many connections")
        expect(second.locator("#status")).to_contain_text("Too many connections")
        second.wait_for_timeout(2500)
        assert [s["code"] for s in recorded_sockets(second)] == [4429]  # the first retry waits 3.75 s or more

        first.close()
        expect_connected(second)
        say(second, "the only tab now")
        wait_for_text(second, "the only tab now")


PARENT_APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import chat


async def home(request):
    return PlainTextResponse("the parent app")


app = Starlette(routes=[Route("/", home), Mount("/chat", app=chat.app)], lifespan=chat.lifespan)
"""


def test_the_page_works_under_a_path_prefix(open_page, tmp_path):
    (tmp_path / "parent.py").write_text(PARENT_APP)
    mounted = running_server(app="parent:app", args=["--app-dir", str(tmp_path)], health_path="/chat/health")
    with mounted as (parent_url, _):
        with httpx.Client(base_url=parent_url + "/chat", timeout=10) as http:
            other, tokens = register_and_login(http)
        assert httpx.get(parent_url + "/").text == "the parent app"  # the page really is under /chat
        page = open_page(parent_url + "/chat")  # redirected to /chat/
        assert page.url == parent_url + "/chat/"
        username = unique_name()
        sign_up(page, username)
        say(page, "hello from under /chat")
        wait_for_text(page, "hello from under /chat")  # stored before the answer below
        send_over_websocket(parent_url + "/chat", tokens, ["hello back"])
        wait_for_text(page, "hello back")
        assert [(who, text) for _, who, text in shown(page)][-2:] == [
            (username, "hello from under /chat"), (other, "hello back")]


def test_screenshot_of_a_conversation(open_page, tmp_path):
    """A fresh database, two people, a short conversation. UPDATE_SCREENSHOT=1 writes it to
    docs/screenshot.png for the README."""
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'screenshot.db'}"}
    with running_server(env=env) as (base_url, _), httpx.Client(base_url=base_url, timeout=10) as http:
        _, bob = register_and_login(http, "bob")
        register_and_login(http, "alice")
        send_over_websocket(base_url, bob, ["Morning! Is the new chat page live yet?"])
        page = open_page(base_url + "/")
        log_in(page, "alice")
        say(page, "It is: history, live messages and reconnecting on its own.")
        send_over_websocket(base_url, bob, ["Nice. And <b>tags</b> show up as plain text, good."])
        wait_for_text(page, "Nice. And <b>tags</b> show up as plain text, good.")
        page.fill("#text", "Exactly, nothing is ever rendered as HTML.")
        page.locator("#text").blur()  # no caret or focus ring: the same picture on every run
        target = README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "page.png"
        png = page.screenshot(path=str(target))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (VIEWPORT["width"], VIEWPORT["height"])
    assert b"IDAT" in png
