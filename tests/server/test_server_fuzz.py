"""Fuzzing the API from its own OpenAPI description: no generated request gets a 5xx.

A live server (the real app on a loopback socket, in a thread) serves
/api/openapi.json; each endpoint's request schema drives a hypothesis
strategy of valid bodies, which are then mutated (a field dropped, replaced
by arbitrary JSON, an unknown field added, the context forged), plus raw
bodies that are not JSON at all. Every reply must be JSON, a 2xx or a 4xx
with `{"detail": ...}`, never a 5xx. The server has a dictionary of layer 1's
input, so generated attribution requests of layer 1 are computed (and those
of layer 3, which has none, get the 404).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import threading
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headvis.io import read_json
from headvis.server.app import create_app
from headvis.server.net import bind, url_for
from headvis.server.openapi import ENDPOINTS, endpoint_path
from headvis.server.state import ServerConfig

FUZZ = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values valid under a JSON Schema (the subset the API's schemas use); `examples` are drawn often."""
    if "examples" in schema:
        rest = {k: v for k, v in schema.items() if k != "examples"}
        return st.one_of(st.sampled_from(schema["examples"]), from_schema(rest))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema or "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema.get("oneOf", schema.get("anyOf"))])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties:
            return st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)
        required = [k for k in schema.get("required", []) if k in properties]
        optional = {k: from_schema(v) for k, v in properties.items() if k not in required}
        return st.fixed_dictionaries({k: from_schema(properties[k]) for k in required}, optional=optional)
    if kind == "array" and "prefixItems" in schema:  # a fixed-length tuple (items: false)
        return st.tuples(*(from_schema(s) for s in schema["prefixItems"])).map(list)
    if kind == "array":
        unique = (lambda v: json.dumps(v, sort_keys=True)) if schema.get("uniqueItems") else None  # lists are unhashable
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 6), 6), unique_by=unique)
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        low = schema.get("minimum", -40)
        return st.integers(min_value=low, max_value=schema.get("maximum", low + 40))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    return JSON_VALUES


def _mutations(body: dict) -> st.SearchStrategy:
    keys = sorted(body)
    return st.one_of(
        st.just(body), st.just(body), st.just(body),  # half the bodies go through unchanged
        st.sampled_from(keys).map(lambda k: {kk: v for kk, v in body.items() if kk != k}),
        st.tuples(st.sampled_from(keys), JSON_VALUES).map(lambda kv: {**body, kv[0]: kv[1]}),
        st.tuples(st.text(max_size=10), JSON_VALUES).map(lambda kv: {**body, kv[0]: kv[1]}),
    )


@pytest.fixture(scope="module")
def live(scanned, lm, dictionaries, tmp_path_factory):
    """(url, data folder) of a real server on a loopback socket, run by a thread."""
    data = tmp_path_factory.mktemp("fuzz") / "data"
    shutil.copytree(scanned, data)
    sock = bind("127.0.0.1", 0)
    config = ServerConfig(data=data, url=url_for(sock), dictionaries=(dictionaries["L1"],))
    runner = web.AppRunner(create_app(config, lm))
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.SockSite(runner, sock).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60)
    yield url_for(sock), data
    loop.call_soon_threadsafe(loop.stop)
    thread.join(60)
    assert read_json(data / "server_config.json") == {}


def _request(url: str, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def document(live) -> dict:
    status, raw = _request(live[0], "GET", "/api/openapi.json")
    assert status == 200
    return json.loads(raw)


def _check_reply(endpoint: str, status: int, raw: bytes) -> None:
    reply = json.loads(raw)  # every reply is JSON
    assert status < 500, (status, reply)
    if status >= 400:
        assert set(reply) == {"detail"} and isinstance(reply["detail"], str) and "Traceback" not in reply["detail"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_generated_bodies_never_get_a_5xx(live, document, endpoint):
    url, data = live
    schema = document["paths"][endpoint_path(endpoint)]["post"]["requestBody"]["content"]["application/json"]["schema"]
    context = read_json(data / "server_config.json")["context"]
    contexts = st.one_of(st.just(context), st.just(context), st.just(context), JSON_VALUES)
    fields = {k: v for k, v in schema["properties"].items() if k != "context"}
    valid = st.fixed_dictionaries({"context": contexts, **{k: from_schema(v) for k, v in fields.items()}})

    @FUZZ
    @given(valid.flatmap(_mutations))
    def check(body: dict) -> None:
        status, raw = _request(url, "POST", endpoint_path(endpoint), json.dumps(body).encode())
        _check_reply(endpoint, status, raw)

    check()
    if endpoint.endswith("_attributions"):  # the success path, whether or not the draw reached it
        shown = read_json(data / "heads" / "L1H0.json")["sequences"][0]["sequence_id"]
        body = {"context": context, "layer": 1, "head": 0, "seq_idx": shown, "query_pos": 2, "key_pos": 1}
        status, raw = _request(url, "POST", endpoint_path(endpoint), json.dumps(body).encode())
        _check_reply(endpoint, status, raw)
        assert status == 200 and json.loads(raw)["kind"] == endpoint.split("_")[0]


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", ""]))
def test_raw_bodies_never_get_a_5xx(live, endpoint, body, content_type):
    status, raw = _request(live[0], "POST", endpoint_path(endpoint), body, content_type)
    _check_reply(endpoint, status, raw)
    assert status != 200
