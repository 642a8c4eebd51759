"""Reading a POST body at the edge: JSON, the issued context, then the endpoint's schema.

Every failure is an `aiohttp.web.HTTPException` whose text is a one-line
message; the app's middleware turns it into `{"detail": ...}`. Messages name
the field and the rule, never echo a large value, never carry a trace.
"""

from __future__ import annotations

import hmac
import json

import jsonschema
from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from headvis.server.openapi import REQUESTS

__all__ = ["check_context", "number_text", "read_body"]

_MESSAGE_CHARS = 300

# JSON Schema counts 5.0 as an integer; a layer, head or position must be written as one.
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool)
)
_Validator = jsonschema.validators.extend(Draft202012Validator, type_checker=_TYPES)
_VALIDATORS = {name: _Validator(schema) for name, schema in REQUESTS.items()}
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


def _describe(error: jsonschema.ValidationError) -> str:
    """A one-line message for the most relevant schema violation."""
    where = ".".join(str(p) for p in error.absolute_path) or "body"
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


async def read_body(request: web.Request, endpoint: str, issued_context: dict) -> dict:
    """The JSON object of a POST to `endpoint`, checked against the context and REQUESTS[endpoint]."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send the body as JSON with Content-Type: application/json")
    raw = await request.read()  # 413 past the app's client_max_size
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
    error = best_match(_VALIDATORS[endpoint].iter_errors(body))
    if error is not None:
        raise _bad(_describe(error))
    return body
