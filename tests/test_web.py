"""The chat page's files over plain HTTP (no browser, no model): served at / unless ``--no-web``, with
the right content types and security headers, without the API key that the API routes need, nothing
loaded from another host, every file shipped as package data, the vendored libraries as their
manifest records them."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from minicpm.cli import build_parser
from minicpm.engine.client import EngineLimits
from minicpm.server.app import ServerState, build_app
from minicpm.server.page import WEB_DIR

ROOT = Path(__file__).resolve().parents[1]
OWN_FILES = ["index.html", "app.js", "render.js", "documents.js", "style.css", "icon.svg"]


class _NoEngine:
    """Enough of an engine client for routes that generate nothing."""

    alive = True

    def limits(self) -> EngineLimits:
        return EngineLimits(max_model_len=4096, vocab_size=32000, max_num_seqs=4)

    def close(self) -> None:
        pass


def _client(**fields) -> TestClient:
    state = ServerState(engine=_NoEngine(), tokenizer=None, served_names=["smol"], **fields)
    return TestClient(build_app(state))


@pytest.fixture(scope="module")
def web() -> TestClient:
    return _client()


def _page_references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#]+)"', html)


def test_the_page_and_every_file_it_references_are_served(web: TestClient) -> None:
    page = web.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>" in page.text and 'id="prompt"' in page.text
    referenced = _page_references(page.text)
    assert {"web/app.js", "web/style.css", "web/vendor/marked/marked.umd.js"} <= set(referenced)
    # the modules app.js imports, and pdf.js (imported when a PDF is attached) with its worker
    for name in ("app.js", "documents.js"):
        source = (WEB_DIR / name).read_text()
        referenced += ["web/" + m.removeprefix("./") for m in re.findall(r'(?:from |import\()"(\./[^"]+)"', source)]
    referenced += ["web/vendor/pdfjs/pdf.worker.min.mjs"]
    assert "web/render.js" in referenced and "web/vendor/pdfjs/pdf.min.mjs" in referenced
    for path in referenced:
        response = web.get("/" + path)
        assert response.status_code == 200, path
        assert response.content == (WEB_DIR / path.removeprefix("web/")).read_bytes()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/web/app.js", "text/javascript; charset=utf-8"),
        ("/web/vendor/pdfjs/pdf.worker.min.mjs", "text/javascript; charset=utf-8"),  # a module worker needs it
        ("/web/style.css", "text/css; charset=utf-8"),
        ("/web/icon.svg", "image/svg+xml"),
        ("/web/index.html", "text/html; charset=utf-8"),
    ],
)
def test_static_files_have_their_content_type_and_security_headers(web: TestClient, path: str, content_type: str):
    response = web.get(path)
    assert response.status_code == 200 and response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe" not in policy and "http" not in policy  # no inline script, no eval, no other host


@pytest.mark.parametrize(
    "path",
    [
        "/web/nothing.js",
        "/web/../page.py",
        "/web/%2e%2e/page.py",
        "/web/..%2fapp.py",
        "/web/vendor/VERSIONS.txt",  # not a type the page loads
        "/web/vendor/marked/LICENSE",
        "/web/vendor",
    ],
)
def test_only_the_pages_files_are_served(web: TestClient, path: str) -> None:
    response = web.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404  # the API's error envelope


def test_no_web_serves_the_api_only() -> None:
    api_only = _client(web=False)
    for path in ("/", "/web/app.js", "/web/index.html"):
        assert api_only.get(path).status_code == 404, path
    assert api_only.get("/v1/models").status_code == 200
    assert build_parser().parse_args(["serve", "--no-web"]).no_web is True
    assert build_parser().parse_args(["serve"]).no_web is False


def test_the_page_needs_no_key_the_api_does() -> None:
    keyed = _client(api_keys=["sk-page"])
    for path in ("/", "/web/app.js", "/web/vendor/dompurify/purify.min.js"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.post("/tokenize", json={"prompt": "hi"}).status_code == 401
    models = keyed.get("/v1/models", headers={"Authorization": "Bearer sk-page"}).json()["data"][0]
    assert models["max_model_len"] == 4096 and "sampling_defaults" in models  # what the page starts from


URL = re.compile(r"https?://[^\s\"'`)<>]+")
# Loading something: a URL as a script/style/image source, an import, a fetch, a worker (JavaScript); a
# url() or @import (CSS). (A JavaScript ``new URL("https://…")`` only parses: core-js's feature tests.)
LOADED = {
    ".js": re.compile(
        r"""(?:(?:src|href|action)\s*=\s*['"]|\bimport\s*\(?\s*['"]|\bfrom\s*['"]|importScripts\(\s*['"]|"""
        r"""fetch\(\s*['"]|Worker\(\s*['"])https?://"""
    ),
    ".css": re.compile(r"""(?:url\(\s*['"]?|@import\s+(?:url\()?['"]?)https?://""", re.IGNORECASE),
}
LOADED[".mjs"] = LOADED[".js"]


def test_no_served_file_loads_anything_from_another_host() -> None:
    for name in OWN_FILES:  # ours: no URL at all but the SVG namespace
        text = (WEB_DIR / name).read_text()
        urls = [u for u in URL.findall(text) if u != "http://www.w3.org/2000/svg"]
        assert not urls, f"{name}: {urls}"
    vendored = [p for p in (WEB_DIR / "vendor").rglob("*") if p.suffix in (".js", ".mjs", ".css")]
    assert len(vendored) >= 6
    for path in vendored:  # theirs: URLs appear in comments, messages and XML namespaces, never loaded
        text = path.read_text(encoding="utf-8")
        found = [text[m.start() : m.start() + 80] for m in LOADED[path.suffix].finditer(text)]
        assert not found, f"{path.relative_to(WEB_DIR)}: {found}"
        assert "sourceMappingURL" not in text, path  # the maps are not vendored: no request for one


def test_every_page_file_is_package_data() -> None:
    """A non-editable install ships the page: each file under web/ matches a package-data glob."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    base = WEB_DIR.parent
    shipped = {p for pattern in data["minicpm.server"] for p in base.glob(pattern) if p.is_file()}
    files = {p for p in WEB_DIR.rglob("*") if p.is_file()}
    assert files - shipped == set()


def test_vendored_libraries_match_their_manifest_and_carry_their_licenses() -> None:
    vendor = WEB_DIR / "vendor"
    header, _, listing = (vendor / "VERSIONS.txt").read_text().partition("\n\n")
    packages = dict(line.split() for line in header.splitlines() if not line.startswith("#"))
    assert set(packages) == {"marked", "dompurify", "@highlightjs/cdn-assets", "pdfjs-dist"}
    digests = {name.removeprefix("./"): digest for digest, name in map(str.split, listing.splitlines())}
    files = {str(p.relative_to(vendor)) for p in vendor.rglob("*") if p.is_file() and p.name != "VERSIONS.txt"}
    assert set(digests) == files
    for name, digest in digests.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    for library in {Path(name).parent for name in files}:
        assert (vendor / library / "LICENSE").is_file(), library
    assert sum((vendor / name).stat().st_size for name in files) < 3 << 20  # minified builds only
    assert (ROOT / "scripts" / "refresh_web_vendor.sh").is_file()
