"""A real browser for the tests: Debian's Chromium, driven by Playwright (its Python
package only; Playwright never downloads a browser here), and the app served over real
HTTP by uvicorn in the test's event loop, so the test's clock still moves it."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvicorn
from playwright.async_api import Browser, async_playwright
from starlette.applications import Starlette

from tests.pg import free_port

# Where the tests leave what a person may want to look at (gitignored).
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"

# As the machine's own check starts it: no sandbox (the tests may run as root), and none
# of Chromium's background traffic (this network is closed).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """CHROMIUM, or Debian's `chromium` on PATH; skips, saying so loudly, without one."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found or not os.access(found, os.X_OK):
        pytest.skip(
            "NO CHROMIUM: the browser test of /demo DID NOT RUN. Install Debian's "
            "chromium (apt-get install chromium; .ci/run does) or set CHROMIUM to a "
            "Chromium binary."
        )
    return found


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    path = chromium_path()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def served(app: Starlette, port: int | None = None) -> AsyncIterator[str]:
    """`app` (lifespan included) on 127.0.0.1 over HTTP (on `port`, else a free one);
    yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    async with app.router.lifespan_context(app):
        task = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(10):
                while not server.started:
                    if task.done():
                        task.result()  # raises what stopped it
                        raise AssertionError("uvicorn stopped before it started")
                    await asyncio.sleep(0.01)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            async with asyncio.timeout(10):
                await task
