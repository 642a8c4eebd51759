"""The API's request and reply schemas, and the OpenAPI 3.1 document served at /api/openapi.json.

`REQUESTS` is the one description of every endpoint's body (CONTRACT
section 3): the handlers validate against it (`headvis.server.validation`),
the OpenAPI document publishes it, and the fuzz test generates requests from
that document. Where a body or a reply is a file's content (custom records,
clusters, projected points), the file's schema under `headvis/schemas/` is
inlined rather than copied, so a field is described once.
"""

from __future__ import annotations

import copy

import headvis
from headvis.schemas import load_schema
from headvis.server.limits import (MAX_ATTRIBUTION_FILES, MAX_BODY_BYTES, MAX_CUSTOM_SEQUENCES, MAX_PROJECTED_POINTS,
                                   MAX_TEXT_BYTES, MAX_TOKENS)

__all__ = ["API_PREFIX", "ENDPOINTS", "REQUESTS", "endpoint_path", "openapi_document"]

API_PREFIX = "/api/head_vis/public"  # every endpoint is POST {API_PREFIX}/{name}/v0


def endpoint_path(name: str) -> str:
    return f"{API_PREFIX}/{name}/v0"


def _inline(node, defs: dict):
    """`node` with every local `{"$ref": "#/$defs/x"}` replaced by a copy of defs[x]."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k not in ("$defs", "$id", "$schema")}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return copy.deepcopy(node)


def _file_schema(name: str, *pointer: str) -> dict:
    """A schema of headvis/schemas/, self-contained; `pointer` walks into it (("$defs", "id"), ...)."""
    schema = load_schema(name)
    part = schema
    for key in pointer:
        part = part[key]
    return _inline(part, schema.get("$defs", {}))


CONTEXT = {
    "description": "The `context` of data/server_config.json, forwarded verbatim. Any other value: 403.",
    "type": "object",
}
LAYER = {"description": "With `head`, a scanned head (a [layer, head] pair of config.json `heads`); others: 400.",
         "type": "integer", "minimum": 0}
HEAD = {"description": "A query head; with `layer`, a scanned head.", "type": "integer", "minimum": 0}
TEXT = {
    "description": f"Text, at most {MAX_TEXT_BYTES} UTF-8 bytes (413 beyond). It is tokenized as the scan "
    f"tokenizes (BOS first when the tokenizer has one) and cut to min({MAX_TOKENS}, model context) tokens.",
    "type": "string",
    "minLength": 1,
}
CUSTOM_ID = _file_schema("custom_sequences.schema.json", "$defs", "id")
SEQ_IDX = {
    "description": "A scanned sequence id shown in the head's file heads/L{l}H{h}.json, or a custom id "
                   "listed in custom_sequences/index.json; others: 404.",
    "oneOf": [{"type": "integer", "minimum": 0}, CUSTOM_ID],
}
QUERY_POS = {"description": "The query position, below the sequence's length.", "type": "integer", "minimum": 0}
KEY_POS = {"description": "The key position, below the sequence's length; at most query_pos for a causal model.",
           "type": "integer", "minimum": 0}
ERROR = {
    "type": "object",
    "required": ["detail"],
    "additionalProperties": False,
    "properties": {"detail": {"description": "A human-readable message (never a stack trace).", "type": "string"}},
}


def _body(**fields: dict) -> dict:
    return {
        "type": "object",
        "required": ["context", *fields],
        "additionalProperties": False,
        "properties": {"context": CONTEXT, **fields},
    }


EDGE_BODY = _body(layer=LAYER, head=HEAD, seq_idx=SEQ_IDX, query_pos=QUERY_POS, key_pos=KEY_POS)

# endpoint name -> JSON Schema (2020-12) of its request body
REQUESTS: dict[str, dict] = {
    "add_custom_sequence": _body(layer=LAYER, head=HEAD, text=TEXT),
    "delete_custom_sequence": _body(layer=LAYER, head=HEAD, sequence_id=CUSTOM_ID),
    "save_umap_clusters": _body(layer=LAYER, head=HEAD, clusters=_file_schema("clusters.schema.json")),
    "project_to_umap": EDGE_BODY,
    "qk_attributions": EDGE_BODY,
    "ov_attributions": EDGE_BODY,
}
ENDPOINTS: tuple[str, ...] = tuple(REQUESTS)

_FALSE = {"const": False}
_PROJECTION_REPLY = {
    "description": "One of three shapes: the edge is a point of the cloud, or one projected before, or new "
                   "(computed now and appended to the umap file's `projected_points`).",
    "oneOf": [
        {"type": "object", "required": ["found_in_cloud", "existing_index"], "additionalProperties": False,
         "properties": {"found_in_cloud": {"const": True},
                        "existing_index": {"description": "Its index in the umap file's columns.",
                                           "type": "integer", "minimum": 0}}},
        {"type": "object", "required": ["found_in_cloud", "found_in_projected", "projected_index"],
         "additionalProperties": False,
         "properties": {"found_in_cloud": _FALSE, "found_in_projected": {"const": True},
                        "projected_index": {"description": "Its index in the umap file's `projected_points`.",
                                            "type": "integer", "minimum": 0}}},
        {"type": "object", "required": ["found_in_cloud", "found_in_projected", "point"],
         "additionalProperties": False,
         "properties": {"found_in_cloud": _FALSE, "found_in_projected": _FALSE,
                        "point": _file_schema("umap_head.schema.json", "properties", "projected_points", "items")}},
    ],
}
_REPLIES: dict[str, dict] = {
    "add_custom_sequence": {
        "description": "The new sequence's record in the requested head's custom_sequences/L{l}H{h}.json.",
        **_file_schema("custom_head.schema.json", "properties", "sequences", "items"),
    },
    "delete_custom_sequence": {"type": "object", "required": ["deleted"], "additionalProperties": False,
                               "properties": {"deleted": CUSTOM_ID}},
    "save_umap_clusters": {"type": "object", "required": ["saved"], "additionalProperties": False,
                           "properties": {"saved": {"description": "How many clusters the file now holds.",
                                                    "type": "integer", "minimum": 0}}},
    "project_to_umap": _PROJECTION_REPLY,
    "qk_attributions": {"description": "The content of attributions/qk/L{l}H{h}S{seq}Q{q}K{k}.json (CONTRACT section 2).",
                        **_file_schema("attribution_file.schema.json")},
    "ov_attributions": {"description": "The content of attributions/ov/L{l}H{h}S{seq}Q{q}K{k}.json (CONTRACT section 2).",
                        **_file_schema("attribution_file.schema.json")},
}

_SUMMARIES = {
    "add_custom_sequence": "Run the model on a text once; write its record into custom_sequences/ for every "
                           "scanned head, then list it in custom_sequences/index.json.",
    "delete_custom_sequence": "Unlist a custom sequence from custom_sequences/index.json, then remove it from "
                              "every custom_sequences/L{l}H{h}.json.",
    "save_umap_clusters": "Replace the `clusters` of umap/L{l}H{h}.json.",
    "project_to_umap": "Place one attention edge (seq_idx, query_pos, key_pos) of a head in its PCA (and UMAP) "
                       "views: found in the cloud, found among the projected points, or computed and kept.",
    "qk_attributions": "Decompose one attention score into pairs of features of the dictionary of the layer's input "
                       "(--dictionary): the cached file when it was made with the same dictionaries, else computed "
                       "(one forward pass), written to attributions/qk/ and listed in attributions/manifest.json.",
    "ov_attributions": "Decompose one OV write (the key position's value through the head, at the query position) "
                       "into features of the layer's input dictionary, onto the features of the dictionary of the "
                       "layer's output (resid_post) when one is served, else onto the head's output direction; cached "
                       "in attributions/ov/ as for qk_attributions.",
}

_ERRORS = {
    "400": "Bad body: not JSON, not an object, a missing, unknown or mistyped field, a head that was not scanned, "
           "a position past the sequence, a key the query cannot attend to (after it, in a causal model), "
           "a cluster point not in the cloud.",
    "403": "A context this server did not issue.",
    "404": "Unknown sequence id or route; for the attribution endpoints also: no dictionary reads the layer's input.",
    "409": f"The data tree cannot take it: {MAX_CUSTOM_SEQUENCES} custom sequences already, "
           f"{MAX_PROJECTED_POINTS} projected points of the head already, {MAX_ATTRIBUTION_FILES} attribution files "
           "already, an empty cloud, a missing file, or a model that does not reproduce the scan.",
    "413": f"Body over {MAX_BODY_BYTES} bytes, or text over {MAX_TEXT_BYTES} UTF-8 bytes.",
    "415": "Content-Type is not application/json.",
    "429": "Too many model jobs queued; retry later.",
}


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _with_examples(schema: dict, examples: dict[str, list]) -> dict:
    """A copy of a request schema whose top-level fields named in `examples` list these values as examples."""
    out = copy.deepcopy(schema)
    for name, values in examples.items():
        if name in out["properties"] and values:
            out["properties"][name]["examples"] = values
    return out


def openapi_document(url: str, examples: dict[str, list]) -> dict:
    """The OpenAPI 3.1 description of the server at `url`; `examples`: field -> values of this tree."""
    paths: dict = {}
    for name in ENDPOINTS:
        responses = {"200": {"description": "Success.", "content": {"application/json": {"schema": _REPLIES[name]}}}}
        responses.update({code: _error_response(text) for code, text in _ERRORS.items()})
        if name.endswith("_attributions"):
            responses["501"] = _error_response("The server was started without any --dictionary, so attributions "
                                               "are off (the body is validated first).")
        paths[endpoint_path(name)] = {"post": {
            "operationId": name,
            "summary": _SUMMARIES[name],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _with_examples(REQUESTS[name], examples)}}},
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
                 "description": "Live endpoints of headvis (CONTRACT section 3): POST "
                                f"{API_PREFIX}/{{name}}/v0. Every body carries `context` from "
                                "data/server_config.json. Errors are JSON {\"detail\": ...} with a 4xx "
                                "(or the attribution endpoints' 501 on a server started without --dictionary)."},
        "servers": [{"url": url}],
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }

