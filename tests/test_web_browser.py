"""The chat page in headless Chromium (Debian's chromium + chromedriver, driven by selenium) against a
live server of the default model: it loads with no console error and no request to another host, a
typed question gets a streamed answer, Stop keeps what was said, a reload restores the conversation,
an attached text file goes into the question, an answer carrying markup stays inert, and a server
with an API key asks for it once (a wrong one is refused). One server and one browser for the module;
answers are a few greedy tokens, except where a long one is stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("selenium")

from helpers import LiveServer, chromium, chromium_paths, serve_llm
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from minicpm import LLM

if chromium_paths() is None:
    pytest.skip(
        "headless Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True
    )

NAME = "smol"
KEY = "sk-browser"
WAIT = 120  # seconds: generous, the machine may be busy
SHORT = {"max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def llm(default_model_dir: Path) -> LLM:
    return LLM.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def servers(llm: LLM):
    """Two servers over the one engine (each its own client): one as most run it, one with an API key."""
    both = serve_llm(llm, NAME, sampling_defaults=llm.sampling_defaults), serve_llm(llm, NAME, api_keys=[KEY])
    yield both
    for live in both:
        live.stop()


@pytest.fixture(scope="module")
def server(servers) -> LiveServer:
    return servers[0]


@pytest.fixture(scope="module")
def keyed(servers) -> LiveServer:
    return servers[1]


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = WAIT):
    """``condition(driver)`` once truthy (elements re-rendered meanwhile are looked up again)."""
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=ignored).until(condition)


def open_page(driver, url: str, settings: dict | None = None, keep: bool = False) -> None:
    """``url``'s page with an empty localStorage (unless ``keep``) and ``settings`` stored, once ready.
    The browser's console log then holds this page's messages only."""
    driver.get(url + "/")
    if not keep:
        driver.execute_script("localStorage.clear()")
    if settings is not None:
        driver.execute_script("localStorage.setItem('minicpm.settings', arguments[0])", json.dumps(settings))
    driver.get_log("browser")  # drop the messages of the pages before
    driver.get(url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def ask(driver, question: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)


def answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def answered(driver, count: int = 1) -> str:
    """Wait for answer ``count`` to finish; its text."""
    wait(driver, lambda d: len(answers(d)) >= count and answers(d)[count - 1].get_attribute("data-state") == "done")
    return answers(driver)[count - 1].find_element(By.CLASS_NAME, "body").text


def severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def stored_chats(driver) -> list[dict]:
    return json.loads(driver.execute_script("return localStorage.getItem('minicpm.chats') || '[]'"))


def test_the_page_loads_with_no_console_error_and_no_request_elsewhere(browser, server: LiveServer) -> None:
    browser.get_log("performance")
    open_page(browser, server.url)
    header = browser.find_element(By.ID, "model").text
    assert NAME in header and f"{server.state.max_model_len:,}" in header  # the model and its context
    assert "tokens" in wait(browser, lambda d: d.find_element(By.ID, "context").text)
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0.2"  # the server's default
    assert severe(browser) == []
    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            hosts.add(message["params"]["request"]["url"].split("/")[2])
    assert hosts == {server.url.split("/")[2]}
    for control in ("prompt", "file-input", "temperature", "system-prompt", "api-key"):  # each has a label
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{control}']"), control
    unnamed = browser.execute_script(
        "return [...document.querySelectorAll('button')].filter(b => !(b.getAttribute('aria-label') || "
        "b.textContent).trim()).map(b => b.outerHTML)"
    )
    assert unnamed == []  # a screen reader can name every button


def test_a_typed_question_gets_a_streamed_answer(browser, server: LiveServer) -> None:
    open_page(browser, server.url, {"max_tokens": 24, "temperature": 0})
    browser.execute_script(
        """window.__seen = [];
        new MutationObserver(() => {
          const body = document.querySelector('#messages .message.assistant .body');
          if (body && window.__seen.at(-1) !== body.textContent) window.__seen.push(body.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});"""
    )
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("Write one sentence", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "about the sea.", Keys.ENTER)
    text = answered(browser)
    assert stored_chats(browser)[0]["messages"][0]["content"] == "Write one sentence\nabout the sea."
    assert text.strip()
    partial = [s for s in browser.execute_script("return window.__seen") if s.strip() and s.strip() != text.strip()]
    assert len(set(partial)) >= 2, f"the answer did not arrive in pieces: {partial}"
    stats = answers(browser)[0].find_element(By.CLASS_NAME, "stats").text
    assert "first token" in stats and "tokens/s" in stats
    assert severe(browser) == []


def stop_once_talking(driver, server: LiveServer, press) -> str:
    """Wait for the answer to be streaming with some text, ``press()`` to stop it; the text kept."""
    wait(
        driver,
        lambda d: (
            answers(d)[-1].get_attribute("data-state") == "streaming"
            and len(answers(d)[-1].find_element(By.CLASS_NAME, "body").text) > 20
        ),
    )
    press()
    kept = answered(driver, len(answers(driver)))
    assert len(kept) > 20 and "Stopped." in answers(driver)[-1].text
    assert driver.find_element(By.ID, "send").is_displayed() and not driver.find_element(By.ID, "stop").is_displayed()
    wait(driver, lambda d: server.state.in_flight == 0, 30)  # the server saw the stream dropped
    assert stored_chats(driver)[0]["messages"][-1]["content"].startswith(kept[:10])
    return kept


def test_stop_ends_an_answer_and_keeps_its_text(browser, server: LiveServer) -> None:
    open_page(browser, server.url, {"max_tokens": 2000, "temperature": 0.7})
    ask(browser, "Tell me a long story about a dragon and a knight.")
    stop_once_talking(browser, server, browser.find_element(By.ID, "stop").click)
    answers(browser)[0].find_element(By.XPATH, ".//button[text()='Regenerate']").click()
    stop_once_talking(browser, server, lambda: browser.find_element(By.ID, "prompt").send_keys(Keys.ESCAPE))
    assert len(answers(browser)) == 1  # regenerated in place
    assert severe(browser) == []


def test_a_reload_restores_the_conversation(browser, server: LiveServer) -> None:
    open_page(browser, server.url, SHORT)
    ask(browser, "What is the capital of France?")
    answer = answered(browser)
    before = browser.find_element(By.ID, "messages").text
    open_page(browser, server.url, keep=True)
    assert browser.find_element(By.ID, "messages").text == before and answer in before
    title = browser.find_element(By.CSS_SELECTOR, "#chat-list [aria-current='page']").text
    assert title.startswith("What is the capital")
    copy = answers(browser)[0].find_element(By.XPATH, ".//button[text()='Copy']")
    copy.click()
    wait(browser, lambda d: copy.text == "Copied")
    assert severe(browser) == []


def record_requests(driver) -> None:
    """From now on the page keeps each request it makes (URL and body) in ``window.__sent``."""
    driver.execute_script(
        """window.__sent = [];
        const real = window.fetch;
        window.fetch = (url, init) => {
          window.__sent.push({url: String(url), body: (init && init.body) || null});
          return real(url, init);
        };"""
    )


def sent(driver, path: str) -> list[dict]:
    """The requests the page made to ``path`` since :func:`record_requests`."""
    return [s for s in driver.execute_script("return window.__sent") if s["url"].endswith(path)]


def context_count(driver, good) -> int:
    """The context counter's token count, once ``good(count)``."""

    def count(d) -> int:
        return int(d.find_element(By.ID, "context").get_attribute("data-count") or -1)

    wait(driver, lambda d: good(count(d)))
    return count(driver)


def test_an_attached_text_file_goes_into_the_question(browser, server: LiveServer, tmp_path: Path) -> None:
    open_page(browser, server.url, SHORT)
    empty = context_count(browser, lambda n: n >= 0)
    notes = tmp_path / "notes.txt"
    notes.write_text("Meeting notes. The secret code word is PELICAN.\n" + "Filler line.\n" * 20)
    record_requests(browser)
    browser.find_element(By.ID, "file-input").send_keys(str(notes))
    wait(browser, lambda d: "notes.txt" in d.find_element(By.ID, "attachments").text)
    counted = context_count(browser, lambda n: n > empty + 20)
    assert counted > empty + 20  # the document's tokens, counted by the server's /tokenize
    ask(browser, "What is the secret code word?")
    assert answered(browser).strip()
    chat = [json.loads(s["body"]) for s in sent(browser, "v1/chat/completions")]
    assert len(chat) == 1
    question = chat[0]["messages"][-1]["content"]
    assert "PELICAN" in question and question.rstrip().endswith("What is the secret code word?")
    assert any("PELICAN" in s["body"] for s in sent(browser, "tokenize"))
    assert "notes.txt" in browser.find_element(By.CSS_SELECTOR, ".message.user .docs").text
    assert "PELICAN" in stored_chats(browser)[0]["messages"][0]["docs"][0]["text"]
    assert browser.find_element(By.ID, "attachments").text == ""  # sent with this message, not the next
    assert severe(browser) == []


HOSTILE = (
    "Here you go: <script>window.__pwned = 'script'</script>\n\n"
    "<img src=x onerror=\"window.__pwned = 'img'\">\n\n"
    "[click me](javascript:window.__pwned='link') and **bold** text.\n\n"
    '<a href="javascript:window.__pwned=1">raw</a> <svg onload="window.__pwned=2"></svg>'
)


def test_an_answer_carrying_markup_stays_inert(browser, server: LiveServer) -> None:
    open_page(browser, server.url, SHORT)
    browser.execute_script(  # the server's stream, as if the model had written HOSTILE
        """const answer = arguments[0];
        const real = window.fetch;
        window.fetch = (url, init) => {
          if (!String(url).endsWith('v1/chat/completions')) return real(url, init);
          const pieces = answer.match(/[\\s\\S]{1,7}/g);
          const chunk = (p) => JSON.stringify({choices: [{index: 0, delta: {content: p}}]});
          const frames = pieces.map((p) => 'data: ' + chunk(p) + '\\n\\n');
          frames.push('data: [DONE]\\n\\n');
          const bytes = new TextEncoder();
          const body = new ReadableStream({
            pull(c) { const f = frames.shift(); if (f) c.enqueue(bytes.encode(f)); else c.close(); },
          });
          return Promise.resolve(new Response(body, {headers: {'Content-Type': 'text/event-stream'}}));
        };""",
        HOSTILE,
    )
    ask(browser, "Show me some HTML.")
    answered(browser)

    def inert() -> None:
        view = answers(browser)[0]
        assert browser.execute_script("return window.__pwned") is None
        assert "<script>" in view.text  # shown as text
        assert browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages img, #messages svg") == []
        assert browser.find_elements(By.CSS_SELECTOR, "#messages [onerror], #messages [onload]") == []
        hrefs = [a.get_attribute("href") for a in view.find_elements(By.TAG_NAME, "a")]
        assert not any(h and h.lower().startswith("javascript:") for h in hrefs), hrefs
        assert view.find_element(By.TAG_NAME, "strong").text == "bold"  # Markdown still renders

    inert()
    open_page(browser, server.url, keep=True)  # rendered again from localStorage
    inert()
    # the page's renderer, called directly
    found = browser.execute_script(
        """const div = document.createElement('div');
        document.body.append(div);
        window.minicpmChat.renderMarkdown(div, arguments[0]);
        const links = [...div.querySelectorAll('a')].map((a) => a.getAttribute('href') || '');
        const active = div.querySelectorAll('script, img, svg, iframe, [onerror], [onload]').length;
        div.remove();
        return {active, js: links.filter((h) => h.trim().toLowerCase().startsWith('javascript:')).length};""",
        HOSTILE,
    )
    assert found == {"active": 0, "js": 0}
    assert browser.execute_script("return window.__pwned") is None
    assert severe(browser) == []


def test_a_server_with_a_key_asks_for_it_once(browser, keyed: LiveServer) -> None:
    browser.get(keyed.url + "/")
    browser.execute_script(
        "localStorage.clear(); localStorage.setItem('minicpm.settings', arguments[0])", json.dumps(SHORT)
    )
    browser.get(keyed.url + "/")
    dialog = wait(
        browser,
        lambda d: (
            d.find_element(By.ID, "key-dialog").get_attribute("open") is not None
            and d.find_element(By.ID, "key-dialog")
        ),
    )
    assert "needs an API key" in dialog.text
    field = browser.find_element(By.ID, "api-key")
    assert browser.switch_to.active_element == field  # focus moves to the key field
    field.send_keys("sk-wrong" + Keys.ENTER)
    wait(browser, lambda d: "Wrong key" in d.find_element(By.ID, "key-error").text)
    assert browser.execute_script("return localStorage.getItem('minicpm.apiKey')") is None
    field.clear()
    field.send_keys(KEY + Keys.ENTER)
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    assert not browser.find_element(By.ID, "key-dialog").is_displayed()
    assert NAME in browser.find_element(By.ID, "model").text
    ask(browser, "What is the capital of France?")
    assert answered(browser).strip()

    open_page(browser, keyed.url, keep=True)  # remembered: no dialog after a reload
    assert not browser.find_element(By.ID, "key-dialog").is_displayed()
    assert len(answers(browser)) == 1

    browser.execute_script("localStorage.setItem('minicpm.apiKey', 'sk-stale')")  # a key the server no longer takes
    browser.get(keyed.url + "/")
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "key-message").text)


