"""GraphiQL with no internet: bootstrap keeps the files Strawberry's page loads from
unpkg.com (taken from the npm registry, checked against the page's integrity hashes) in
var/graphiql/; the server then serves them, and a page that names no other origin, under
a policy of 'self' only. Without them, the page is Strawberry's (the CDN's), said at
start. In headless Chromium, with every request to another origin refused, the editor
renders and runs a query."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Route, expect
from starlette.applications import Starlette

from db.settings import Settings
from graph import graphiql
from graph.app import create_app
from tests.browser import ARTIFACTS, chromium, served
from tests.conftest import client_for, running

HTML = {"accept": "text/html"}
_REFERENCE = re.compile(r"""<(script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)


def _local_files_present() -> bool:
    page = graphiql.strawberry_page()
    return all((graphiql.ASSETS / asset.name).is_file() for asset in graphiql.assets(page))


def _need_local_files() -> None:
    if not _local_files_present():
        pytest.skip(
            f"NO LOCAL GRAPHIQL FILES in {graphiql.ASSETS}: the offline GraphiQL test DID "
            "NOT RUN. Run scripts/bootstrap with Node.js and npm installed (it fetches "
            "them from the npm registry)."
        )


def _need_chromium() -> None:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found or not os.access(found, os.X_OK):
        pytest.skip(
            "NO CHROMIUM: the browser test of GraphiQL offline DID NOT RUN. Install "
            "Debian's chromium (apt-get install chromium) or set CHROMIUM to a Chromium "
            "binary."
        )


