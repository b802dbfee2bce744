"""The chat web page (ray_jobs/static/chat.html) in a real headless browser.

Debian's chromium + chromedriver driven by selenium; skipped when either is missing:
    apt-get install -y chromium chromium-driver && pip install selenium

No Ray and no model here: a small local HTTP server serves the page and a fake-but-real
OpenAI-style streaming endpoint (Server-Sent Events written in pieces with small delays, one event
split across two TCP writes and a UTF-8 character split between them), so these tests check the
page's own logic: streaming display, the multi-turn history it sends, regenerate, clear, stop,
error display and the API-key field.

NANOCHAT_SCREENSHOT=1 also writes docs/figures/chat_web.png (a two-turn conversation).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "ray_jobs" / "static" / "chat.html"
SCREENSHOT = REPO / "docs" / "figures" / "chat_web.png"
from tests.conftest import CHROMEDRIVER, CHROMIUM  # noqa: E402

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )
if webdriver is None:
    pytest.skip("needs selenium: pip install selenium", allow_module_level=True)

pytestmark = pytest.mark.timeout(120)

MODEL_ID = "fake-nanochat"
DELAY = 0.008  # seconds between the two halves of every SSE event


def answer(n: int) -> str:
    """The fixed answer to the n-th chat request (1-based), so a regenerated answer differs."""
    return f"Reply {n}: hello from the fake model.\nIt streams in small pieces — café ✓ done."


SLOW_ANSWER = " ".join(f"word{i}" for i in range(400))


class FakeChatServer:
    """Serves chat.html at / and a streaming OpenAI-style chat endpoint; records what it got."""

    def __init__(self):
        self.requests: list[dict] = []  # {"body": parsed JSON, "auth": Authorization header}
        self.required_key: str | None = None
        self.disconnects = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def bodies(self) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.requests]

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _send(self, status: int, body: bytes, ctype: str):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj):
                self._send(status, json.dumps(obj).encode(), "application/json")

            def _authorized(self) -> bool:
                if server.required_key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {server.required_key}":
                    return True
                self._json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
                return False

            def do_GET(self):
                if self.path == "/":
                    self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
                elif self.path == "/v1/models":
                    if self._authorized():
                        self._json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": "not found"}})
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server.lock:
                    server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    n = len(server.requests)
                if not self._authorized():
                    return
                last = body["messages"][-1]["content"]
                if "trigger error" in last:
                    return self._json(400, {"error": {"message": "Message too long (fake limit)",
                                                      "type": "invalid_request_error"}})
                if "trigger crash" in last:
                    return self._send(500, b"Internal Server Error", "text/plain")
                if "slow" in last:
                    self._stream(SLOW_ANSWER.split(" "), delay=0.02, sep=" ")
                else:
                    text = answer(n)
                    self._stream([text[i:i + 4] for i in range(0, len(text), 4)], delay=DELAY)

            def _event(self, obj) -> bytes:
                return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

            def _stream(self, pieces: list[str], delay: float, sep: str = ""):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": MODEL_ID}
                events = [self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
                for i, piece in enumerate(pieces):
                    content = piece if i == 0 else sep + piece
                    events.append(self._event({**base, "choices": [{"index": 0, "delta": {"content": content}}]}))
                events.append(self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
                events.append(b"data: [DONE]\n\n")
                try:
                    for ev in events:
                        # two writes per event: cut inside a multi-byte UTF-8 character when there is one
                        high = next((i for i, b in enumerate(ev) if b >= 0x80), None)
                        cut = high + 1 if high is not None else len(ev) // 2
                        for part in (ev[:cut], ev[cut:]):
                            self.wfile.write(part)
                            self.wfile.flush()
                            time.sleep(delay)
                except (BrokenPipeError, ConnectionResetError):
                    with server.lock:
                        server.disconnects += 1

        return Handler


@pytest.fixture(scope="module")
def server():
    with FakeChatServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def driver(browser):
    return browser


@pytest.fixture
def page(driver, server):
    """A fresh page: nothing in localStorage, the fake server in its default state."""
    server.required_key = None
    driver.get(server.url)
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")
    return driver


def wait(driver, cond, timeout: float = 10):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(cond)


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def messages(driver) -> list[tuple[str, str]]:
    """(role, text) of every bubble in the conversation, in order."""
    return [tuple(x) for x in driver.execute_script(
        "return [...document.querySelectorAll('#messages .message')].map(e => "
        "[e.classList.contains('user') ? 'user' : 'assistant', e.querySelector('.content').textContent])")]


def assistant_texts(driver) -> list[str]:
    return [text for role, text in messages(driver) if role == "assistant"]


def wait_answer(driver, server, n_requests: int, timeout: float = 10):
    """Wait until the n-th chat request has been answered and the page is idle again."""
    wait(driver, lambda d: len(server.bodies) >= n_requests and state(d) == "idle", timeout)


# Records every text the last assistant bubble shows (in the page, so slow polling misses nothing).
RECORD_STREAM = """
window.seenTexts = [];
new MutationObserver(() => {
  const els = document.querySelectorAll('#messages .message.assistant .content');
  const text = els.length ? els[els.length - 1].textContent : null;
  if (text !== null && window.seenTexts[window.seenTexts.length - 1] !== text) window.seenTexts.push(text);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def type_message(driver, text: str):
    driver.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)


def test_page_loads(page):
    assert page.title == "nanochat"
    prompt = page.find_element(By.ID, "prompt")
    assert prompt.is_displayed()
    assert page.switch_to.active_element == prompt
    assert page.find_element(By.CSS_SELECTOR, "label[for=prompt]")
    for button in ("send", "stop", "regenerate", "clear"):
        assert page.find_element(By.ID, button).is_displayed()
    assert not page.find_element(By.ID, "stop").is_enabled()
    assert not page.find_element(By.ID, "regenerate").is_enabled()
    assert messages(page) == []
    assert page.find_element(By.ID, "empty").is_displayed()
    assert not page.find_element(By.ID, "error").is_displayed()
    wait(page, lambda d: d.find_element(By.ID, "model").text == MODEL_ID)


def test_streaming_multiturn_regenerate_clear(page, server):
    start = len(server.bodies)

    # turn 1: Enter sends; the answer shows up piece by piece and ends complete
    page.execute_script(RECORD_STREAM)
    type_message(page, "Hello there")
    wait_answer(page, server, start + 1)
    seen = page.execute_script("return window.seenTexts")
    full = answer(start + 1)
    assert seen[-1] == full
    partial = [t for t in seen if t and t != full]
    assert len(partial) >= 3, f"answer did not stream: {seen}"
    assert all(full.startswith(t) for t in partial)
    assert messages(page) == [("user", "Hello there"), ("assistant", full)]
    assert page.find_element(By.ID, "prompt").get_attribute("value") == ""
    body = server.bodies[-1]
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert body["stream"] is True and body["model"] == MODEL_ID
    assert body["temperature"] == 0.6 and "max_tokens" not in body  # empty field: the server's default

    # turn 2: the controls are sent; Shift+Enter is a newline, not a send
    for field, value in (("temperature", "0.2"), ("max-tokens", "64")):
        el = page.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    prompt = page.find_element(By.ID, "prompt")
    prompt.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line two")
    time.sleep(0.1)
    assert len(server.bodies) == start + 1
    assert prompt.get_attribute("value") == "line one\nline two"
    page.find_element(By.ID, "send").click()
    wait_answer(page, server, start + 2)
    second = answer(start + 2)
    history = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": full},
        {"role": "user", "content": "line one\nline two"},
    ]
    body = server.bodies[-1]
    assert body["messages"] == history
    assert body["temperature"] == 0.2 and body["max_tokens"] == 64
    assert messages(page) == [(m["role"], m["content"]) for m in history] + [("assistant", second)]
    if os.environ.get("NANOCHAT_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.save_screenshot(str(SCREENSHOT))

    # regenerate: the same history again, without the last answer, and a new answer in its place
    page.find_element(By.ID, "regenerate").click()
    wait_answer(page, server, start + 3)
    assert server.bodies[-1]["messages"] == history
    assert messages(page) == [(m["role"], m["content"]) for m in history] + [("assistant", answer(start + 3))]

    # clear: the conversation is gone, and the next message starts a new one
    page.find_element(By.ID, "clear").click()
    assert messages(page) == []
    assert page.find_element(By.ID, "empty").is_displayed()
    assert not page.find_element(By.ID, "regenerate").is_enabled()
    type_message(page, "fresh start")
    wait_answer(page, server, start + 4)
    assert server.bodies[-1]["messages"] == [{"role": "user", "content": "fresh start"}]
    assert messages(page) == [("user", "fresh start"), ("assistant", answer(start + 4))]


def test_error_responses(page, server):
    start = len(server.bodies)
    error = page.find_element(By.ID, "error")

    # 400 with the OpenAI error shape: its message is shown, no empty answer bubble is left behind
    type_message(page, "please trigger error")
    wait(page, lambda d: error.is_displayed())
    assert "Error 400" in error.text and "Message too long (fake limit)" in error.text
    assert error.get_attribute("role") == "alert"
    wait(page, lambda d: state(d) == "idle")
    assert messages(page) == [("user", "please trigger error")]
    assert page.find_element(By.ID, "send").is_enabled()
    assert page.find_element(By.ID, "regenerate").is_enabled()
    assert len(server.bodies) == start + 1

    # 500 with a plain-text body
    page.find_element(By.ID, "clear").click()
    assert not error.is_displayed()
    type_message(page, "trigger crash")
    wait(page, lambda d: error.is_displayed())
    assert "Error 500" in error.text and "Internal Server Error" in error.text

    # the next good answer clears the error
    page.find_element(By.ID, "clear").click()
    type_message(page, "all good now?")
    wait_answer(page, server, start + 3)
    assert not error.is_displayed()
    assert assistant_texts(page) == [answer(start + 3)]


def test_stop_keeps_partial_answer(page, server):
    start = len(server.bodies)
    disconnects = server.disconnects
    type_message(page, "a slow answer please")
    wait(page, lambda d: len((assistant_texts(d) or [""])[-1]) > 40)
    assert page.find_element(By.ID, "stop").is_enabled()
    page.find_element(By.ID, "stop").click()
    wait(page, lambda d: state(d) == "idle", timeout=3)
    partial = assistant_texts(page)[-1]
    time.sleep(0.2)
    assert assistant_texts(page)[-1] == partial  # nothing arrives after stop
    assert SLOW_ANSWER.startswith(partial) and len(partial) < len(SLOW_ANSWER)
    assert page.find_element(By.CSS_SELECTOR, ".message.assistant .note").text == "stopped"
    assert not page.find_element(By.ID, "stop").is_enabled()
    wait(page, lambda d: server.disconnects > disconnects, timeout=5)  # the fetch was really aborted

    # the partial answer is part of the history of the next turn
    type_message(page, "thanks")
    wait_answer(page, server, start + 2)
    assert server.bodies[-1]["messages"] == [
        {"role": "user", "content": "a slow answer please"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "thanks"},
    ]


def test_api_key(page, server):
    server.required_key = "sekret"
    try:
        page.refresh()
        start = len(server.bodies)
        type_message(page, "hi")
        error = page.find_element(By.ID, "error")
        wait(page, lambda d: error.is_displayed())
        assert "401" in error.text and "API key" in error.text
        key = page.find_element(By.ID, "api-key")
        wait(page, lambda d: d.switch_to.active_element == key)
        key.send_keys("sekret", Keys.TAB)  # stored on change
        wait(page, lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
        page.find_element(By.ID, "regenerate").click()
        wait_answer(page, server, start + 2)
        assert assistant_texts(page) == [answer(start + 2)]
        assert server.requests[-1]["auth"] == "Bearer sekret"
        assert not error.is_displayed()
        page.refresh()
        assert page.find_element(By.ID, "api-key").get_attribute("value") == "sekret"
    finally:
        server.required_key = None
        page.execute_script("localStorage.clear()")


def test_phone_width(page, server):
    page.set_window_size(390, 844)
    try:
        page.refresh()
        assert page.execute_script("return window.innerWidth") <= 420
        start = len(server.bodies)
        type_message(page, "Hello from a phone")
        wait_answer(page, server, start + 1)
        overflow = page.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
        for el_id in ("prompt", "send", "stop", "regenerate", "clear", "temperature", "max-tokens"):
            rect = page.find_element(By.ID, el_id).rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= 391, (el_id, rect)
    finally:
        page.set_window_size(1000, 760)
