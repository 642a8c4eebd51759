"""The endpoints of CONTRACT section 3: their effect on disk, and every way a body can be wrong."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from headvis.io import read_json, write_json
from headvis.schemas import validate_file, validate_tree
from headvis.server import limits, store
from headvis.server.app import create_app
from headvis.server.routes import ATTRIBUTIONS_UNAVAILABLE
from headvis.server.state import JOBS

from server_helpers import HEADS, LAYERS, NUM_SEQS, SEQ_LEN

pytestmark = pytest.mark.asyncio

HEAD_RECORD_KEYS = {"id", "interval", "max_activation", "argmax", "tokens", "token_ids", "seq_len",
                    "attention_indices", "attention_values"}


def _custom_ids(data) -> list[str]:
    path = data / "custom" / "sequences.json"
    return [e["id"] for e in read_json(path)["sequences"]] if path.exists() else []


def _head_ids(data, layer: int, head: int) -> list[str]:
    path = data / "custom" / f"L{layer}H{head}.json"
    return [r["id"] for r in read_json(path)["sequences"]] if path.exists() else []


def _leftovers(data) -> list[str]:
    return sorted(p.name for p in data.rglob(".*"))


# -- server_config.json

async def test_server_config_is_written_on_start_and_put_back_on_shutdown(aiohttp_client, config, lm, data):
    client = await aiohttp_client(create_app(config, lm))
    written = read_json(data / "server_config.json")
    assert written["url"] == "http://127.0.0.1:8765"
    assert set(written["context"]) == {"setup", "token"} and len(written["context"]["token"]) >= 32
    validate_file(data / "server_config.json", "server_config.schema.json")
    await client.close()
    assert read_json(data / "server_config.json") == {}
    validate_file(data / "server_config.json", "server_config.schema.json")


async def test_each_start_issues_a_new_context(aiohttp_client, config, lm, data):
    first = await aiohttp_client(create_app(config, lm))
    old = read_json(data / "server_config.json")["context"]
    await first.close()
    second = await aiohttp_client(create_app(config, lm))
    response = await second.post("/api/add_custom_sequence", json={"context": old, "text": "hi there"})
    assert response.status == 403


# -- add / delete

async def test_add_custom_sequence_writes_a_record_for_every_scanned_head(api, data):
    status, reply = await api.post("add_custom_sequence", text="The cat sat on the mat. The cat")
    assert status == 200, reply
    assert reply["id"].startswith("c-") and reply["truncated"] is False
    assert reply["tokens"][1:3] == ["The", " cat"] and len(reply["tokens"]) == len(reply["token_ids"])
    assert read_json(data / "custom" / "sequences.json")["sequences"] == [reply]
    validate_file(data / "custom" / "sequences.json", "custom_sequences.schema.json")
    for layer in LAYERS:
        for head in HEADS:
            path = data / "custom" / f"L{layer}H{head}.json"
            validate_file(path, "custom_head.schema.json")
            body = read_json(path)
            assert (body["layer"], body["head"]) == (layer, head)
            (record,) = body["sequences"]
            scanned_record = read_json(data / "heads" / f"L{layer}H{head}.json")["sequences"][0]
            assert set(record) == set(scanned_record) == HEAD_RECORD_KEYS
            assert record["id"] == reply["id"] and record["interval"] == -1
            assert record["token_ids"] == reply["token_ids"] and record["seq_len"] == len(reply["token_ids"])
            indices = np.asarray(record["attention_indices"])
            assert np.all(np.diff(indices) > 0) and indices.max() < record["seq_len"] ** 2
    assert _leftovers(data) == []
    validate_tree(data)  # the whole tree, server files included, against headvis/schemas


async def test_custom_record_equals_the_scans_record_of_the_same_tokens(api, data, lm):
    """Same tokens in, same record out: the server runs the scan's code, not a second implementation."""
    for scanned in read_json(data / "heads" / "L3H4.json")["sequences"]:
        text = lm.tokenizer.decode(scanned["token_ids"][1:], clean_up_tokenization_spaces=False)
        if [lm.tokenizer.bos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"] == scanned["token_ids"]:
            break
    else:
        pytest.fail("no scanned sequence of L3H4 survives a decode/encode round trip")
    status, reply = await api.post("add_custom_sequence", text=text)
    assert status == 200, reply
    (record,) = read_json(data / "custom" / "L3H4.json")["sequences"]
    for key in ("argmax", "tokens", "token_ids", "seq_len", "attention_indices"):
        assert record[key] == scanned[key], key
    assert record["max_activation"] == pytest.approx(scanned["max_activation"], rel=1e-5)
    np.testing.assert_allclose(record["attention_values"], scanned["attention_values"], rtol=1e-5, atol=1e-6)


async def test_long_text_is_cut_to_the_token_limit(api, data, monkeypatch):
    monkeypatch.setattr(api.client.app[JOBS].worker, "max_tokens", 16)
    status, reply = await api.post("add_custom_sequence", text="one two three four five six " * 10)
    assert status == 200 and reply["truncated"] is True and len(reply["token_ids"]) == 16
    assert read_json(data / "custom" / "L1H0.json")["sequences"][0]["seq_len"] == 16


async def test_delete_custom_sequence_removes_it_everywhere(api, data):
    _, first = await api.post("add_custom_sequence", text="first text")
    _, second = await api.post("add_custom_sequence", text="second text")
    status, reply = await api.post("delete_custom_sequence", id=first["id"])
    assert (status, reply) == (200, {"deleted": first["id"]})
    assert _custom_ids(data) == [second["id"]]
    for layer in LAYERS:
        for head in HEADS:
            assert _head_ids(data, layer, head) == [second["id"]]
    status, reply = await api.post("delete_custom_sequence", id=first["id"])
    assert status == 404 and first["id"] in reply["error"]


async def test_twelve_concurrent_adds_then_twelve_concurrent_deletes_lose_nothing(api, data):
    replies = await asyncio.gather(*(api.post("add_custom_sequence", text=f"sequence number {i} says hello")
                                     for i in range(12)))
    assert all(status == 200 for status, _ in replies), replies
    ids = sorted(reply["id"] for _, reply in replies)
    assert len(set(ids)) == 12
    assert sorted(_custom_ids(data)) == ids
    for layer in LAYERS:
        for head in HEADS:
            assert sorted(_head_ids(data, layer, head)) == ids
    texts = {e["id"]: e["text"] for e in read_json(data / "custom" / "sequences.json")["sequences"]}
    assert sorted(texts.values()) == sorted(f"sequence number {i} says hello" for i in range(12))

    deletes = await asyncio.gather(*(api.post("delete_custom_sequence", id=sid) for sid in ids))
    assert all(status == 200 for status, _ in deletes), deletes
    assert _custom_ids(data) == []
    for layer in LAYERS:
        for head in HEADS:
            assert _head_ids(data, layer, head) == []
    assert _leftovers(data) == []


async def test_start_up_removes_records_of_an_interrupted_add(aiohttp_client, config, lm, data):
    orphan = {"layer": 1, "head": 0, "sequences": [{"id": "c-000000000000", "interval": -1}]}
    write_json(data / "custom" / "L1H0.json", orphan)
    (data / "custom" / ".L1H0.json.abc123.tmp").write_text("half")
    await aiohttp_client(create_app(config, lm))
    assert read_json(data / "custom" / "L1H0.json")["sequences"] == []
    assert _leftovers(data) == []


async def test_custom_sequences_are_capped(api, monkeypatch):
    monkeypatch.setattr(store, "MAX_CUSTOM_SEQUENCES", 1)
    assert (await api.post("add_custom_sequence", text="the only one"))[0] == 200
    status, reply = await api.post("add_custom_sequence", text="one too many")
    assert status == 409 and "delete some" in reply["error"]


async def test_a_full_model_queue_answers_429(api, monkeypatch):
    from headvis.server import compute

    monkeypatch.setattr(compute, "MAX_PENDING_JOBS", 0)
    status, reply = await api.post("add_custom_sequence", text="queued")
    assert status == 429 and "busy" in reply["error"]


async def test_a_server_bug_is_a_500_without_a_trace(api, monkeypatch):
    def broken(text):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.client.app[JOBS].worker, "custom_records", broken)
    response = await api.client.post("/api/add_custom_sequence", json={"context": api.context, "text": "x y"})
    assert response.status == 500
    body = await response.text()
    assert json.loads(body) == {"error": "internal error (the server log has the details)"}
    assert "Traceback" not in body and "secret" not in body


