"""Clients that are careless or hostile at the HTTP level: bodies that lie, trickle, or are merely huge.

- a pattern's `$` is the end of the string: a trailing newline is refused;
- a body whose Content-Encoding does not decode is a 400, not a 500;
- a body that stops arriving is a 408 within BODY_TIMEOUT_S, then the
  connection is closed;
- a 0.9 MB save_umap_clusters body (64 clusters of 1100 points) is parsed
  and validated off the event loop (another client's small request meanwhile
  is answered in a fraction of the big one's time), and its points cost a
  few times json.loads of it, not the ~150x jsonschema took.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib

import pytest
from aiohttp.test_utils import TestServer

from headvis.io import read_json, write_json
from headvis.server import limits, validation
from headvis.server.app import create_app
from headvis.server.openapi import REQUESTS

from server_helpers import SEQ_LEN, Api, endpoint

pytestmark = pytest.mark.asyncio

JSON = {"Content-Type": "application/json"}


def _cloud(data, layer: int, head: int) -> list[list]:
    umap = read_json(data / "umap" / f"L{layer}H{head}.json")
    return [list(p) for p in zip(umap["seq_idx"], umap["top_q"], umap["top_k"])]


def _cluster(points: list[list], name: str = "a", color: str = "#ff0000") -> dict:
    return {"name": name, "color": color, "points": points}


# -- patterns: `$` is the end of the string

@pytest.mark.parametrize("color", ["#abc\n", "#aabbcc\n", "#abc\n\n", "#abc\r", "\n#abc"])
async def test_a_colour_with_a_newline_is_refused(api, data, color):
    status, reply = await api.post("save_umap_clusters", layer=3, head=0,
                                   clusters=[_cluster(_cloud(data, 3, 0)[:2], color=color)])
    assert status == 400 and reply["detail"].startswith("clusters.0.color must match ^#("), reply
    assert read_json(data / "umap" / "L3H0.json")["clusters"] == []


@pytest.mark.parametrize("name, fields, message", [
    ("delete_custom_sequence", {"sequence_id": "c0123456789ab\n"}, "sequence_id must match ^c[0-9a-f]{12}$"),
    ("save_umap_clusters", {"clusters": [_cluster([["c0123456789ab\n", 1, 0]])]},
     "clusters.0.points.0.0 must match ^c[0-9a-f]{12}$"),
    ("project_to_umap", {"seq_idx": "c0123456789ab\n", "query_pos": 1, "key_pos": 0}, "seq_idx must be a scanned"),
])
async def test_a_custom_id_with_a_trailing_newline_is_refused(api, name, fields, message):
    status, reply = await api.post(name, layer=1, head=0, **fields)
    assert status == 400 and message in reply["detail"], reply


async def test_well_formed_colours_and_ids_still_pass(api, data):
    points = _cloud(data, 3, 0)[:2]
    clusters = [_cluster(points, "a", "#abc"), _cluster(points, "b", "#A0b1C2")]
    assert await api.post("save_umap_clusters", layer=3, head=0, clusters=clusters) == (200, {"saved": 2})
    status, reply = await api.post("delete_custom_sequence", layer=1, head=0, sequence_id="c0123456789ab")
    assert status == 404, reply  # well formed, just not listed


async def test_the_published_patterns_stay_ecma(client):
    """/api/openapi.json publishes the schemas' own patterns: in ECMA-262, `$` is already the end."""
    text = await (await client.get("/api/openapi.json")).text()
    assert '"^c[0-9a-f]{12}$"' in text and '"^#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$"' in text and "\\\\Z" not in text


# -- Content-Encoding that does not decode

