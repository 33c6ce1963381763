"""The web page (SPEC section 6) in a real headless Chromium, driven by Playwright against real
uvicorn servers: register, chat between two people, text never HTML, sessions that survive a
reload, a refused access token and a server restart, paging back, and a path prefix.

Chromium comes from Debian (`apt-get install chromium`); Playwright cannot download its own here.
Without it these tests skip, or fail when CI=true."""

import json
import os
import struct

import httpx
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


@pytest.fixture
def open_page(browser):
    """open_page(url) gives a page in a browser context of its own (its own localStorage).
    Any uncaught script error or alert/confirm dialog fails the test."""
    contexts, problems = [], []

    def open_page(url):
        context = browser.new_context(viewport=VIEWPORT)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.goto(url)
        return page

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
        send_over_websocket(parent_url + "/chat", tokens, ["hello back"])
        wait_for_text(page, "hello from under /chat")
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