# -- bad bodies

def _body_cases():
    ok = {"text": "hello world"}
    return {
        "not JSON": (b"{not json", 400, "not valid JSON"),
        "not UTF-8": (b'{"text": "\xff\xfe"}', 400, "not UTF-8"),
        "a JSON array": (b"[1, 2]", 400, "JSON object"),
        "NaN": (b'{"context": CTX, "text": NaN}', 400, "NaN is not valid JSON"),
        "deep nesting": (b'{"context": CTX, "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested"),
        "missing text": ({}, 400, "missing field 'text'"),
        "text not a string": ({"text": 5}, 400, "text must be a string"),
        "empty text": ({"text": ""}, 400, "text must not be empty"),
        "unknown field": ({**ok, "path": "/etc/passwd"}, 400, "unknown field 'path'"),
        "lone surrogate": ({"text": "\ud800"}, 400, "surrogate"),
        "text over the byte limit": ({"text": "é" * (limits.MAX_TEXT_BYTES // 2 + 1)}, 413, "UTF-8 bytes"),
    }


@pytest.mark.parametrize("case", list(_body_cases()))
async def test_bad_add_bodies_are_refused_with_a_message(api, data, case):
    body, status, message = _body_cases()[case]
    if isinstance(body, dict):
        raw = json.dumps({"context": api.context, **body}).encode()
    else:
        raw = body.replace(b"CTX", json.dumps(api.context).encode())
    response = await api.client.post("/api/add_custom_sequence", data=raw, headers={"Content-Type": "application/json"})
    reply = await response.json()
    assert response.status == status and message in reply["error"], reply
    assert set(reply) == {"error"}
    assert not (data / "custom").exists()


async def test_a_body_over_the_request_limit_is_413(api):
    raw = json.dumps({"context": api.context, "text": "a" * limits.MAX_BODY_BYTES}).encode()
    response = await api.client.post("/api/add_custom_sequence", data=raw, headers={"Content-Type": "application/json"})
    assert response.status == 413 and "error" in await response.json()


async def test_a_body_that_is_not_json_typed_is_415(api):
    response = await api.client.post("/api/add_custom_sequence", data=json.dumps({"context": api.context, "text": "x"}),
                                     headers={"Content-Type": "text/plain"})
    assert response.status == 415 and "application/json" in (await response.json())["error"]


@pytest.mark.parametrize("context", [None, {}, "default", {"setup": "default"}, {"setup": "default", "token": "guess"},
                                     {"setup": "other", "token": "TOKEN"}, {"setup": "default", "token": "TOKEN", "x": 1},
                                     {"setup": "default", "token": 5}])
async def test_a_context_the_server_did_not_issue_is_403(api, data, context):
    if isinstance(context, dict) and context.get("token") == "TOKEN":
        context = {**context, "token": api.context["token"]}
    body = {"text": "hello"} if context is None else {"context": context, "text": "hello"}
    response = await api.client.post("/api/add_custom_sequence", json=body)
    assert response.status == 403 and "context" in (await response.json())["error"]
    assert not (data / "custom").exists()


@pytest.mark.parametrize("fields, status, message", [
    ({"layer": 2, "head": 0}, 400, "layer 2 was not scanned (scanned layers: 1, 3)"),
    ({"layer": 1, "head": 2}, 400, "head 2 was not scanned"),
    ({"layer": -1, "head": 0}, 400, "layer must be at least 0"),
    ({"layer": 10**30, "head": 0}, 400, "was not scanned"),
    ({"layer": 10**1000, "head": 0}, 400, "layer 10000000000000000... was not scanned"),
    ({"layer": 1.0, "head": 0}, 400, "layer must be an integer"),
    ({"layer": True, "head": 0}, 400, "layer must be an integer"),
    ({"layer": "1", "head": 0}, 400, "layer must be an integer"),
    ({"layer": 1}, 400, "missing field 'head'"),
])
async def test_project_to_umap_refuses_heads_that_were_not_scanned(api, fields, status, message):
    got, reply = await api.post("project_to_umap", text="hello world", **fields)
    assert got == status and message in reply["error"], reply
    assert len(reply["error"]) < 200


@pytest.mark.parametrize("sid, status", [("c-0123456789ab", 404), ("c-XYZ", 400), ("../../config", 400), (7, 400)])
async def test_delete_refuses_unknown_and_malformed_ids(api, data, sid, status):
    got, reply = await api.post("delete_custom_sequence", id=sid)
    assert got == status and "error" in reply
    assert (data / "config.json").exists()


# -- project_to_umap

async def test_project_to_umap_replies_with_pca_points_of_each_vector(api):
    status, reply = await api.post("project_to_umap", text="The cat sat on the mat.", layer=3, head=1)
    assert status == 200, reply
    n = len(reply["token_ids"]) - 1
    assert reply["points"]["pos"] == list(range(1, n + 1))
    assert set(reply["pca"]) == {"q", "k", "v", "o"} and "views" not in reply
    for coords in reply["pca"].values():
        assert np.asarray(coords).shape == (n, 2) and np.all(np.isfinite(coords))


def _with_views(data, layer: int, head: int) -> dict:
    """Give a head a synthetic 'umap' view (a nonlinear map of its PCA coordinates), as --umap would."""
    path = data / "umap" / f"L{layer}H{head}.json"
    body = read_json(path)
    views = {}
    for name, part in body["pca"].items():
        x = np.asarray(part["coords"])
        views[name] = np.stack([np.tanh(x[:, 0]) + x[:, 1] ** 2, x[:, 0] * x[:, 1]], axis=1)
    body["views"] = {"umap": views}
    write_json(path, body)
    return read_json(path)


async def test_projection_of_scan_points_lands_on_their_saved_coordinates(api, data):
    """A scanned sequence projects onto its own saved PCA points and, by interpolation, its view points."""
    head_file = _with_views(data, 3, 4)
    sequences = read_json(data / "umap" / "sequences.json")["sequences"]
    seq = sequences[1]
    worker = api.client.app[JOBS].worker
    reply = await api.client.app[JOBS].run(lambda w: w.project(3, 4, seq["token_ids"]))
    mine = [i for i, s in enumerate(head_file["points"]["seq"]) if s == seq["id"]]
    assert mine, "the fixture scan should sample points of every projected sequence"
    rows = [head_file["points"]["pos"][i] - 1 for i in mine]  # reply row of each scan point
    for name in ("q", "k", "v", "o"):
        saved = np.asarray(head_file["pca"][name]["coords"])[mine]
        scale = np.ptp(head_file["pca"][name]["coords"])
        np.testing.assert_allclose(np.asarray(reply["pca"][name])[rows], saved, atol=1e-4 * scale)
        view = np.asarray(head_file["views"]["umap"][name])
        np.testing.assert_allclose(np.asarray(reply["views"]["umap"][name])[rows], view[mine],
                                   atol=1e-3 * np.ptp(view))
    assert (3, 4) in worker._scan_points  # cached for the next request


async def test_project_to_umap_replies_with_views_when_the_head_has_them(api, data):
    _with_views(data, 1, 0)
    status, reply = await api.post("project_to_umap", text="print('hello')", layer=1, head=0)
    assert status == 200, reply
    n = len(reply["points"]["pos"])
    assert set(reply["views"]) == {"umap"}
    for coords in reply["views"]["umap"].values():
        assert np.asarray(coords).shape == (n, 2) and np.all(np.isfinite(coords))


async def test_views_refuse_a_model_that_does_not_reproduce_the_scan(api, data):
    head_file = _with_views(data, 1, 1)
    head_file["pca"]["q"]["coords"] = [[c[0] + 50.0, c[1]] for c in head_file["pca"]["q"]["coords"]]
    write_json(data / "umap" / "L1H1.json", head_file)
    status, reply = await api.post("project_to_umap", text="hello world", layer=1, head=1)
    assert status == 409 and "does not reproduce" in reply["error"]


# -- save_umap_clusters

CLUSTER = {"name": "digits", "color": "#ff0000", "vector": "q", "view": "pca", "points": [0, 5, 9]}


async def test_save_umap_clusters_replaces_the_file(api, data):
    path = data / "umap" / "clusters" / "L3H0.json"
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[CLUSTER, {**CLUSTER, "name": "b"}])
    assert (status, reply) == (200, {"saved": 2})
    assert read_json(path) == {"clusters": [CLUSTER, {**CLUSTER, "name": "b"}]}
    validate_file(path, "clusters.schema.json")
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[])
    assert (status, reply) == (200, {"saved": 0}) and read_json(path) == {"clusters": []}


@pytest.mark.parametrize("change, message", [
    ({"view": "umap"}, "'umap' is not a view of L3H0 (pca)"),
    ({"points": [0, 60]}, "clusters.0.points: 60 is out of range (L3H0 has 60 points)"),
    ({"points": [1, 1]}, "clusters.0.points lists an item more than once"),
    ({"points": [-1]}, "clusters.0.points.0 must be at least 0"),
    ({"color": "red"}, "clusters.0.color must match"),
    ({"vector": "x"}, "clusters.0.vector must be one of q, k, v, o"),
    ({"name": ""}, "clusters.0.name must not be empty"),
    ({"name": "n" * 101}, "clusters.0.name must have at most 100 characters"),
    ({"extra": 1}, "clusters.0: unknown field 'extra'"),
])
async def test_save_umap_clusters_validates_every_cluster(api, data, change, message):
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[{**CLUSTER, **change}])
    assert status == 400 and message in reply["error"], reply
    assert not (data / "umap" / "clusters").exists()


async def test_save_umap_clusters_caps_the_number_of_clusters(api):
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[CLUSTER] * (limits.MAX_CLUSTERS + 1))
    assert status == 400 and f"at most {limits.MAX_CLUSTERS} items" in reply["error"]


