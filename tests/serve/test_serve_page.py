"""The browser page at /, driven in headless Chromium through Playwright.

Debian's `chromium` (/usr/bin/chromium, or $GPT2TF_CHROMIUM) is launched directly, since
`playwright install` cannot download browsers here. Without chromium or playwright the tests
skip, unless GPT2TF_REQUIRE_BROWSER is set (CI sets it): then they fail.
"""

import os
import time
from pathlib import Path

import pytest
import requests

from gpt2tf import checkpoints
from gpt2tf.decode import generator as inference
from gpt2tf.serve import app as serve_app
from gpt2tf.serve import schema as serve_schema
from gpt2tf.serve import server as serve_server
from tiny import tiny

CHROMIUM = os.environ.get("GPT2TF_CHROMIUM", "/usr/bin/chromium")
REQUIRE_ENV = "GPT2TF_REQUIRE_BROWSER"
TINY = tiny(n_ctx=128, n_head=2)
XSS = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def need(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{why}, and {REQUIRE_ENV} is set", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    need(sync_playwright is not None, "playwright is not installed (pip install playwright)")
    need(Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        # No sandbox: CI runs as root, where Chromium refuses to start with one.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, chromium_sandbox=False)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model = checkpoints.init_model_dir(tmp_path_factory.mktemp("models") / "tiny", TINY)
    with inference.Generator(model) as gen:
        limits = serve_schema.Limits(max_tokens_limit=50000)
        service = serve_app.Service(gen, model_id="tiny", limits=limits)
        with serve_server.serve_in_thread(service.app()) as base:
            yield base


def open_page(browser, url, **context_options):
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-state=idle]")
    return page


@pytest.fixture
def page(browser, url):
    page = open_page(browser, url)
    yield page
    page.context.close()


def fill(page, prompt: str, **fields) -> None:
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=10).json()


def test_generate_streams_the_seeded_continuation(page, url):
    # The model's name arrives by its own request after the page is ready: wait for it.
    page.wait_for_function("document.getElementById('model').textContent !== ''")
    assert page.text_content("#model") == "tiny"
    fill(page, "Hello there", max_tokens=40, seed=3, temperature=0.9, top_k=40, top_p=1)
    page.click("#generate")
    page.wait_for_selector("body[data-state=done]", timeout=20_000)
    shown = page.text_content("#out-text")
    api = requests.post(f"{url}/v1/completions", timeout=30, json={
        "prompt": "Hello there", "max_tokens": 40, "seed": 3, "temperature": 0.9, "top_k": 40,
        "top_p": 1}).json()["choices"][0]["text"]
    assert shown and shown == api
    assert page.text_content("#out-prompt") == "Hello there"
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")
    assert page.errors == []


def test_markup_in_the_prompt_is_shown_as_text(browser, url):
    # Without the page's Content-Security-Policy, so only the text-node handling stands between
    # the prompt and the DOM: an innerHTML regression would run the onerror handler.
    page = open_page(browser, url, bypass_csp=True)
    fill(page, XSS, max_tokens=8, seed=1)
    page.click("#generate")
    page.wait_for_selector("body[data-state=done]", timeout=20_000)
    page.wait_for_timeout(200)  # give an injected handler the chance to fire
    assert page.text_content("#out-prompt") == XSS
    assert page.locator("#output script, #output img").count() == 0
    assert page.dialogs == []
    page.context.close()
    csp = requests.get(url + "/", timeout=10).headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_stop_aborts_and_the_server_drops_the_generation(page, url):
    fill(page, "A long story", max_tokens=50000, seed=2)
    page.uncheck("#stop_at_eot")  # a random model would end at <|endoftext|> within ~250 tokens
    page.click("#generate")
    deadline = time.monotonic() + 20
    while len(page.text_content("#out-text")) < 20:  # (the CSP forbids wait_for_function)
        assert time.monotonic() < deadline, "no text appeared"
        time.sleep(0.05)
    assert stats(url)["active_rows"] == 1
    cancelled = stats(url)["rows_cancelled"]
    page.click("#stop")
    page.wait_for_selector("body[data-state=stopped]", timeout=5_000)
    deadline = time.monotonic() + 5
    while stats(url)["active_rows"] or stats(url)["rows_cancelled"] == cancelled:
        assert time.monotonic() < deadline, f"generation still running: {stats(url)}"
        time.sleep(0.02)
    assert page.is_enabled("#generate")


def test_server_errors_are_shown(page):
    fill(page, "x", max_tokens=60000)  # over the server's --max_tokens_limit
    page.click("#generate")
    page.wait_for_selector("body[data-state=error]", timeout=10_000)
    assert "max_tokens" in page.text_content("#status")


def test_with_an_api_key_the_page_asks_for_it_once(browser, tmp_path):
    model = checkpoints.init_model_dir(tmp_path / "tiny", TINY)
    with inference.Generator(model) as gen:
        service = serve_app.Service(gen, model_id="tiny",
                                    access=serve_app.Access(api_key="s3cret-key"))
        with serve_server.serve_in_thread(service.app()) as base:
            context = browser.new_context()
            page = context.new_page()
            asked = []
            # The first answer is wrong (the page must ask again), the second right.
            answers = iter(["wrong-key", "s3cret-key"])
            page.on("dialog", lambda d: (asked.append(d.message), d.accept(next(answers))))
            page.goto(base + "/")  # its model request gets a 401: it asks (wrong key)
            page.wait_for_selector("body[data-state=idle]")
            deadline = time.monotonic() + 10
            while not asked:
                assert time.monotonic() < deadline, "the page did not ask for the key"
                time.sleep(0.05)
            fill(page, "Hello there", max_tokens=12, seed=3)
            page.click("#generate")  # asks again (the wrong key was dropped), then streams
            page.wait_for_selector("body[data-state=done]", timeout=20_000)
            assert len(asked) == 2 and "API key" in asked[0]
            assert page.text_content("#out-text")
            page.click("#generate")  # the key is kept for the tab: no third question
            page.wait_for_selector("body[data-state=done]", timeout=20_000)
            assert len(asked) == 2
            context.close()
