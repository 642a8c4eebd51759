"""Reading a POST body at the edge: JSON, the issued context, then the endpoint's schema.

Every failure is an `aiohttp.web.HTTPException` whose text is a one-line
message; the app's middleware turns it into `{"detail": ...}`. Messages name
the field and the rule, never echo a large value, never carry a trace.

The body must arrive within `limits.BODY_TIMEOUT_S` (408 otherwise) and
decode as its Content-Encoding says (400 otherwise). A body past
`_THREAD_BYTES` is parsed and checked on a thread, so that one large body
never stalls the event loop for the other clients. Patterns keep their
ECMA-262 meaning (`$` is the end of the string, not "before a final
newline" as in Python), and the `points` arrays of save_umap_clusters
(up to ~70k points in a 1 MiB body) are checked by hand, as jsonschema
costs ~30 us a point; their messages are the schema's.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import re
from functools import cache

import jsonschema
from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from headvis.server import limits
from headvis.server.openapi import REQUESTS

__all__ = ["check_context", "first_problem", "number_text", "read_body", "strict_validator"]

_MESSAGE_CHARS = 300
# Bodies larger than this are parsed and validated on a thread: a valid 0.9 MB save_umap_clusters body took
# 2.3 s of the loop before the points fast path and ~0.07 s after; a small body costs well under a millisecond
# inline, less than the hop to a thread.
_THREAD_BYTES = 64 * 1024


@cache
def _ecma_regex(pattern: str) -> re.Pattern:
    """`pattern` as ECMA-262 (JSON Schema's dialect) reads it: every `$` outside a class is `\\Z`, and
    `\\d`, `\\w` are ASCII. Python's `$` also matches before a final newline, so `^#abc$` took "#abc\\n"."""
    out, in_class, escaped = [], False, False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "$":
            ch = r"\Z"
        out.append(ch)
    return re.compile("".join(out), re.ASCII)


def _pattern(validator, pattern: str, instance, schema):
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# JSON Schema counts 5.0 as an integer; a layer, head or position must be written as one.
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)
)
_Validator = jsonschema.validators.extend(Draft202012Validator, validators={"pattern": _pattern}, type_checker=_TYPES)


def strict_validator(schema: dict) -> jsonschema.protocols.Validator:
    """A 2020-12 validator of `schema` whose integers are ints (not 5.0, not true) and whose patterns are ECMA's."""
    return _Validator(schema)


# save_umap_clusters without its `points` rules, which `_points_problem` checks by hand. The guard keeps the
# two in step: a rule added to the points schema must be added to `_is_point` too.
_POINTS = REQUESTS["save_umap_clusters"]["properties"]["clusters"]["items"]["properties"]["points"]
assert set(_POINTS) == {"description", "type", "uniqueItems", "items"} and _POINTS["uniqueItems"] is True, _POINTS
assert set(_POINTS["items"]) == {"description", "type", "minItems", "maxItems", "prefixItems", "items"}, _POINTS
_CLUSTERS_LIGHT = copy.deepcopy(REQUESTS["save_umap_clusters"])
_CLUSTERS_LIGHT["properties"]["clusters"]["items"]["properties"]["points"] = {"type": "array"}
_POINT_VALIDATOR = _Validator(_POINTS["items"])
_CUSTOM_ID = _ecma_regex(_POINTS["items"]["prefixItems"][0]["oneOf"][1]["pattern"])

_VALIDATORS = {name: _Validator(_CLUSTERS_LIGHT if name == "save_umap_clusters" else schema)
               for name, schema in REQUESTS.items()}
_TYPE_WORDS = {"integer": "an integer", "string": "a string", "object": "an object", "array": "an array",
               "number": "a number", "boolean": "true or false"}


def number_text(n: int) -> str:
    """An integer from a request, shortened for a message: JSON allows thousands of digits."""
    text = str(n)
    return text if len(text) <= 20 else text[:17] + "..."


def _short(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=_short(message))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _describe(error: jsonschema.ValidationError, prefix: tuple = ()) -> str:
    """A one-line message for a schema violation; `prefix`: the path of the validated value in the body."""
    where = ".".join(str(p) for p in (*prefix, *error.absolute_path)) or "body"
    rule, value, instance = error.validator, error.validator_value, error.instance
    if where == "seq_idx":  # a oneOf: its branches' messages would mislead
        return "seq_idx must be a scanned sequence id (an integer >= 0) or a custom id ('c' and 12 hex digits)"
    if rule == "required":
        missing = [name for name in value if name not in instance]
        return f"missing field {missing[0]!r}" if where == "body" else f"{where}: missing field {missing[0]!r}"
    if rule == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        extra = sorted(str(k) for k in instance if k not in known)
        name = extra[0] if extra else "?"
        name = name if len(name) <= 40 else name[:37] + "..."
        return f"unknown field {name!r}" if where == "body" else f"{where}: unknown field {name!r}"
    if rule == "type":
        return f"{where} must be {_TYPE_WORDS.get(value, value)}"
    if rule == "minLength":
        return f"{where} must not be empty" if value == 1 else f"{where} must have at least {value} characters"
    if rule == "maxLength":
        return f"{where} must have at most {value} characters"
    if rule == "minimum":
        return f"{where} must be at least {value}"
    if rule == "maximum":
        return f"{where} must be at most {value}"
    if rule == "maxItems":
        return f"{where} must have at most {value} items"
    if rule == "minItems":
        return f"{where} must have at least {value} items"
    if rule == "uniqueItems":
        return f"{where} lists an item more than once"
    if rule == "pattern":
        return f"{where} must match {value}"
    if rule == "enum":
        return f"{where} must be one of {', '.join(map(str, value))}"
    if rule == "const":
        return f"{where} must be {value!r}"
    return f"{where}: {error.message}"


def first_problem(validator: jsonschema.protocols.Validator, instance, prefix: tuple = ()) -> str | None:
    """The one-line message of the most relevant violation of `instance`, or None when it is valid."""
    error = best_match(validator.iter_errors(instance))
    return None if error is None else _describe(error, prefix)


def _is_point(point) -> bool:
    """`point` valid under the cluster point schema: [seq_idx (int >= 0 or custom id), top_q >= 0, top_k >= 0]."""
    if type(point) is not list or len(point) != 3:
        return False
    seq_idx, top_q, top_k = point
    return (type(top_q) is int and top_q >= 0 and type(top_k) is int and top_k >= 0
            and (type(seq_idx) is int and seq_idx >= 0
                 or type(seq_idx) is str and _CUSTOM_ID.search(seq_idx) is not None))


def _points_problem(clusters: list[dict]) -> str | None:
    """The first bad `points` array of clusters that passed `_CLUSTERS_LIGHT`, described as the schema would."""
    for i, cluster in enumerate(clusters):
        points = cluster["points"]
        for j, point in enumerate(points):
            if not _is_point(point):  # the schema describes the one bad point: a few microseconds
                return first_problem(_POINT_VALIDATOR, point, ("clusters", i, "points", j))
        if len(set(map(tuple, points))) < len(points):  # valid points: tuple equality is JSON equality
            return f"clusters.{i}.points lists an item more than once"
    return None


def check_context(given, issued: dict) -> None:
    """403 unless `given` is exactly the context this server wrote to server_config.json."""
    if given is None:
        raise web.HTTPForbidden(text="missing context: send the `context` of data/server_config.json")
    ok = (
        isinstance(given, dict)
        and set(given) == set(issued)
        and all(isinstance(given[k], str) for k in issued)
        and given["setup"] == issued["setup"]
        and hmac.compare_digest(given["token"].encode("utf-8", "surrogatepass"), issued["token"].encode("utf-8"))
    )
    if not ok:
        raise web.HTTPForbidden(text="unknown context: this server did not issue it (reload data/server_config.json)")


def _parse(raw: bytes, endpoint: str, issued_context: dict) -> dict:
    """The body's JSON object, checked against the context and the endpoint's schema: read_body's CPU part."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise _bad("body is not UTF-8") from e
    except RecursionError as e:
        raise _bad("body is nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers past Python's digit limit
        raise _bad(f"body is not valid JSON ({getattr(e, 'msg', e)})") from e
    if not isinstance(body, dict):
        raise _bad("body must be a JSON object")
    check_context(body.get("context"), issued_context)
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad("body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from e
    except RecursionError as e:
        raise _bad("body is nested too deeply") from e
    problem = first_problem(_VALIDATORS[endpoint], body)
    if problem is None and endpoint == "save_umap_clusters":
        problem = _points_problem(body["clusters"])
    if problem is not None:
        raise _bad(problem)
    return body


async def _read(request: web.Request) -> bytes:
    """The raw body (413 past the app's client_max_size); 408 when it is not all there within BODY_TIMEOUT_S."""
    timeout = limits.BODY_TIMEOUT_S  # read at each request, so that a test can shorten it
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError as e:
        # aiohttp then lingers (reads and drops what still comes, 10 s at most) and closes the connection
        raise web.HTTPRequestTimeout(text=f"the body did not arrive within {timeout:g} s (Content-Length "
                                          f"{request.content_length}); send it whole, at once") from e
    except web.RequestPayloadError as e:  # the body does not decompress as declared, or ended early
        # The payload can only raise again: mark it ended and close after the reply, or aiohttp would
        # linger on it, log the error as an unhandled exception, and drop the connection anyway.
        request.content.feed_eof()
        request.protocol.close()
        encoding = request.headers.get("Content-Encoding")
        if encoding:
            raise _bad(f"body is not valid {encoding[:20]} data, as its Content-Encoding says: send it "
                       "compressed so, or without Content-Encoding") from e
        raise _bad("body could not be read (it ended early or its transfer encoding is broken)") from e


async def read_body(request: web.Request, endpoint: str, issued_context: dict) -> dict:
    """The JSON object of a POST to `endpoint`, checked against the context and REQUESTS[endpoint]."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send the body as JSON with Content-Type: application/json")
    declared = request.content_length
    if declared is not None and declared > limits.MAX_BODY_BYTES:  # refused at once, not after the body timeout
        raise web.HTTPRequestEntityTooLarge(limits.MAX_BODY_BYTES, declared,
                                            text=f"the body is {declared} bytes; the limit is {limits.MAX_BODY_BYTES}")
    raw = await _read(request)
    if len(raw) > _THREAD_BYTES:  # parsing and validating 1 MiB takes ~0.07 s of CPU: not on the loop
        return await asyncio.to_thread(_parse, raw, endpoint, issued_context)
    return _parse(raw, endpoint, issued_context)