@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_400(api, caplog, encoding):
    raw = json.dumps({"context": api.context, "layer": 1, "head": 0, "sequence_id": "c0123456789ab"}).encode()
    with caplog.at_level(logging.ERROR):
        response = await api.client.post(endpoint("delete_custom_sequence"), data=raw,
                                         headers={**JSON, "Content-Encoding": encoding})
        reply = await response.json()
    assert response.status == 400 and set(reply) == {"detail"}, reply
    assert reply["detail"] == (f"body is not valid {encoding} data, as its Content-Encoding says: send it "
                               "compressed so, or without Content-Encoding")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []  # a client's mistake, not a server error


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
async def test_a_body_compressed_as_declared_is_read(api, encoding, compress):
    raw = json.dumps({"context": api.context, "layer": 1, "head": 0, "sequence_id": "c0123456789ab"}).encode()
    response = await api.client.post(endpoint("delete_custom_sequence"), data=compress(raw),
                                     headers={**JSON, "Content-Encoding": encoding})
    assert response.status == 404 and "no custom sequence" in (await response.json())["detail"]


# -- a body that stops arriving

async def test_a_stalled_body_is_408_and_the_connection_closes(aiohttp_client, config, lm, monkeypatch):
    monkeypatch.setattr(limits, "BODY_TIMEOUT_S", 0.5)
    # After an error reply with part of the body unread, aiohttp lingers (reads and drops what still comes, 10 s
    # by default) so that the client reads the reply rather than a reset; shortened here like the timeout.
    server = TestServer(create_app(config, lm))
    await server.start_server(lingering_time=0.5)  # TestServer(**kwargs) would not pass it on to the runner
    client = await aiohttp_client(server)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(f"POST {endpoint('add_custom_sequence')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode() + b'{"context"')
        await writer.drain()
        start = loop.time()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        waited = loop.time() - start
        status_line, *header_lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines if line)
        body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 5)
        assert status_line.startswith("HTTP/1.1 408 "), head
        assert 0.4 < waited < 3, waited
        assert json.loads(body) == {"detail": "the body did not arrive within 0.5 s (Content-Length 100); "
                                              "send it whole, at once"}
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, not kept alive
    finally:
        writer.close()


# -- a large valid body while another client waits

def _grow_cloud(data, layer: int, head: int, n: int) -> list[list]:
    """Make the head's cloud n points: every causal edge of the scanned sequences, in order, up to n.

    The fixture scan keeps 60 points per head; a body of many distinct points needs a bigger cloud. Every
    other per-point column is padded with copies of its values, so the columns keep one length.
    """
    path = data / "umap" / f"L{layer}H{head}.json"
    umap = read_json(path)
    old = len(umap["seq_idx"])
    sequences = sorted(int(s) for s in read_json(data / "umap" / "sequences.json"))
    edges = [(s, q, k) for s in sequences for q in range(SEQ_LEN) for k in range(q + 1)][:n]
    assert len(edges) == n

    def pad(node):
        if isinstance(node, dict):
            return {key: pad(value) for key, value in node.items()}
        if isinstance(node, list) and len(node) == old:
            return [node[i % old] for i in range(n)]
        return node

    umap = pad(umap)
    umap["seq_idx"], umap["top_q"], umap["top_k"] = (list(column) for column in zip(*edges))
    write_json(path, umap)
    return [list(edge) for edge in edges]


async def _big_body(aiohttp_client, config, lm, data) -> tuple[Api, list[dict], bytes]:
    """A server over a tree whose L3H0 cloud grew to 1100 points, and a valid body of 64 clusters of them (~0.9 MB)."""
    points = _grow_cloud(data, 3, 0, 1100)
    api = Api(await aiohttp_client(create_app(config, lm)), data)  # started after the cloud grew
    clusters = [_cluster(points, f"cluster {i}", "#a0b0c0") for i in range(limits.MAX_CLUSTERS)]
    raw = json.dumps({"context": api.context, "layer": 3, "head": 0, "clusters": clusters}).encode()
    assert 800_000 < len(raw) < limits.MAX_BODY_BYTES
    return api, clusters, raw