def test_a_phone_reads_it_without_sideways_scrolling_light_or_dark(browser, server: LiveServer) -> None:
    long_code = "```python\n" + "x = '" + "a" * 300 + "'\n```\n\n" + "averyveryverylongword" * 20
    long_code += "\n\n| " + " | ".join(f"column{i}" for i in range(12)) + " |\n|" + "---|" * 12 + "\n"
    chat = {"id": "c1", "title": "A long one", "messages": [{"role": "user", "content": "Show me."}]}
    chat["messages"].append({"role": "assistant", "content": long_code, "stats": {"ttft": 0.1, "tps": 9, "tokens": 9}})
    open_page(browser, server.url)
    browser.execute_script(
        "localStorage.setItem('minicpm.chats', arguments[0]); localStorage.setItem('minicpm.current', 'c1')",
        json.dumps([chat]),
    )
    phone = {"width": 390, "height": 800, "deviceScaleFactor": 1, "mobile": True}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
    try:
        open_page(browser, server.url, keep=True)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        chats, toggle = browser.find_element(By.ID, "chats"), browser.find_element(By.ID, "toggle-chats")
        assert toggle.is_displayed() and not chats.is_displayed()
        toggle.click()
        assert chats.is_displayed() and toggle.get_attribute("aria-expanded") == "true"
        assert browser.switch_to.active_element == browser.find_element(By.ID, "new-chat")
        background = "return getComputedStyle(document.body).backgroundColor"
        light = browser.execute_script(background)
        browser.execute_cdp_cmd(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
        )
        dark = browser.execute_script(background)
        assert light == "rgb(255, 255, 255)" and dark != light  # the system's light or dark preference
        assert severe(browser) == []
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF showing ``lines`` in Helvetica (a standard font, not embedded)."""
    text = "BT /F1 14 Tf 72 720 Td 18 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> "
        ">>",
        f"<< /Length {len(text)} >>\nstream\n{text}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    out, offsets = "%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("latin-1")


def test_a_pdfs_text_is_read_in_the_browser(browser, server: LiveServer, tmp_path: Path) -> None:
    open_page(browser, server.url, SHORT)
    record_requests(browser)
    report = tmp_path / "report.pdf"
    report.write_bytes(minimal_pdf(["Quarterly report.", "Revenue grew by 12 percent."]))
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n")
    browser.find_element(By.ID, "file-input").send_keys(f"{report}\n{tmp_path / 'picture.png'}")
    wait(browser, lambda d: "picture.png: only .txt, .md and .pdf" in d.find_element(By.ID, "status").text)
    assert "report.pdf" in browser.find_element(By.ID, "attachments").text  # the PDF, not the picture
    wait(browser, lambda d: any("Revenue grew by 12 percent" in (s["body"] or "") for s in sent(d, "tokenize")))
    assert severe(browser) == []


def test_edit_resend_system_prompt_and_new_chat(browser, server: LiveServer) -> None:
    open_page(browser, server.url, SHORT)
    browser.find_element(By.ID, "open-settings").click()
    system = browser.find_element(By.ID, "system-prompt")
    system.send_keys("Answer in one word.")
    browser.find_element(By.CSS_SELECTOR, "#settings-form button[type='submit']").click()
    record_requests(browser)
    ask(browser, "Name a color.")
    answered(browser)
    edit = browser.find_element(By.XPATH, "//article[contains(@class, 'user')]//button[text()='Edit']")
    edit.click()
    box = browser.find_element(By.CSS_SELECTOR, "textarea.edit")
    assert browser.switch_to.active_element == box
    box.clear()
    box.send_keys("Name a fruit." + Keys.ENTER)
    wait(browser, lambda d: len(sent(d, "v1/chat/completions")) == 2)
    answered(browser)
    first, second = (json.loads(s["body"])["messages"] for s in sent(browser, "v1/chat/completions"))
    assert first[0] == {"role": "system", "content": "Answer in one word."} and first[1]["content"] == "Name a color."
    assert second[0] == first[0] and second[1:] == [{"role": "user", "content": "Name a fruit."}]  # the edit, alone
    messages = browser.find_element(By.ID, "messages").text
    assert "Name a fruit." in messages and "Name a color." not in messages and len(answers(browser)) == 1
    browser.find_element(By.ID, "new-chat").click()
    wait(browser, lambda d: d.find_element(By.ID, "empty").is_displayed() and not answers(d))
    assert browser.switch_to.active_element == browser.find_element(By.ID, "prompt")
    titles = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#chat-list .chat-title")]
    assert titles == ["Name a color."]  # the conversation is kept in the list (named by its first question)
    assert severe(browser) == []


def test_a_send_that_would_not_fit_is_refused_or_warned_about(browser, server: LiveServer, tmp_path: Path) -> None:
    limit = server.state.max_model_len
    open_page(browser, server.url, {"max_tokens": limit - 20, "temperature": 0})
    record_requests(browser)
    ask(browser, "Hello there, how are you today?")  # fits, but leaves less room than max_tokens asks
    status = browser.find_element(By.ID, "status")
    wait(browser, lambda d: "Press Send again" in status.text)
    assert "tokens are left for the answer" in status.text and not sent(browser, "v1/chat/completions")
    assert not answers(browser) and browser.find_element(By.ID, "prompt").get_attribute("value")  # nothing lost

    big = tmp_path / "big.txt"
    big.write_text("word " * (limit + 100))
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "file-input").send_keys(str(big))
    context = browser.find_element(By.ID, "context")
    wait(browser, lambda d: "over" in context.get_attribute("class"))  # the counter shows it first
    ask(browser, "Summarize this.")
    wait(browser, lambda d: "Too long to send" in status.text)
    assert f"the model takes {limit:,}" in status.text and not sent(browser, "v1/chat/completions")
    assert severe(browser) == []
