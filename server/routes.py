"""Every route of the server (`setup_routes`) and the API handlers (CONTRACT section 3).

Handlers validate at the edge (`read_body`: JSON, context, schema), then
check what the schema cannot (a scanned head, a known id, a byte limit),
then hand model work to the model thread and file changes to the store.
Paths on disk are built only from validated integers and server-made ids.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from headvis.io import read_json, write_json
from headvis.server.limits import MAX_TEXT_BYTES
from headvis.server.openapi import ENDPOINTS, openapi_document
from headvis.server.state import CONFIG, CONTEXT, FILES, JOBS, STORE, TREE
from headvis.server.static import NOT_BUILT_PAGE, send_file
from headvis.server.tree import DataTree
from headvis.server.validation import read_body

__all__ = ["ATTRIBUTIONS_UNAVAILABLE", "setup_routes"]

ATTRIBUTIONS_UNAVAILABLE = "no sparse dictionary is configured: QK/OV attributions are not available yet"
_SOURCE_FRONTEND = Path(__file__).resolve().parents[1] / "frontend" / "dist"


def _num(n: int) -> str:
    """An integer from a request, shortened: JSON allows thousands of digits."""
    text = str(n)
    return text if len(text) <= 20 else text[:17] + "..."


def _ranges(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 12 else f"{values[0]}..{values[-1]} ({len(values)} of them)"


def _scanned_head(tree: DataTree, body: dict) -> tuple[int, int]:
    layer, head = body["layer"], body["head"]
    if layer not in tree.layers:
        raise web.HTTPBadRequest(text=f"layer {_num(layer)} was not scanned (scanned layers: {_ranges(tree.layers)})")
    if head not in tree.heads:
        raise web.HTTPBadRequest(text=f"head {_num(head)} was not scanned (scanned heads: {_ranges(tree.heads)})")
    return layer, head


def _text(body: dict) -> str:
    text = body["text"]
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_TEXT_BYTES, size,
                                            text=f"text is {size} UTF-8 bytes; the limit is {MAX_TEXT_BYTES}")
    return text


async def add_custom_sequence(request: web.Request) -> web.Response:
    body = await read_body(request, "add_custom_sequence", request.app[CONTEXT])
    text = _text(body)
    store = request.app[STORE]
    async with store.reserve():
        entry, records = await request.app[JOBS].run(lambda worker: worker.custom_records(text))
        await store.add(entry, records)
    return web.json_response(entry)


async def delete_custom_sequence(request: web.Request) -> web.Response:
    body = await read_body(request, "delete_custom_sequence", request.app[CONTEXT])
    await request.app[STORE].delete(body["id"])
    return web.json_response({"deleted": body["id"]})


async def project_to_umap(request: web.Request) -> web.Response:
    body = await read_body(request, "project_to_umap", request.app[CONTEXT])
    layer, head = _scanned_head(request.app[TREE], body)
    text = _text(body)
    reply = await request.app[JOBS].run(lambda worker: worker.project_text(layer, head, text))
    return web.json_response(reply)


def _cloud(tree: DataTree, layer: int, head: int) -> tuple[int, list[str]]:
    """(points, views) of a head's projection file: how many points, and 'pca' plus its view names."""
    path = tree.umap_head(layer, head)
    try:
        head_file = read_json(path)
    except FileNotFoundError as e:
        raise web.HTTPConflict(text=f"L{layer}H{head} has no projection file (umap/{path.name})") from e
    return len(head_file["points"]["pos"]), ["pca", *head_file.get("views", {})]


async def save_umap_clusters(request: web.Request) -> web.Response:
    body = await read_body(request, "save_umap_clusters", request.app[CONTEXT])
    tree = request.app[TREE]
    layer, head = _scanned_head(tree, body)
    n_points, views = await asyncio.to_thread(_cloud, tree, layer, head)
    clusters = body["clusters"]
    for i, cluster in enumerate(clusters):
        if cluster["view"] not in views:
            raise web.HTTPBadRequest(text=f"clusters.{i}.view: {cluster['view']!r} is not a view of "
                                          f"L{layer}H{head} ({', '.join(views)})")
        beyond = [p for p in cluster["points"] if p >= n_points]
        if beyond:
            raise web.HTTPBadRequest(text=f"clusters.{i}.points: {_num(beyond[0])} is out of range "
                                          f"(L{layer}H{head} has {n_points} points)")
    path = tree.clusters(layer, head)
    async with request.app[FILES].lock(path):
        await asyncio.to_thread(write_json, path, {"clusters": clusters})
    return web.json_response({"saved": len(clusters)})


