"""The API's request and reply schemas, and the OpenAPI 3.1 document served at /api/openapi.json.

`REQUESTS` is the one description of every endpoint's body: the handlers
validate against it (`headvis.server.validation`), the OpenAPI document
publishes it, and the fuzz test generates requests from that document. The
file schemas under `headvis/schemas/` (custom sequences, clusters) are
inlined rather than copied, so a field is described once.
"""

from __future__ import annotations

import copy

import headvis
from headvis.projection import VECTORS
from headvis.schemas import load_schema
from headvis.server.limits import MAX_BODY_BYTES, MAX_TEXT_BYTES, MAX_TOKENS

__all__ = ["ENDPOINTS", "REQUESTS", "openapi_document"]


def _inline(node, defs: dict):
    """`node` with every local `{"$ref": "#/$defs/x"}` replaced by a copy of defs[x]."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return copy.deepcopy(node)


def _file_schema(name: str, pointer: str | None = None) -> dict:
    """A schema of headvis/schemas/, self-contained; `pointer` picks one of its $defs."""
    schema = load_schema(name)
    defs = schema.get("$defs", {})
    part = defs[pointer] if pointer else {k: v for k, v in schema.items() if k not in ("$schema", "$defs")}
    return _inline(part, defs)


CONTEXT = {
    "description": "The `context` of data/server_config.json, forwarded verbatim. Any other value: 403.",
    "type": "object",
}
LAYER = {"description": "A scanned layer (config.json `layers`); others: 400.", "type": "integer", "minimum": 0}
HEAD = {"description": "A scanned query head (config.json `heads`); others: 400.", "type": "integer", "minimum": 0}
TEXT = {
    "description": f"Prompt text, at most {MAX_TEXT_BYTES} UTF-8 bytes (413 beyond). It is tokenized as the scan "
    f"tokenizes (BOS first when the tokenizer has one) and cut to min({MAX_TOKENS}, model context) tokens.",
    "type": "string",
    "minLength": 1,
}
CUSTOM_ID = _file_schema("custom_sequences.schema.json", "id")
SEQ = {
    "description": "A scanned sequence id (0 .. n_sequences-1) or a custom id.",
    "oneOf": [{"type": "integer", "minimum": 0}, CUSTOM_ID],
}
POSITION = {"description": "A token position in the sequence.", "type": "integer", "minimum": 0}
COORDS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}}
ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {"description": "A human-readable message (never a stack trace).", "type": "string"}},
}


def _body(**fields: dict) -> dict:
    return {
        "type": "object",
        "required": ["context", *fields],
        "additionalProperties": False,
        "properties": {"context": CONTEXT, **fields},
    }


ATTRIBUTION_BODY = _body(layer=LAYER, head=HEAD, seq=SEQ, qpos=POSITION, kpos=POSITION)

# endpoint name -> JSON Schema (2020-12) of its request body
REQUESTS: dict[str, dict] = {
    "add_custom_sequence": _body(text=TEXT),
    "delete_custom_sequence": _body(id=CUSTOM_ID),
    "project_to_umap": _body(text=TEXT, layer=LAYER, head=HEAD),
    "save_umap_clusters": _body(layer=LAYER, head=HEAD,
                                clusters=_file_schema("clusters.schema.json")["properties"]["clusters"]),
    "qk_attributions": ATTRIBUTION_BODY,
    "ov_attributions": ATTRIBUTION_BODY,
}
ENDPOINTS: tuple[str, ...] = tuple(REQUESTS)

_REPLIES: dict[str, dict] = {
    "add_custom_sequence": _file_schema("custom_sequences.schema.json", "sequence"),
    "delete_custom_sequence": {"type": "object", "required": ["deleted"], "properties": {"deleted": CUSTOM_ID}},
    "project_to_umap": {
        "type": "object",
        "required": ["layer", "head", "tokens", "token_ids", "points", "pca", "truncated"],
        "properties": {
            "layer": LAYER,
            "head": HEAD,
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_ids": {"type": "array", "items": {"type": "integer"}},
            "points": {
                "description": "One point per position >= 1 (position 0 is skipped, as in the scan).",
                "type": "object",
                "required": ["pos"],
                "properties": {"pos": {"type": "array", "items": {"type": "integer"}}},
            },
            "pca": {"description": "Coordinates in the saved PCA rotation of each vector space.",
                    "type": "object", "required": list(VECTORS), "properties": {v: COORDS for v in VECTORS}},
            "views": {"description": "Present when the head file has `views`: nearest-neighbour interpolation "
                      "of the scan points' coordinates (docs/server.md).",
                      "type": "object", "additionalProperties": {
                          "type": "object", "required": list(VECTORS), "properties": {v: COORDS for v in VECTORS}}},
            "truncated": {"description": "True when the text was cut to the token limit.", "type": "boolean"},
        },
    },
    "save_umap_clusters": {"type": "object", "required": ["saved"],
                           "properties": {"saved": {"type": "integer", "minimum": 0}}},
    "qk_attributions": {"description": "The attribution file (CONTRACT section 2, Attributions).", "type": "object"},
    "ov_attributions": {"description": "The attribution file (CONTRACT section 2, Attributions).", "type": "object"},
}

_SUMMARIES = {
    "add_custom_sequence": "Run the model on a text; write its record into custom/ for every scanned head.",
    "delete_custom_sequence": "Remove a custom sequence from custom/sequences.json and every custom head file.",
    "project_to_umap": "Project a prompt's q/k/v/o vectors into a head's saved PCA rotation (and its views).",
    "save_umap_clusters": "Replace umap/clusters/L{l}H{h}.json.",
    "qk_attributions": "Sparse-dictionary attribution of one attention score (needs a dictionary: 501 until then).",
    "ov_attributions": "Sparse-dictionary attribution of one OV write (needs a dictionary: 501 until then).",
}

_ERRORS = {
    "400": "Bad body: not JSON, not an object, a missing, unknown or mistyped field, a head that was not scanned.",
    "403": "A context this server did not issue.",
    "404": "Unknown id or route.",
    "409": "The data tree cannot take it (too many custom sequences, a model that does not reproduce the scan).",
    "413": f"Body over {MAX_BODY_BYTES} bytes, or text over {MAX_TEXT_BYTES} UTF-8 bytes.",
    "415": "Content-Type is not application/json.",
    "429": "Too many model jobs queued; retry later.",
}


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _with_examples(node, examples: dict[str, list]):
    """A copy of a request schema whose `layer` and `head` list this tree's scanned values as examples."""
    if isinstance(node, dict):
        out = {k: _with_examples(v, examples) for k, v in node.items()}
        for name, values in examples.items():
            if name in out.get("properties", {}):
                out["properties"][name] = {**out["properties"][name], "examples": values}
        return out
    if isinstance(node, list):
        return [_with_examples(v, examples) for v in node]
    return node


