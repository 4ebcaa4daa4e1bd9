"""Screenshots of ``minicpm serve``'s chat page for the docs: docs/web-chat.png (desktop) and
docs/web-chat-phone.png (a phone, dark), a short conversation with the default model.

Contract: ``python scripts/web_screenshot.py [--out DIR]`` starts a server over the embedded default
model in this process (the tests' helpers), drives headless Chromium (Debian's ``chromium`` and
``chromium-driver``) through a conversation with an attached document, and writes the two PNGs.
Needs what tests/test_web_browser.py needs; raises if the browser is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import chromium, serve_llm  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from minicpm import LLM  # noqa: E402
from minicpm.default_model import default_model_path  # noqa: E402

NOTE = """Release notes, version 2.4

- The importer now reads CSV files with a header row.
- Exports are 30% faster.
- Dark mode follows the system setting.
"""

DONE = "return [...document.querySelectorAll('.message.assistant')].filter(a => a.dataset.state === 'done').length"
SHOTS = [("web-chat.png", 1100, 900, False), ("web-chat-phone.png", 390, 760, True)]  # name, width, height, phone


def converse(driver, url: str, doc: Path) -> None:
    """Open the page and hold a two-question conversation, the first about ``doc``."""
    driver.get(url + "/")
    settings = json.dumps({"max_tokens": 160, "temperature": 0})
    driver.execute_script("localStorage.clear(); localStorage.setItem('minicpm.settings', arguments[0])", settings)
    driver.get(url + "/")
    wait = WebDriverWait(driver, 300)
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    driver.find_element(By.ID, "file-input").send_keys(str(doc))
    wait.until(lambda d: doc.name in d.find_element(By.ID, "attachments").text)
    for n, question in enumerate(
        ["What changed in this release?", "Write a Python function that reverses a string."], start=1
    ):
        box = driver.find_element(By.ID, "prompt")
        box.send_keys(question + Keys.ENTER)
        wait.until(lambda d, n=n: d.execute_script(DONE) >= n)
    driver.execute_script("window.scrollTo(0, document.scrollingElement.scrollHeight)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="directory for the PNGs (default docs/)")
    args = parser.parse_args()
    llm = LLM.from_pretrained(default_model_path())
    live = serve_llm(llm, "SmolLM2-135M-Instruct", sampling_defaults=llm.sampling_defaults)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            doc = Path(tmp) / "release-notes.md"
            doc.write_text(NOTE)
            for name, width, height, phone in SHOTS:  # the phone in dark mode
                driver = chromium(width, height, dark=phone, phone=phone)
                try:
                    converse(driver, live.url, doc)
                    driver.save_screenshot(str(args.out / name))
                finally:
                    driver.quit()
                print(args.out / name)
    finally:
        live.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
