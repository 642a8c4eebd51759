"""Every route of the server (`setup_routes`) and the API handlers (CONTRACT section 3).

The endpoints are `POST /api/head_vis/public/{name}/v0`. Handlers validate
at the edge (`read_body`: JSON, context, schema), then check what the schema
cannot (a scanned head, a sequence the tree holds, positions inside it, a
byte limit), then hand model work to the model thread and file changes to
the stores. Paths on disk are built only from validated integers (and
custom ids that matched their pattern and are listed).
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from headvis.server.compute import Edge
from headvis.server.limits import MAX_TEXT_BYTES
from headvis.server.openapi import API_PREFIX, ENDPOINTS, endpoint_path, openapi_document
from headvis.server.state import ATTRIBUTIONS, CONFIG, CONTEXT, DICTIONARIES, FILES, JOBS, STORE, TREE, UMAP
from headvis.server.static import NOT_BUILT_PAGE, send_file
from headvis.server.store import find_edge
from headvis.server.tree import DataTree
from headvis.server.validation import number_text, read_body

__all__ = ["setup_routes"]

_SOURCE_FRONTEND = Path(__file__).resolve().parents[1] / "frontend" / "dist"


def _heads_text(heads: list[tuple[int, int]]) -> str:
    names = [f"L{layer}H{head}" for layer, head in heads]
    return ", ".join(names) if len(names) <= 12 else f"{', '.join(names[:6])}, ... ({len(names)} in all)"


def _scanned_head(tree: DataTree, body: dict) -> tuple[int, int]:
    layer, head = body["layer"], body["head"]
    if not tree.is_scanned(layer, head):
        raise web.HTTPBadRequest(text=f"layer {number_text(layer)} head {number_text(head)} was not scanned "
                                      f"(scanned heads: {_heads_text(tree.scanned_heads)})")
    return layer, head


def _text(body: dict) -> str:
    text = body["text"]
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_TEXT_BYTES, size,
                                            text=f"text is {size} UTF-8 bytes; the limit is {MAX_TEXT_BYTES}")
    return text


async def _edge(request: web.Request, layer: int, head: int, body: dict) -> Edge:
    """The edge (seq_idx, query_pos, key_pos) of a body, resolved to a sequence the tree holds; 404/400 otherwise."""
    tree = request.app[TREE]
    seq_idx = body["seq_idx"]
    if isinstance(seq_idx, int):
        path = tree.head_file(layer, head)
        shown = await request.app[FILES].read(path, lambda: {"sequences": []})
        sequence = next((s for s in shown["sequences"] if s["sequence_id"] == seq_idx), None)
        if sequence is None:
            raise web.HTTPNotFound(text=f"sequence {number_text(seq_idx)} is not shown for L{layer}H{head}: only the "
                                        f"sequences of heads/{path.name} (and custom ones) can be used here")
    else:
        sequence = request.app[STORE].entry(seq_idx)
        if sequence is None:
            raise web.HTTPNotFound(text=f"no custom sequence {seq_idx!r}")
    seq_len = len(sequence["token_ids"])
    for name in ("query_pos", "key_pos"):
        if body[name] >= seq_len:
            raise web.HTTPBadRequest(text=f"{name} {number_text(body[name])} is past the sequence's end "
                                          f"({seq_len} tokens)")
    if tree.causal and body["key_pos"] > body["query_pos"]:
        raise web.HTTPBadRequest(text=f"key_pos {body['key_pos']} is after query_pos {body['query_pos']}: "
                                      "a causal head cannot attend there")
    return Edge(seq_idx=seq_idx, token_ids=sequence["token_ids"], tokens=sequence["tokens"],
                query_pos=body["query_pos"], key_pos=body["key_pos"])


async def add_custom_sequence(request: web.Request) -> web.Response:
    body = await read_body(request, "add_custom_sequence", request.app[CONTEXT])
    key = _scanned_head(request.app[TREE], body)
    text = _text(body)
    store = request.app[STORE]
    async with store.reserve():
        entry, records = await request.app[JOBS].run(lambda worker: worker.custom_records(text))
        await store.add(entry, records)
    return web.json_response(records[key])


async def delete_custom_sequence(request: web.Request) -> web.Response:
    body = await read_body(request, "delete_custom_sequence", request.app[CONTEXT])
    _scanned_head(request.app[TREE], body)
    await request.app[STORE].delete(body["sequence_id"])
    await request.app[ATTRIBUTIONS].forget(body["sequence_id"])
    return web.json_response({"deleted": body["sequence_id"]})


async def save_umap_clusters(request: web.Request) -> web.Response:
    body = await read_body(request, "save_umap_clusters", request.app[CONTEXT])
    layer, head = _scanned_head(request.app[TREE], body)
    saved = await request.app[UMAP].save_clusters(layer, head, body["clusters"])
    return web.json_response({"saved": saved})


async def project_to_umap(request: web.Request) -> web.Response:
    body = await read_body(request, "project_to_umap", request.app[CONTEXT])
    layer, head = _scanned_head(request.app[TREE], body)
    edge = await _edge(request, layer, head, body)
    umap_store = request.app[UMAP]
    umap = await umap_store.read(layer, head)
    found = find_edge(umap, edge.seq_idx, edge.query_pos, edge.key_pos)
    if found is not None:
        return web.json_response(found)
    umap_store.check_room(umap, layer, head)
    point = await request.app[JOBS].run(lambda worker: worker.project(layer, head, edge))
    return web.json_response(await umap_store.add_projected(layer, head, point))


async def _attribution(request: web.Request, kind: str) -> web.Response:
    """The attribution file of an edge (everything it names validated first): cached as it is, or computed and kept."""
    body = await read_body(request, f"{kind}_attributions", request.app[CONTEXT])
    layer, head = _scanned_head(request.app[TREE], body)
    edge = await _edge(request, layer, head, body)
    dictionaries = request.app[DICTIONARIES]
    source = dictionaries.require_source(layer)  # 501 without any dictionary, 404 without one for this layer
    target = dictionaries.target(layer) if kind == "ov" else None

    async def compute() -> dict:
        return await request.app[JOBS].run(lambda worker: worker.attribution(kind, layer, head, edge, source, target))

    raw = await request.app[ATTRIBUTIONS].get(kind, layer, head, edge.seq_idx, edge.query_pos, edge.key_pos,
                                              source, target, compute)
    return web.Response(body=raw, content_type="application/json")


async def qk_attributions(request: web.Request) -> web.Response:
    return await _attribution(request, "qk")


async def ov_attributions(request: web.Request) -> web.Response:
    return await _attribution(request, "ov")


async def openapi_json(request: web.Request) -> web.Response:
    tree = request.app[TREE]
    examples = {"layer": tree.layers, "head": tree.heads, "seq_idx": list(range(min(tree.n_sequences, 16))),
                "query_pos": sorted({1, 2, tree.seq_len - 1}), "key_pos": sorted({0, 1, tree.seq_len - 2})}
    return web.json_response(openapi_document(request.app[CONFIG].url, examples))


async def unknown_api(request: web.Request) -> web.Response:
    tail = request.match_info["tail"]
    if request.path in {endpoint_path(name) for name in ENDPOINTS}:
        raise web.HTTPMethodNotAllowed(request.method, ["POST"], text=f"{request.path} takes POST")
    if tail in ENDPOINTS:
        raise web.HTTPNotFound(text=f"no endpoint /api/{tail}: the endpoints are POST {endpoint_path(tail)}")
    raise web.HTTPNotFound(text=f"no endpoint /api/{tail[:100]} (POST {API_PREFIX}/{{name}}/v0; "
                                "see /api/openapi.json)")


_CUSTOM_HEAD = re.compile(r"custom_sequences/L(0|[1-9][0-9]{0,5})H(0|[1-9][0-9]{0,5})\.json")


async def data_file(request: web.Request) -> web.StreamResponse:
    """The data tree; its custom-sequence files come from the store (their files on disk are a snapshot)."""
    tail = "/".join(part for part in request.match_info["tail"].split("/") if part)  # "a//b/", as "a/b" is served
    tree, store = request.app[TREE], request.app[STORE]
    body = None
    if tail == "custom_sequences/index.json":
        body = store.index_bytes
    elif (match := _CUSTOM_HEAD.fullmatch(tail)) and tree.is_scanned(int(match[1]), int(match[2])):
        body = lambda: store.head_bytes(int(match[1]), int(match[2]))  # noqa: E731
    if body is None:
        # no-cache: umap/ and attributions/ change while the server runs
        return send_file(request, tree.root, tail, cache="no-cache")
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"], text=f"{request.method} is not allowed here")
    return web.Response(body=await body(), content_type="application/json", headers={"Cache-Control": "no-cache"})


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
        "save_umap_clusters": save_umap_clusters,
        "project_to_umap": project_to_umap,
        "qk_attributions": qk_attributions,
        "ov_attributions": ov_attributions,
    }
    assert tuple(handlers) == ENDPOINTS
    for name, handler in handlers.items():
        app.router.add_post(endpoint_path(name), handler)
    app.router.add_get("/api/openapi.json", openapi_json)
    app.router.add_route("*", "/api/{tail:.*}", unknown_api)
    app.router.add_route("*", "/data/{tail:.*}", data_file)
    app.router.add_route("*", "/{tail:.*}", frontend_file)