# -- attributions: validated, then 501 until a dictionary is configured

@pytest.mark.parametrize("name", ["qk_attributions", "ov_attributions"])
async def test_attributions_answer_501_after_validating_the_body(api, name):
    status, reply = await api.post(name, layer=1, head=0, seq=3, qpos=5, kpos=2)
    assert (status, reply) == (501, {"error": ATTRIBUTIONS_UNAVAILABLE})
    _, custom = await api.post("add_custom_sequence", text="a b c d e f")
    status, reply = await api.post(name, layer=1, head=0, seq=custom["id"], qpos=3, kpos=3)
    assert status == 501


@pytest.mark.parametrize("fields, status, message", [
    ({"seq": NUM_SEQS}, 404, f"no scanned sequence {NUM_SEQS}"),
    ({"seq": "c-0123456789ab"}, 404, "no custom sequence"),
    ({"seq": "12"}, 400, "seq must be a scanned sequence id"),
    ({"qpos": SEQ_LEN}, 400, f"qpos {SEQ_LEN} is past the sequence's end"),
    ({"kpos": 6}, 400, "kpos 6 is after qpos 5"),
    ({"layer": 0}, 400, "layer 0 was not scanned"),
])
async def test_attributions_refuse_bad_fields(api, fields, status, message):
    body = {"layer": 1, "head": 0, "seq": 3, "qpos": 5, "kpos": 2, **fields}
    got, reply = await api.post("qk_attributions", **body)
    assert got == status and message in reply["error"], reply


