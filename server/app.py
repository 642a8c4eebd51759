"""The aiohttp application: `create_app(config)`, its middlewares and start-up/shutdown, and `serve`.

    app = create_app(ServerConfig(data=Path("data"), url="http://127.0.0.1:8765"))

Start-up (cleanup contexts, in order): take the tree's lock
(`headvis.lock`; a second server on the same tree is refused, and so is a
scan that would replace it); read the `--dictionary` folders and check them
against the scanned model's shape (config.json) with their feature
libraries; load the model once (the scan's, or `config.model`) on a thread
and move the dictionaries to its device; reconcile `custom_sequences/` and
`attributions/` and start the file thread; write `data/server_config.json`
with `server_url` and a fresh context. Shutdown undoes them in reverse:
`server_config.json` back to `{}` (static-only), the custom sequences'
snapshot files rewritten, the file thread and the model thread finish their
jobs and stop, the lock is released.

Connections: one idle longer than IDLE_TIMEOUT_S (a silent client, or one
whose request headers never complete) is closed; a body that does not
arrive within BODY_TIMEOUT_S is a 408 (`headvis.server.validation`).

The context is `{"setup": "default", "token": <random>}`: it selects the one
setup this process serves (its data tree and model), and the token makes a
context this process did not issue fail (403). Requests never carry a path,
a model name or a command.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import signal
import socket
from pathlib import Path

from aiohttp import web

from headvis.errors import HeadvisError
from headvis.io import write_json
from headvis.lock import TreeLock, TreeLocked
from headvis.models import load_model
from headvis.server.attributions import AttributionStore, ServedDictionaries, read_dictionaries
from headvis.server.compute import ModelJobs, ModelWorker
from headvis.server.limits import IDLE_TIMEOUT_S, MAX_BODY_BYTES
from headvis.server.routes import setup_routes
from headvis.server.state import (ATTRIBUTIONS, CONFIG, CONTEXT, DICTIONARIES, FILES, JOBS, PRELOADED, STORE, TREE,
                                   UMAP, ServerConfig)
from headvis.server.store import CustomStore, JsonFiles, UmapStore
from headvis.server.tree import in_use_error, open_data_tree

__all__ = ["create_app", "runner_for", "serve"]

log = logging.getLogger("headvis.server")

SETUP = "default"  # the one server-side setup a context can select
_STATIC_ONLY: dict = {}


# -- middlewares

def _error_response(status: int, message: str, headers=None) -> web.Response:
    return web.json_response({"detail": message}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error becomes `{"detail": "..."}` with its status (CONTRACT section 3); a bug is a 500 without a trace."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        generic = not e.text or e.text.startswith(f"{e.status}:")  # aiohttp's own "404: Not Found"
        message = f"{e.reason.lower()}: {request.path[:200]}" if generic else e.text
        keep = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return _error_response(e.status, message, headers=keep)
    except HeadvisError as e:
        return _error_response(400, str(e))
    except asyncio.CancelledError:
        raise
    except OSError as e:  # the machine's state (a full disk, a read-only or changed tree), not a bug
        status, message = _os_error(e)
        log.warning("%s %s: %s", request.method, request.path, message)
        return _error_response(status, message)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error_response(500, "internal error (the server log has the details)")


def _os_error(e: OSError) -> tuple[int, str]:
    """(status, message) for a file error while answering: 507 full disk, 503 not writable, 409 damaged."""
    where = Path(e.filename).name if e.filename else "a file of the data tree"
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, f"the disk holding the data tree is full ({reason}, writing {where}); nothing was changed: " \
                    "free some space and retry"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return 503, f"the data tree cannot be written ({reason}: {where}); nothing was changed"
    return 409, f"the data tree changed under the server ({reason}: {where}); restore it or re-scan"


def _hostname(header: str) -> str:
    """'127.0.0.1:8765' -> '127.0.0.1', '[::1]:8765' -> '::1', 'LocalHost' -> 'localhost'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _host_guard(allowed: tuple[str, ...]):
    """403 unless the Host header names the server: a page on a rebound DNS name cannot reach it."""

    @web.middleware
    async def host_guard(request: web.Request, handler) -> web.StreamResponse:
        if _hostname(request.host or "") not in allowed:
            raise web.HTTPForbidden(text=f"unexpected Host header {request.host[:100]!r}; "
                                         f"use {' or '.join(allowed[:2])}")
        return await handler(request)

    return host_guard


def _cors(origin: str):
    """CORS for exactly one origin, credentials included (the reference frontend sends `credentials: 'include'`).

    That origin's requests get Access-Control-Allow-Origin (the origin itself, never `*`, which
    credentialed requests may not use) and Allow-Credentials; its preflights a 204. Every reply
    says `Vary: Origin`, since it depends on the Origin header.
    """

    @web.middleware
    async def cors(request: web.Request, handler) -> web.StreamResponse:
        if request.headers.get("Origin") != origin:
            response = await handler(request)
            response.headers["Vary"] = "Origin"
            return response
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response = web.Response(status=204)
            response.headers.update({
                "Access-Control-Allow-Methods": "GET, HEAD, POST",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": "600",
            })
        else:
            response = await handler(request)
        response.headers.update({
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        })
        return response

    return cors


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")


# -- start-up and shutdown

