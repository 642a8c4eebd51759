"""Static files: the built frontend at `/`, the data tree at `/data/`.

A request path maps to a file only when every segment is a plain name: no
`..` or `.` (aiohttp has already decoded `%2e%2e`), no dotfile (temp files of
atomic writes are dotfiles), no backslash or NUL, and the fully resolved path
(symlinks followed) still lies inside the folder. Anything else is a 404, so
a probe learns nothing. Folders are never listed.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["NOT_BUILT_PAGE", "resolve_inside", "send_file"]

NOT_BUILT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headvis server</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40em; margin: 3em auto">
<h1>headvis server</h1>
<p>The frontend is not built: there is no <code>frontend/dist</code>, and no <code>--frontend DIR</code> was given.
Build it with <code>scripts/setup.sh</code>, or with <code>cd frontend &amp;&amp; npm ci &amp;&amp; npm run build</code>
(Node.js 20.19 or newer), then reload this page.</p>
<p>The server is up: see <a href="/data/config.json">/data/config.json</a> and the API description
<a href="/api/openapi.json">/api/openapi.json</a>.</p>
</body></html>
"""


def resolve_inside(root: Path, tail: str) -> Path | None:
    """The regular file `root/tail`, or None when it does not exist or would leave `root` (resolved)."""
    if "\\" in tail or "\x00" in tail:
        return None
    parts = [p for p in tail.split("/") if p]
    if any(p.startswith(".") for p in parts):  # "..", ".", dotfiles
        return None
    try:
        path = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, a name too long
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def send_file(request: web.Request, root: Path | None, tail: str, *, cache: str) -> web.FileResponse:
    """GET/HEAD of a file under `root`: 404 if there is none, 405 for other methods."""
    path = resolve_inside(root, tail) if root is not None else None
    if path is None:
        raise web.HTTPNotFound(text=f"not found: {request.path[:200]}")
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"], text=f"{request.method} is not allowed here")
    return web.FileResponse(path, headers={"Cache-Control": cache})