async def _validate_attribution(request: web.Request, endpoint: str) -> None:
    """Everything an attribution request names must exist, even while no dictionary is configured."""
    body = await read_body(request, endpoint, request.app[CONTEXT])
    tree = request.app[TREE]
    _scanned_head(tree, body)
    seq = body["seq"]
    if isinstance(seq, int):
        if seq >= tree.n_sequences:
            raise web.HTTPNotFound(text=f"no scanned sequence {_num(seq)} (ids 0..{tree.n_sequences - 1})")
        seq_len = tree.seq_len
    else:
        entry = await request.app[STORE].entry(seq)
        if entry is None:
            raise web.HTTPNotFound(text=f"no custom sequence {seq!r}")
        seq_len = len(entry["token_ids"])
    for name in ("qpos", "kpos"):
        if body[name] >= seq_len:
            raise web.HTTPBadRequest(text=f"{name} {_num(body[name])} is past the sequence's end ({seq_len} tokens)")
    if tree.causal and body["kpos"] > body["qpos"]:
        raise web.HTTPBadRequest(text=f"kpos {_num(body['kpos'])} is after qpos {_num(body['qpos'])}: a causal head cannot attend there")


async def qk_attributions(request: web.Request) -> web.Response:
    await _validate_attribution(request, "qk_attributions")
    raise web.HTTPNotImplemented(text=ATTRIBUTIONS_UNAVAILABLE)


async def ov_attributions(request: web.Request) -> web.Response:
    await _validate_attribution(request, "ov_attributions")
    raise web.HTTPNotImplemented(text=ATTRIBUTIONS_UNAVAILABLE)


async def openapi_json(request: web.Request) -> web.Response:
    tree = request.app[TREE]
    return web.json_response(openapi_document(request.app[CONFIG].url, tree.layers, tree.heads))


async def unknown_api(request: web.Request) -> web.Response:
    name = request.match_info["tail"]
    if name in ENDPOINTS:
        raise web.HTTPMethodNotAllowed(request.method, ["POST"], text=f"/api/{name} takes POST")
    raise web.HTTPNotFound(text=f"no endpoint /api/{name[:100]} (see /api/openapi.json)")


async def data_file(request: web.Request) -> web.StreamResponse:
    # no-cache: custom/ and umap/clusters/ change while the server runs
    return send_file(request, request.app[TREE].root, request.match_info["tail"], cache="no-cache")


def _frontend_root(request: web.Request) -> Path | None:
    configured = request.app[CONFIG].frontend
    root = (configured or _SOURCE_FRONTEND).resolve()
    return root if (root / "index.html").is_file() else None


async def frontend_file(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    root = _frontend_root(request)
    if not tail:
        if root is None:
            if request.method not in ("GET", "HEAD"):
                raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
            return web.Response(text=NOT_BUILT_PAGE, content_type="text/html")
        tail = "index.html"
    return send_file(request, root, tail, cache="no-cache")


def setup_routes(app: web.Application) -> None:
    handlers = {
        "add_custom_sequence": add_custom_sequence,
        "delete_custom_sequence": delete_custom_sequence,
        "project_to_umap": project_to_umap,
        "save_umap_clusters": save_umap_clusters,
        "qk_attributions": qk_attributions,
        "ov_attributions": ov_attributions,
    }
    assert tuple(handlers) == ENDPOINTS
    for name, handler in handlers.items():
        app.router.add_post(f"/api/{name}", handler)
    app.router.add_get("/api/openapi.json", openapi_json)
    app.router.add_route("*", "/api/{tail:.*}", unknown_api)
    app.router.add_route("*", "/data/{tail:.*}", data_file)
    app.router.add_route("*", "/{tail:.*}", frontend_file)