async def _model(app: web.Application):
    """Read the dictionaries, load the model once (on a thread), check them against it, start the model thread."""
    config, tree = app[CONFIG], app[TREE]
    # before the model loads: a dictionary that cannot be served fails at once (checked against the scan's shape)
    dictionaries = await asyncio.to_thread(read_dictionaries, config.dictionaries)
    served = await asyncio.to_thread(ServedDictionaries.check, dictionaries, tree, config.model)
    lm = app.get(PRELOADED)
    if lm is None:
        name = config.model or tree.config["model"]["name"]
        log.info("loading model %s on %s", name, config.device)
        lm = await asyncio.to_thread(load_model, name, config.device)
    jobs = ModelJobs(ModelWorker(lm, tree))  # refuses a model of another shape than the scan's
    for line in served.log_lines():
        log.info("%s", line)
    app[DICTIONARIES] = served.to(lm.device)
    app[JOBS] = jobs
    yield
    await asyncio.to_thread(jobs.close)


async def _lock(app: web.Application):
    """Hold the tree's lock while serving: a second server (or a scan) on the same tree is refused."""
    lock = TreeLock(app[TREE].root, "server", url=app[CONFIG].url)
    try:
        lock.acquire()
    except TreeLocked as e:
        raise in_use_error(app[TREE].root, e.holder) from None
    except OSError as e:
        raise HeadvisError(f"cannot lock --data {app[TREE].root}: {e.strerror or e}") from e
    yield
    lock.release()


async def _store(app: web.Application):
    """Reconcile custom_sequences/ and bring its snapshot files up to date; rewrite them at shutdown."""
    tree, store = app[TREE], app[STORE]
    try:
        removed, imported, rewritten = await asyncio.to_thread(store.open)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HeadvisError(f"{tree.custom_dir} is damaged ({type(e).__name__}: {e}); fix or remove it") from e
    if removed:
        log.info("removed %d custom sequences left half-added or half-deleted by a killed server", removed)
    if imported:
        log.info("moved %d custom sequences into custom_sequences/store/ (one folder per sequence)", imported)
    elif rewritten:
        log.info("custom_sequences/ snapshot files brought up to date (the last server did not stop cleanly)")
    try:
        fixed = await asyncio.to_thread(app[ATTRIBUTIONS].reconcile)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HeadvisError(f"{tree.attributions_dir} is damaged ({type(e).__name__}: {e}); fix or remove "
                           "attributions/manifest.json") from e
    if fixed:
        log.info("attributions/manifest.json now lists exactly the attribution files (%d changes)", fixed)
    yield
    try:
        await app[FILES].call(store.close)
    except (OSError, ValueError) as e:
        log.warning("could not rewrite the custom_sequences/ snapshot files (%s); the next start does it",
                    e.strerror or e)
    await asyncio.to_thread(app[FILES].close)


async def _server_config(app: web.Application):
    """Advertise the server in server_config.json; put static-only back at shutdown."""
    tree = app[TREE]
    # what this server can do, so that a frontend offers no control that can only fail (headvis >= 0.4;
    # other readers ignore it): the scanned layers whose QK / OV attributions it computes
    capabilities = {"attribution_layers": app[DICTIONARIES].layers()}
    try:
        write_json(tree.server_config, {"server_url": app[CONFIG].url, "context": app[CONTEXT],
                                        "capabilities": capabilities})
    except OSError as e:
        raise HeadvisError(f"cannot write {tree.server_config}: {e.strerror or e}") from e
    yield
    write_json(tree.server_config, _STATIC_ONLY)


def create_app(config: ServerConfig, lm=None) -> web.Application:
    """The server for `config`; `lm` (a LoadedModel) skips loading the model, as tests do."""
    tree = open_data_tree(config.data)
    middlewares = [json_errors]
    if config.allowed_hosts is not None:
        middlewares.append(_host_guard(config.allowed_hosts))
    if config.allow_origin is not None:
        middlewares.insert(0, _cors(config.allow_origin))  # outermost: error replies get CORS headers too
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[TREE] = tree
    app[CONTEXT] = {"setup": SETUP, "token": secrets.token_urlsafe(24)}
    app[FILES] = JsonFiles()
    app[STORE] = CustomStore(tree, app[FILES])
    app[UMAP] = UmapStore(tree, app[FILES])
    app[ATTRIBUTIONS] = AttributionStore(tree, app[FILES], app[STORE].ids)
    if lm is not None:
        app[PRELOADED] = lm
    app.cleanup_ctx.extend([_lock, _model, _store, _server_config])
    app.on_response_prepare.append(_security_headers)
    setup_routes(app)
    return app


# -- running

def runner_for(app: web.Application) -> web.AppRunner:
    """The runner `serve` uses: no access log, idle connections closed after IDLE_TIMEOUT_S."""
    return web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=IDLE_TIMEOUT_S)


async def serve(config: ServerConfig, sock: socket.socket) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly (server_config.json back to static-only)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    runner = runner_for(create_app(config))
    started = False
    try:
        await runner.setup()  # the cleanup contexts: model load, server_config.json
        await web.SockSite(runner, sock).start()
        started = True
        log.info("ready: serving %s at %s (model %s); Ctrl-C stops", config.data, config.url,
                 config.model or runner.app[TREE].config["model"]["name"])
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        log.info("shutting down")
    finally:
        await runner.cleanup()
        if started:
            log.info("stopped; %s is static-only again", Path(config.data) / "server_config.json")