def openapi_document(url: str, layers: list[int], heads: list[int]) -> dict:
    """The OpenAPI 3.1 description of the server running at `url` on a tree of these scanned heads."""
    paths: dict = {}
    for name in ENDPOINTS:
        responses = {"200": {"description": "Success.", "content": {"application/json": {"schema": _REPLIES[name]}}}}
        responses.update({code: _error_response(text) for code, text in _ERRORS.items()})
        if name.endswith("_attributions"):
            responses["501"] = _error_response("No sparse dictionary is configured (the body is validated first).")
        paths[f"/api/{name}"] = {"post": {
            "operationId": name,
            "summary": _SUMMARIES[name],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _with_examples(REQUESTS[name], {"layer": layers, "head": heads})}}},
            "responses": responses,
        }}
    paths["/api/openapi.json"] = {"get": {
        "operationId": "openapi", "summary": "This document.",
        "responses": {"200": {"description": "OpenAPI 3.1 JSON.", "content": {"application/json": {"schema": {"type": "object"}}}}},
    }}
    paths["/data/{path}"] = {"get": {
        "operationId": "data", "summary": "A file of the data tree (no listings, no dotfiles, never outside the tree).",
        "parameters": [{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The file."}, "404": _error_response("No such file.")},
    }}
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": "headvis server", "version": headvis.__version__,
                 "description": "Live endpoints of headvis (CONTRACT section 3). Every POST body carries "
                                "`context` from data/server_config.json. Errors are JSON {\"error\": ...} with a 4xx."},
        "servers": [{"url": url}],
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }
