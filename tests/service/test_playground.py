"""The playground page at `/` (service/static/playground.html), driven in a real headless Chromium
over a real uvicorn serving the demo checkpoint.

The browser is Debian's `chromium` with its `chromedriver` (package `chromium-driver`; `.ci/run`
installs both). Selenium is handed both paths and runs with `SE_OFFLINE=true`, so Selenium
Manager never downloads a browser or a driver. A screenshot of the answered question is kept at
`tests/artifacts/playground.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
QUESTION = "Where was Sethna Drorpethwais born?"
ANSWER = "Krendeimpe"  # the demo world's answer (artifacts/demo/world/test.jsonl)
TIMEOUT_S = 60


@pytest.fixture
def browser(monkeypatch):
    """A headless Chromium session; fails (not skips) when the browser or Selenium is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the playground test needs Debian's chromium and "
            "chromedriver. `.ci/run` installs them (apt-get install chromium chromium-driver)."
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -c constraints.txt -e '.[test]'")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1000,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, message: str, timeout_s: float = TIMEOUT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition, message)


def text(driver, css: str) -> str:
    """An element's whole text (textContent: collapsed <details> included), '' if absent."""
    found = driver.find_elements("css selector", css)
    return found[0].get_attribute("textContent") if found else ""


def ask(driver, question: str) -> None:
    box = driver.find_element("id", "question")
    box.clear()
    box.send_keys(question)
    driver.find_element("id", "ask").click()


def severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_root_serves_the_page(demo_app, serve_app):
    """Guards against: the page missing from `/` (or the installed package), served as something
    other than HTML, or listed in the OpenAPI schema as an API route."""
    url = serve_app(demo_app)
    page = httpx.get(f"{url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="answer"' in page.text and "v1/chat/completions" in page.text
    assert "/" not in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_playground_shows_searches_documents_and_the_answer(demo_app, serve_app, browser):
    """Guards against: a page that cannot drive the streaming API (SSE parsing, model pick), tags
    shown as text instead of splitting the trace, documents not collapsed, the `: searching`
    comment not shown, the final chunk's search_trace and usage lost, and external resources or
    script errors (the console must stay clean)."""
    url = serve_app(demo_app)
    browser.get(f"{url}/")
    assert browser.title == "searchagent playground"
    wait(browser, lambda d: text(d, "#model option") == "demo", "GET v1/models not shown")
    browser.execute_script(  # the indicator is brief with the demo index: record that it showed.
        # From the records, not the element's state when the callback runs: shown and hidden again
        # in one task (both SSE events in one read) leaves it hidden by then. Each record holds the
        # value before it, so the value after it is the next record's old value (the last one's
        # is the current state); a null there is a moment the `hidden` attribute was absent.
        "window.sawSearching = false;"
        "const el = document.getElementById('searching');"
        "new MutationObserver((records) => {"
        " const after = records.slice(1).map((r) => r.oldValue);"
        " after.push(el.getAttribute('hidden'));"
        " if (after.includes(null)) window.sawSearching = true; })"
        ".observe(el, {attributes: true, attributeFilter: ['hidden'], attributeOldValue: true});"
    )
    ask(browser, QUESTION)
    wait(
        browser,
        lambda d: text(d, ".search").strip() and ANSWER in text(d, "#answer"),
        f"no search and no answer containing {ANSWER!r} within {TIMEOUT_S} s",
    )
    wait(browser, lambda d: "1 search" in text(d, "#usage"), "usage never shown")

    assert "Sethna Drorpethwais" in text(browser, ".search")
    documents = browser.find_elements("css selector", "#trace details.documents")
    assert len(documents) == 1 and documents[0].get_attribute("open") is None  # collapsed
    assert ANSWER in documents[0].get_attribute("textContent")  # the injected passages
    assert browser.find_elements("css selector", "#trace .thought")
    trace = text(browser, "#trace")
    assert not any(tag in trace for tag in ("<search>", "</search>", "<documents>", "<think>"))
    assert browser.execute_script("return window.sawSearching") is True
    sources = text(browser, "#sources")
    assert "Sethna Drorpethwais" in sources and "birthplace" in sources
    assert browser.find_element("id", "error").get_attribute("hidden") is not None
    assert severe_console_errors(browser) == []

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    assert browser.save_screenshot(str(shot)), "screenshot failed"
    assert shot.stat().st_size > 10_000


def test_playground_with_api_keys(demo_artifacts, serve_app, browser, tmp_path):
    """Guards against: the page itself needing a key (the user could never type one in), a 401
    not shown in the page, the key not sent as a Bearer token, and the key not kept across
    reloads."""
    key = "sk-playground-0123456789"
    settings = Settings(
        model=demo_artifacts / "sft",
        index=demo_artifacts / "index",
        served_model_name="demo",
        api_keys=[key],
    )
    url = serve_app(create_app(settings))
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401

    browser.get(f"{url}/")
    assert browser.title == "searchagent playground"
    wait(browser, lambda d: "401" in text(d, "#models-note"), "the models 401 not shown")
    ask(browser, QUESTION)
    wait(browser, lambda d: "Incorrect or missing API key" in text(d, "#error"), "no 401 shown")
    assert "HTTP 401" in text(browser, "#error") and not text(browser, "#answer")
    browser.save_screenshot(str(tmp_path / "playground-401.png"))

    browser.find_element("id", "api-key").send_keys(key)
    ask(browser, QUESTION)
    wait(browser, lambda d: ANSWER in text(d, "#answer"), "no answer with the key")
    assert browser.find_element("id", "error").get_attribute("hidden") is not None
    browser.refresh()
    assert browser.find_element("id", "api-key").get_attribute("value") == key
    wait(browser, lambda d: text(d, "#model option") == "demo", "models not listed with the key")


# A stream as the service sends it: a comment, frames with multi-byte text, CRLF line ends.
SSE_TEXT = (
    'data: {"t": "<think> Kr\\u00e9nd \\ud83d\\ude42</think>"}\n\n'
    ": searching\n\n"
    'data: {"t": "\u00fcber \U0001f642"}\r\n\r\n'
    "data: [DONE]\n\n"
)
REASONING = (
    "<think> I need the birthplace.</think><search> Sethna birthplace</search>"
    "<documents> (1) Sethna: born in Krendeimpe, not a <b>tag</b>.</documents>"
    "<think> He was born in Krendeimpe.</think>"
    "<|begin_of_query|> second query<|end_of_query|><|begin_of_documents|> more"
    "<|end_of_documents|>"
)


def test_stream_parsing_survives_any_split(demo_app, serve_app, browser):
    """Guards against: SSE frames, UTF-8 characters or trace tags split across reads and deltas
    being lost, duplicated or shown as text (the network splits where it likes)."""
    browser.get(f"{serve_app(demo_app)}/")
    result = browser.execute_async_script(
        """
        const [sse, reasoning, done] = arguments;
        const bytes = new TextEncoder().encode(sse);
        const read = async (size) => {
          const body = new ReadableStream({ start(c) {
            for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size));
            c.close();
          } });
          const events = [];
          await readSSE(body, (d) => events.push(d), (c) => events.push(":" + c));
          return JSON.stringify(events);
        };
        const trace = (size) => {
          const box = document.createElement("div");
          const view = new TraceView(box);
          for (let i = 0; i < reasoning.length; i += size) view.feed(reasoning.slice(i, i + size));
          view.end();
          return JSON.stringify([...box.children].map((n) => [n.className, n.textContent]));
        };
        (async () => {
          const out = { sse: [], trace: [] };
          for (let size = 1; size <= 9; size++) {
            out.sse.push(await read(size));
            out.trace.push(trace(size));
          }
          out.sse.push(await read(bytes.length));
          out.trace.push(trace(reasoning.length));
          done(out);
        })().catch((e) => done({ error: String(e) }));
        """,
        SSE_TEXT,
        REASONING,
    )
    assert "error" not in result, result["error"]
    whole_sse, whole_trace = result["sse"][-1], result["trace"][-1]
    assert json.loads(whole_sse) == [
        '{"t": "<think> Kr\\u00e9nd \\ud83d\\ude42</think>"}',
        ":searching",
        '{"t": "\u00fcber \U0001f642"}',
        "[DONE]",
    ]
    assert json.loads(whole_trace) == [
        ["thought", "I need the birthplace."],
        ["search", "Sethna birthplace"],
        ["documents", "Documents 1(1) Sethna: born in Krendeimpe, not a <b>tag</b>."],
        ["thought", "He was born in Krendeimpe."],
        ["search", "second query"],
        ["documents", "Documents 2more"],
    ]
    assert set(result["sse"]) == {whole_sse} and set(result["trace"]) == {whole_trace}
