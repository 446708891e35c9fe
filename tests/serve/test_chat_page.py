"""The chat page at / in headless Chromium, driven over the DevTools protocol (a websocket): type a message, the
streamed reply appears and equals the API's greedy answer; the conversation is kept; the prompt shown is the one the
model saw; switching the model switches the adapter."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from tunelab.serve.pool import load_pool
from tunelab.serve.server import free_port, running

HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_S = 120  # a bound on each wait, not a timing assertion


class Page:
    """A minimal DevTools client: evaluate JavaScript in one page."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=WAIT_S))
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str):
        """The expression's value once it is truthy (the page may still be loading: errors count as not yet)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if value := self.js(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"):
                return value
            time.sleep(0.05)
        raise AssertionError(f"never true: {expression}")

    def type_and_send(self, text: str) -> None:
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", text=text)
        self.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13,
                  text="\r")
        self.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)


@pytest.fixture
def browser_page(tmp_path):
    browser = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    if browser is None:
        pytest.skip("needs headless Chromium (Debian package chromium)")
    port = free_port()
    proc = subprocess.Popen([browser, *HEADLESS, f"--remote-debugging-port={port}",
                             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                assert time.monotonic() < deadline, "Chromium's DevTools endpoint never came up"
                time.sleep(0.1)
        client = Page(page["webSocketDebuggerUrl"])
        yield client
        client.ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_page_streams_keeps_the_conversation_shows_the_prompt_and_switches_adapter(browser_page, stories260k,
                                                                                        serve_runs):
    pool = load_pool(str(stories260k), [("qa", str(serve_runs["qa"]))], name="base")
    with running(pool) as srv:
        api = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)

        def answer(model, messages):
            return api.chat.completions.create(model=model, messages=messages, temperature=0,
                                               max_tokens=128).choices[0].message.content

        page = browser_page
        page.call("Page.navigate", url=f"{srv.url}/")
        assert page.wait_for("document.getElementById('model').options.length === 2 && "
                             "[...document.getElementById('model').options].map(o => o.value).join()") == "base,qa"
        page.type_and_send("Tell me a story.")
        reply = page.wait_for("document.querySelector('.assistant[data-done]')?.textContent")
        first = answer("base", [{"role": "user", "content": "Tell me a story."}])
        assert reply == "base: " + first and first
        # the second turn: the conversation kept, and the prompt shown is the one the model sees
        page.js("document.getElementById('show_prompt').click()")
        page.type_and_send("And then?")
        second = page.wait_for("document.querySelectorAll('.assistant[data-done]')[1]?.textContent")
        history = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": first},
                   {"role": "user", "content": "And then?"}]
        assert second == "base: " + answer("base", history)
        shown = page.js("document.querySelector('pre.prompt').textContent")
        rendered = httpx.post(f"{srv.url}/tunelab/render", json={"model": "base", "messages": history}).json()
        assert shown == rendered["prompt"] and first in shown
        # another model: a new conversation with the adapter
        page.js("const s = document.getElementById('model'); s.value = 'qa'; s.dispatchEvent(new Event('change'))")
        page.js("document.getElementById('show_prompt').click()")
        page.type_and_send("What colour is the sky?")
        qa_reply = page.wait_for("document.querySelector('.assistant[data-done]')?.textContent")
        assert qa_reply == "qa: " + answer("qa", [{"role": "user", "content": "What colour is the sky?"}])
        assert answer("qa", [{"role": "user", "content": "What colour is the sky?"}]) != \
            answer("base", [{"role": "user", "content": "What colour is the sky?"}])