# -- routes and the OpenAPI description

async def test_unknown_routes_are_404_and_wrong_methods_405(client):
    for method, path, status in [("POST", "/api/nope", 404), ("GET", "/api/nope", 404), ("GET", "/nope", 404),
                                 ("GET", "/api/add_custom_sequence", 405), ("POST", "/data/config.json", 405),
                                 ("GET", "/data/", 404), ("GET", "/data/heads", 404), ("DELETE", "/", 405)]:
        response = await client.request(method, path)
        assert response.status == status, (method, path)
        assert "error" in await response.json()


async def test_openapi_describes_every_endpoint_with_valid_schemas(client):
    from jsonschema import Draft202012Validator

    response = await client.get("/api/openapi.json")
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    posts = sorted(p.removeprefix("/api/") for p, ops in document["paths"].items() if "post" in ops)
    assert posts == sorted(["add_custom_sequence", "delete_custom_sequence", "project_to_umap", "save_umap_clusters",
                            "qk_attributions", "ov_attributions"])
    for path, ops in document["paths"].items():
        for op in ops.values():
            if "requestBody" in op:
                Draft202012Validator.check_schema(op["requestBody"]["content"]["application/json"]["schema"])
            for response in op["responses"].values():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if "$ref" not in schema:
                    Draft202012Validator.check_schema(schema)