async def _post_timed(client, raw: bytes) -> tuple[int, dict, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    response = await client.post(endpoint("save_umap_clusters"), data=raw, headers=JSON)
    return response.status, await response.json(), loop.time() - start


async def test_a_large_body_is_validated_off_the_event_loop(aiohttp_client, config, lm, data, monkeypatch):
    """While one client's large body is checked, another client's small request is answered at once."""
    api, clusters, raw = await _big_body(aiohttp_client, config, lm, data)
    # The whole schema, points included, as jsonschema checks it (~2 s for this body): the cost the points
    # fast path removes, kept here so that the big request lasts long enough to time another one against it.
    monkeypatch.setitem(validation._VALIDATORS, "save_umap_clusters",
                        validation._Validator(REQUESTS["save_umap_clusters"]))
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(_post_timed(api.client, raw))
    latencies = []  # of another client's small requests, one after the other while the big one runs
    while not task.done():
        start = loop.time()
        response = await api.client.get("/data/config.json")
        assert response.status == 200
        await response.read()
        latencies.append(loop.time() - start)
    status, reply, duration = await task
    assert (status, reply) == (200, {"saved": limits.MAX_CLUSTERS})
    assert read_json(data / "umap" / "L3H0.json")["clusters"] == clusters
    # Validated on the loop, the body froze it: a small request then waited about as long as the big one.
    assert max(latencies) < duration / 4, (max(latencies), duration, len(latencies))


async def test_a_large_body_s_points_are_checked_by_hand_not_by_the_schema(aiohttp_client, config, lm, data,
                                                                          monkeypatch):
    """The big body's 70,400 points skip jsonschema (which took ~2.3 s of the loop for them, against ~0.07 s by
    hand, when the fast path came): the body is validated against the schema without the points' rules, and
    every point is checked once by `_is_point`. Counted rather than timed, so that a busy machine cannot fail
    it (a timed version, under 30x json.loads, failed a CI run on a loaded machine at 31x)."""
    api, clusters, raw = await _big_body(aiohttp_client, config, lm, data)
    schemas, points = [], []
    first_problem, is_point = validation.first_problem, validation._is_point
    monkeypatch.setattr(validation, "first_problem",
                        lambda validator, *args: schemas.append(validator) or first_problem(validator, *args))
    monkeypatch.setattr(validation, "_is_point", lambda point: points.append(1) or is_point(point))
    status, reply, _ = await _post_timed(api.client, raw)
    assert (status, reply) == (200, {"saved": limits.MAX_CLUSTERS})
    assert schemas == [validation._VALIDATORS["save_umap_clusters"]]  # the light schema, once; no point's
    assert validation._VALIDATORS["save_umap_clusters"].schema["properties"]["clusters"]["items"]["properties"][
        "points"] == {"type": "array"}
    assert len(points) == sum(len(c["points"]) for c in clusters) == 64 * 1100


@pytest.mark.parametrize("damage, message", [
    (lambda points: points[-1].__setitem__(2, -1), "clusters.63.points.1099.2 must be at least 0"),
    (lambda points: points[-1].__setitem__(0, "c0123456789ab\n"), "clusters.63.points.1099.0 must match"),
    (lambda points: points.append(points[0]), "clusters.63.points lists an item more than once"),
    (lambda points: points.append([1, 2]), "clusters.63.points.1100 must have at least 3 items"),
    (lambda points: points.append([True, 2, 1]), "clusters.63.points.1100.0: True is not valid under any"),
])
async def test_a_large_body_with_one_bad_point_names_it(aiohttp_client, config, lm, data, damage, message):
    """The points of a large body are checked by hand; the messages are the schema's (test_server_api checks
    the same rules on small bodies)."""
    points = _grow_cloud(data, 3, 0, 1100)
    api = Api(await aiohttp_client(create_app(config, lm)), data)
    clusters = [_cluster([list(p) for p in points], f"cluster {i}") for i in range(limits.MAX_CLUSTERS)]
    damage(clusters[-1]["points"])
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=clusters)
    assert status == 400 and reply["detail"].startswith(message), reply
