"""What the browser tests of tests/frontend and tests/reference share: the system chromium, its flags, a site."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "Site", "checked_page", "chromium", "missing"]

CHROMIUM = Path("/usr/bin/chromium")
# The network is closed in CI: without these flags chromium waits on refused connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@dataclass
class Site:
    url: str  # the page, e.g. http://127.0.0.1:40123/
    data: Path  # the data tree it serves (a private copy: tests may change it)


def missing(reason: str, *, suite: str = "browser", module: bool = False) -> None:
    """Skip for want of a prerequisite, with how to get it; under CI (`CI` set, as .ci/run's caller does) the
    prerequisites are installed by .ci/run, so their absence fails instead of passing silently."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the {suite} tests, but {reason}")
    pytest.skip(reason, allow_module_level=module)


@contextlib.contextmanager
def chromium() -> Iterator:
    """The system chromium through Playwright's sync API (an asyncio loop runs in this thread meanwhile)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def checked_page(browser, *, width: int, timeout_ms: int, what: str) -> Iterator:
    """A fresh page; an uncaught script error in it fails the test when the page closes (`page.page_errors`)."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    context.set_default_timeout(timeout_ms)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.page_errors = errors  # tests may look at them mid-way
    yield page
    context.close()
    assert not errors, f"uncaught script errors in {what}: {errors}"


@contextlib.contextmanager
def serving_static(folder: Path) -> Iterator[Site]:
    """A plain static file server over `folder` (a built frontend with data/ beside it) on a free loopback port,
    in a thread: static mode, as any web host serves the tree."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, name="headvis-test-static", daemon=True).start()
    try:
        yield Site(url=f"http://127.0.0.1:{server.server_address[1]}/", data=folder / "data")
    finally:
        server.shutdown()
        server.server_close()


def served(site: Site, rel: str):
    """GET {site}/data/{rel} as the page reads it, parsed; None for a 404 (custom files come from the server's store)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{site.url.rstrip('/')}/data/{rel}", timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


@contextlib.contextmanager
def serving(data: Path, lm, frontend: Path, dictionaries: tuple[Path, ...] = ()) -> Iterator[Site]:
    """The real server app (`create_app`) over `data`, serving `frontend`, in a thread of this process:
    server mode, as `python -m headvis.serve` runs it. Shutdown puts server_config.json back to {}."""
    import asyncio
    import threading

    from aiohttp import web

    from headvis.server.app import create_app
    from headvis.server.net import bind, url_for
    from headvis.server.state import ServerConfig

    sock = bind("127.0.0.1", 0)
    url = url_for(sock)
    config = ServerConfig(data=data, url=url, frontend=frontend, dictionaries=dictionaries)
    runner = web.AppRunner(create_app(config, lm), access_log=None)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="headvis-test-server", daemon=True)
    thread.start()

    def call(coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    call(runner.setup())  # writes server_config.json
    call(web.SockSite(runner, sock).start())
    try:
        yield Site(url=f"{url}/", data=data)
    finally:
        call(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