async def test_replies_match_their_openapi_schemas(api):
    from jsonschema import validate

    document = await (await api.client.get("/api/openapi.json")).json()

    def check(name: str, reply: dict) -> None:
        validate(reply, document["paths"][f"/api/{name}"]["post"]["responses"]["200"]["content"]["application/json"]["schema"])

    _, added = await api.post("add_custom_sequence", text="schema check")
    check("add_custom_sequence", added)
    check("project_to_umap", (await api.post("project_to_umap", text="schema check", layer=1, head=4))[1])
    check("save_umap_clusters", (await api.post("save_umap_clusters", layer=1, head=4, clusters=[CLUSTER]))[1])
    check("delete_custom_sequence", (await api.post("delete_custom_sequence", id=added["id"]))[1])
    status, error = await api.post("qk_attributions", layer=1, head=0, seq=0, qpos=1, kpos=0)
    validate(error, document["components"]["schemas"]["Error"])


# -- shared-file updates

async def test_changes_queued_behind_a_write_are_applied_together(tmp_path, monkeypatch):
    from headvis.server.store import JsonFiles

    writes = []
    real_write = store.write_json
    monkeypatch.setattr(store, "write_json", lambda path, body, **kw: (writes.append(body), real_write(path, body, **kw)))
    files = JsonFiles()
    path = tmp_path / "shared.json"

    def append(i: int):
        def change(body: dict):
            if i == 7:
                raise ValueError("change 7 fails alone")
            return {"n": body["n"] + [i]}, i
        return change

    results = await asyncio.gather(*(files.update(path, append(i), lambda: {"n": []}) for i in range(20)),
                                   return_exceptions=True)
    files.close()
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [i for i in range(20) if i != 7]
    assert sorted(read_json(path)["n"]) == [i for i in range(20) if i != 7]
    assert len(writes) < 20  # the first write alone, then the others that queued behind it together