def _policy(response: httpx.Response) -> dict[str, list[str]]:
    return {
        name: values
        for name, *values in (
            part.split() for part in response.headers["content-security-policy"].split(";")
        )
    }


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """What strawgate.graphiql logs (the strawgate logger may not propagate to pytest's)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("strawgate.graphiql")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


# --- The page and its files ------------------------------------------------------------


async def test_the_page_names_no_other_origin_and_its_files_are_served(
    make_settings: Callable[..., Settings], log_lines: list[str]
) -> None:
    _need_local_files()
    app = create_app(make_settings())
    assert any("no CDN" in line for line in log_lines), log_lines
    async for _ in running(app):
        async with client_for(app) as http:
            page = await http.get("/graphql", headers=HTML)
            assert page.status_code == 200
            references = _REFERENCE.findall(page.text)
            files = [url for tag, url in references if not url.startswith("data:")]
            assert len(files) == len(graphiql.assets(graphiql.strawberry_page())) == 7
            assert all(url.startswith(graphiql.PREFIX) for url in files), files
            assert "unpkg.com" not in page.text
            policy = _policy(page)
            for directive in ("script-src", "style-src", "font-src", "img-src", "connect-src"):
                assert not [v for v in policy[directive] if "://" in v], (directive, policy)
            assert policy["script-src"][0] == "'self'"
            assert "'unsafe-inline'" not in policy["script-src"]
            assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
            assert page.headers["cache-control"] == "no-store"

            integrity = dict(re.findall(r'(?:src|href)="([^"]+)"\s+integrity="([^"]+)"', page.text))
            for url in files:
                served_file = await http.get(url)
                assert served_file.status_code == 200, url
                expected = "text/css" if url.endswith(".css") else "text/javascript"
                assert served_file.headers["content-type"] == f"{expected}; charset=utf-8"
                assert served_file.headers["cache-control"] == "public, max-age=31536000, immutable"
                assert served_file.headers["x-content-type-options"] == "nosniff"
                assert graphiql.intact(served_file.content, integrity[url]), url
                head = await http.head(url)
                assert head.status_code == 200 and head.content == b""

            for path in (
                "graphiql@3.8.3/graphiql.min.js.map",  # in the package, not on the page
                "../pyproject.toml",
                "%2e%2e/%2e%2e/pyproject.toml",
                "react@18.2.0/package.json",
            ):
                refused = await http.get(graphiql.PREFIX + path)
                assert refused.status_code == 404, path
                assert refused.headers["cache-control"] == "no-store"


async def test_without_its_files_the_page_is_strawberrys_and_says_so(
    make_settings: Callable[..., Settings],
    log_lines: list[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(graphiql, "ASSETS", tmp_path)
    app = create_app(make_settings())
    (line,) = log_lines
    assert "GraphiQL loads its scripts and styles from https://unpkg.com/" in line
    assert f"7 of its 7 files are not in {tmp_path}" in line
    async for _ in running(app):
        async with client_for(app) as http:
            page = await http.get("/graphql", headers=HTML)
            assert page.text == graphiql.strawberry_page()
            assert "https://unpkg.com" in _policy(page)["script-src"]
            missing = await http.get(graphiql.PREFIX + "react@18.2.0/umd/react.production.min.js")
            assert missing.status_code == 404


async def test_with_graphiql_off_neither_it_nor_its_files_are_served(
    make_settings: Callable[..., Settings], log_lines: list[str]
) -> None:
    # GRAPHIQL=false, as production has it by default.
    app = create_app(make_settings(graphiql=False))
    assert log_lines == []  # nothing to say about it
    async for _ in running(app):
        async with client_for(app) as http:
            page = await http.get("/graphql", headers=HTML)
            assert page.status_code >= 400
            gone = await http.get(graphiql.PREFIX + "react@18.2.0/umd/react.production.min.js")
            assert gone.status_code == 404


# --- Fetching (bootstrap) --------------------------------------------------------------


def _sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


def _tarball(folder: Path, name: str, files: dict[str, bytes]) -> None:
    with tarfile.open(folder / f"{name}-1.0.0.tgz", "w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(f"package/{path}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _fake_npm(folder: Path, tarballs: Path) -> str:
    """An `npm` that packs from `tarballs` (as `npm pack --json` answers), and notes
    each call in calls.txt."""
    program = folder / "npm"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, shutil, sys\n"
        f"tarballs = pathlib.Path({str(tarballs)!r})\n"
        "args = sys.argv[1:]\n"
        f"calls = open({str(folder / 'calls.txt')!r}, 'a')\n"
        "calls.write(' '.join(args) + '\\n')\n"
        "dest = pathlib.Path(args[args.index('--pack-destination') + 1])\n"
        "answer = []\n"
        "for spec in [a for a in args if '@' in a and not a.startswith('-')]:\n"
        "    name, version = spec.rsplit('@', 1)\n"
        "    filename = f'{name}-{version}.tgz'\n"
        "    shutil.copy(tarballs / filename, dest / filename)\n"
        "    answer.append({'name': name, 'version': version, 'filename': filename})\n"
        "print(json.dumps(answer))\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return str(program)


PAGE_JS = b"console.log('the page');\n"
PAGE_CSS = b"a {}"
PAGE = (
    '<script src="https://unpkg.com/demo@1.0.0/dist/a.js" '
    f'integrity="{_sri(PAGE_JS)}"></script>'
    '<link rel="stylesheet" href="https://unpkg.com/demo@1.0.0/a.css" '
    f'integrity="{_sri(PAGE_CSS)}" />'
)


def test_fetch_keeps_the_pages_files_and_then_has_nothing_to_do(tmp_path: Path) -> None:
    tarballs = tmp_path / "registry"
    tarballs.mkdir()
    _tarball(tarballs, "demo", {"dist/a.js": PAGE_JS, "a.css": PAGE_CSS, "evil.js": b"x"})
    npm = _fake_npm(tmp_path, tarballs)
    kept = tmp_path / "assets"
    out = io.StringIO()
    assert graphiql.fetch(kept, html=PAGE, npm=npm, out=out)
    assert out.getvalue().count("\n") == 1, out.getvalue()
    assert "2 files kept" in out.getvalue()
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "demo@1.0.0/a.css",
        "demo@1.0.0/dist/a.js",
    ]
    assert (kept / "demo@1.0.0/dist/a.js").read_bytes() == PAGE_JS
    again = io.StringIO()
    assert graphiql.fetch(kept, html=PAGE, npm=npm, out=again)
    assert again.getvalue() == ""
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 1  # no second npm call
    calls = (tmp_path / "calls.txt").read_text()
    assert "--ignore-scripts" in calls and "--fetch-retries=1" in calls
    # The served page is the local copy once every file is there.
    ide = graphiql.ide_page(PAGE, kept)
    assert ide.local and "unpkg" not in ide.html
    assert f'src="{graphiql.PREFIX}demo@1.0.0/dist/a.js"' in ide.html


def test_fetch_refuses_a_file_that_fails_the_pages_integrity_hash(tmp_path: Path) -> None:
    tarballs = tmp_path / "registry"
    tarballs.mkdir()
    _tarball(tarballs, "demo", {"dist/a.js": b"alert('not the page')", "a.css": PAGE_CSS})
    kept = tmp_path / "assets"
    out = io.StringIO()
    assert not graphiql.fetch(kept, html=PAGE, npm=_fake_npm(tmp_path, tarballs), out=out)
    assert out.getvalue().count("\n") == 1
    assert "demo@1.0.0/dist/a.js fails its integrity hash" in out.getvalue()
    assert "GraphiQL will load its scripts from https://unpkg.com/" in out.getvalue()
    assert not (kept / "demo@1.0.0/dist/a.js").exists()
    assert not graphiql.ide_page(PAGE, kept).local


def test_fetch_without_npm_says_graphiql_uses_the_cdn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    out = io.StringIO()
    assert not graphiql.fetch(tmp_path / "assets", out=out)
    assert out.getvalue() == (
        "GraphiQL: npm is not installed: GraphiQL will load its scripts from "
        "https://unpkg.com/ (it needs the internet)\n"
    )


def test_fetch_with_the_registry_unreachable_says_so_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the unreachable-registry path of the fetch DID NOT RUN")
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # nothing listens
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "empty-cache"))
    out = io.StringIO()
    started = time.monotonic()
    assert not graphiql.fetch(tmp_path / "assets", out=out)
    assert time.monotonic() - started < 30
    assert out.getvalue().count("\n") == 1, out.getvalue()
    assert "npm pack failed" in out.getvalue() and "ECONNREFUSED" in out.getvalue()
    assert out.getvalue().rstrip().endswith("(it needs the internet)")


def test_a_page_naming_a_path_out_of_its_package_is_refused(tmp_path: Path) -> None:
    page = '<script src="https://unpkg.com/demo@1.0.0/../../etc/passwd"></script>'
    with pytest.raises(ValueError, match="not a package file"):
        graphiql.assets(page)
    assert graphiql.ide_page(page, tmp_path) == graphiql.IdePage(page)  # served as it is
    out = io.StringIO()
    assert not graphiql.fetch(tmp_path, html=page, npm="/nonexistent/npm", out=out)
    assert "not a package file" in out.getvalue() and out.getvalue().count("\n") == 1


# --- In a browser, with the network cut ------------------------------------------------


async def graphiql_works_offline(app: Starlette, screenshot: str) -> None:
    """Loads /graphql in Chromium with every request to another origin aborted; the
    editor renders, and `{ __typename }` runs from it."""
    async with served(app) as base_url, chromium() as browser:
        context = await browser.new_context()
        refused: list[str] = []

        async def offline(route: Route) -> None:
            if route.request.url.startswith(base_url + "/"):
                await route.continue_()
            else:
                refused.append(route.request.url)
                await route.abort("internetdisconnected")

        await context.route("**/*", offline)
        page = await context.new_page()
        page.set_default_timeout(15_000)
        expect.set_options(timeout=15_000)
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        try:
            await page.goto(f"{base_url}/graphql?q=%7B%20__typename%20%7D")
            await expect(page.locator(".graphiql-query-editor .CodeMirror")).to_be_visible()
            await expect(page.locator(".graphiql-query-editor")).to_contain_text("__typename")
            await page.click(".graphiql-execute-button")
            response = page.locator(".graphiql-response")
            await expect(response).to_contain_text('"__typename": "Query"')
        finally:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=ARTIFACTS / screenshot)
        assert refused == [], refused  # it asked for nothing beyond this server
        assert problems == [], problems  # no file refused by the policy, no script error


async def test_graphiql_renders_and_runs_a_query_with_the_network_cut(
    make_settings: Callable[..., Settings],
) -> None:
    _need_chromium()
    _need_local_files()
    await graphiql_works_offline(create_app(make_settings()), "graphiql-offline.png")
