"""The endpoints of CONTRACT section 3: their effect on disk, their replies, and every way a body can be wrong."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest

from headvis.custom import CustomFolder
from headvis.io import read_json, write_json
from headvis.lock import LOCK_NAME
from headvis.schemas import validate_file, validate_tree
from headvis.server import limits, store
from headvis.server.app import create_app
from headvis.server.compute import Edge
from headvis.server.state import JOBS

from server_helpers import HEADS, LAYERS, NUM_SEQS, SEQ_LEN, Api, endpoint

pytestmark = pytest.mark.asyncio

# public names (CONTRACT sections 2 and 3), listed literally
HEAD_RECORD_KEYS = {"sequence_id", "interval", "max_activation", "tokens", "seq_len", "attention_indices",
                    "attention_values", "argmax", "token_ids"}
CUSTOM_RECORD_KEYS = HEAD_RECORD_KEYS | {"text", "created"}
INDEX_ENTRY_KEYS = {"sequence_id", "text", "tokens", "token_ids", "created", "truncated"}
POINT_KEYS = {"seq_idx", "top_q", "top_k", "norm", "pca", "umap_views", "tokens"}
CUSTOM_ID = re.compile(r"c[0-9a-f]{12}")
SCANNED = [(layer, head) for layer in LAYERS for head in HEADS]


async def _index_ids(api) -> list[str]:
    return [e["sequence_id"] for e in (await api.data_file("custom_sequences/index.json"))["sequences"]]


async def _head_ids(api, layer: int, head: int) -> list[str]:
    return [r["sequence_id"] for r in (await api.data_file(f"custom_sequences/L{layer}H{head}.json"))["sequences"]]


async def _no_custom_files(api, data) -> bool:
    """Nothing custom: the index and every head file list no sequence, as served and in the store."""
    served = [await api.data_file("custom_sequences/index.json")]
    served += [await api.data_file(f"custom_sequences/L{layer}H{head}.json") for layer, head in SCANNED]
    return all(body == {"sequences": []} for body in served) and not CustomFolder(data / "custom_sequences").folders()


def _leftovers(data) -> list[str]:
    """Dotfiles left in the tree (temp files, half-added sequences); the tree's lock file is meant to stay."""
    return sorted(p.name for p in data.rglob(".*") if p.name != LOCK_NAME)


def _umap(data, layer: int, head: int) -> dict:
    return read_json(data / "umap" / f"L{layer}H{head}.json")


def _cloud(umap: dict) -> list[tuple[int, int, int]]:
    return list(zip(umap["seq_idx"], umap["top_q"], umap["top_k"]))


def _new_edges(data, layer: int, head: int) -> list[tuple[int, int, int]]:
    """Edges (seq_idx, query_pos, key_pos) of sequences shown for the head that are not cloud points."""
    cloud = set(_cloud(_umap(data, layer, head)))
    shown = read_json(data / "heads" / f"L{layer}H{head}.json")["sequences"]
    return [(s["sequence_id"], q, q - 1) for s in shown for q in range(2, s["seq_len"])
            if (s["sequence_id"], q, q - 1) not in cloud]


def _edge_body(seq_idx, query_pos: int, key_pos: int) -> dict:
    return {"seq_idx": seq_idx, "query_pos": query_pos, "key_pos": key_pos}


# -- server_config.json

async def test_server_config_is_written_on_start_and_put_back_on_shutdown(aiohttp_client, config, lm, data):
    client = await aiohttp_client(create_app(config, lm))
    written = read_json(data / "server_config.json")
    assert set(written) == {"server_url", "context", "capabilities"}
    assert written["capabilities"] == {"attribution_layers": []}  # no dictionary: no attribution offered
    assert written["server_url"] == "http://127.0.0.1:8765"
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
    response = await second.post(endpoint("add_custom_sequence"),
                                 json={"context": old, "layer": 1, "head": 0, "text": "hi there"})
    assert response.status == 403


# -- add / delete

async def test_add_custom_sequence_writes_every_scanned_head_and_replies_with_the_requested_one(api, data):
    status, reply = await api.post("add_custom_sequence", layer=3, head=1, text="The cat sat on the mat. The cat")
    assert status == 200, reply
    assert set(reply) == CUSTOM_RECORD_KEYS
    assert CUSTOM_ID.fullmatch(reply["sequence_id"]) and reply["interval"] == -1
    assert reply["text"] == "The cat sat on the mat. The cat"
    assert reply["tokens"][1:3] == ["The", " cat"] and len(reply["tokens"]) == len(reply["token_ids"]) == reply["seq_len"]
    (entry,) = (await api.data_file("custom_sequences/index.json"))["sequences"]
    assert set(entry) == INDEX_ENTRY_KEYS and entry["truncated"] is False
    assert {k: entry[k] for k in ("sequence_id", "text", "tokens", "token_ids", "created")} == \
        {k: reply[k] for k in ("sequence_id", "text", "tokens", "token_ids", "created")}
    for layer, head in SCANNED:
        body = await api.data_file(f"custom_sequences/L{layer}H{head}.json")
        assert set(body) == {"sequences"}
        (record,) = body["sequences"]
        assert set(record) == CUSTOM_RECORD_KEYS
        assert set(read_json(data / "heads" / f"L{layer}H{head}.json")["sequences"][0]) == HEAD_RECORD_KEYS
        assert (record["sequence_id"], record["created"], record["token_ids"]) == \
            (reply["sequence_id"], reply["created"], reply["token_ids"])
        indices = np.asarray(record["attention_indices"])
        assert np.all(np.diff(indices) > 0) and indices.max() < record["seq_len"] ** 2
        if (layer, head) == (3, 1):
            assert record == reply
        else:
            assert record["attention_values"] != reply["attention_values"]  # another head's own pattern
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
    status, reply = await api.post("add_custom_sequence", layer=3, head=4, text=text)
    assert status == 200, reply
    for key in ("argmax", "tokens", "token_ids", "seq_len", "attention_indices"):
        assert reply[key] == scanned[key], key
    assert reply["max_activation"] == pytest.approx(scanned["max_activation"], rel=1e-5)
    np.testing.assert_allclose(reply["attention_values"], scanned["attention_values"], rtol=1e-5, atol=1e-6)


async def test_long_text_is_cut_to_the_token_limit(api, data, monkeypatch):
    monkeypatch.setattr(api.client.app[JOBS].worker, "max_tokens", 16)
    status, reply = await api.post("add_custom_sequence", layer=1, head=0, text="one two three four five six " * 10)
    assert status == 200 and reply["seq_len"] == len(reply["token_ids"]) == 16
    assert (await api.data_file("custom_sequences/index.json"))["sequences"][0]["truncated"] is True


async def test_delete_custom_sequence_removes_it_everywhere(api, data):
    _, first = await api.post("add_custom_sequence", layer=1, head=0, text="first text")
    _, second = await api.post("add_custom_sequence", layer=1, head=0, text="second text")
    assert first["sequence_id"] != second["sequence_id"]
    status, reply = await api.post("delete_custom_sequence", layer=3, head=4, sequence_id=first["sequence_id"])
    assert (status, reply) == (200, {"deleted": first["sequence_id"]})
    assert await _index_ids(api) == [second["sequence_id"]]
    for layer, head in SCANNED:
        assert await _head_ids(api, layer, head) == [second["sequence_id"]]
    status, reply = await api.post("delete_custom_sequence", layer=1, head=0, sequence_id=first["sequence_id"])
    assert status == 404 and set(reply) == {"detail"} and first["sequence_id"] in reply["detail"]
    validate_tree(data)


async def test_twelve_concurrent_adds_then_twelve_concurrent_deletes_lose_nothing(api, data):
    replies = await asyncio.gather(*(api.post("add_custom_sequence", layer=1, head=4,
                                              text=f"sequence number {i} says hello") for i in range(12)))
    assert all(status == 200 for status, _ in replies), replies
    ids = sorted(reply["sequence_id"] for _, reply in replies)
    assert len(set(ids)) == 12
    assert sorted(await _index_ids(api)) == ids
    for layer, head in SCANNED:
        assert sorted(await _head_ids(api, layer, head)) == ids
    texts = [e["text"] for e in (await api.data_file("custom_sequences/index.json"))["sequences"]]
    assert sorted(texts) == sorted(f"sequence number {i} says hello" for i in range(12))

    deletes = await asyncio.gather(*(api.post("delete_custom_sequence", layer=1, head=4, sequence_id=sid)
                                     for sid in ids))
    assert all(status == 200 for status, _ in deletes), deletes
    assert await _index_ids(api) == []
    for layer, head in SCANNED:
        assert await _head_ids(api, layer, head) == []
    assert _leftovers(data) == []


async def test_start_up_removes_records_of_an_interrupted_add(aiohttp_client, config, lm, data):
    orphan = {"sequences": [{"sequence_id": "c000000000000", "interval": -1}]}  # a killed 0.2.0 add
    write_json(data / "custom_sequences" / "L1H0.json", orphan)
    (data / "custom_sequences" / ".L1H0.json.abc123.tmp").write_text("half")
    (data / "umap" / ".L1H0.json.def456.tmp").write_text("half")
    api = Api(await aiohttp_client(create_app(config, lm)), data)
    assert read_json(data / "custom_sequences" / "L1H0.json")["sequences"] == []
    assert await _head_ids(api, 1, 0) == [] and await _index_ids(api) == []
    assert _leftovers(data) == []


async def test_start_up_removes_a_killed_add_and_a_killed_delete(aiohttp_client, config, lm, data):
    store_dir = data / "custom_sequences" / "store"
    for name in (".add-c0123456789ab-x1y2", ".del-c0123456789ac-77-123"):
        (store_dir / name).mkdir(parents=True)
        write_json(store_dir / name / "L1H0.json", {"sequence_id": name[5:18]})
    api = Api(await aiohttp_client(create_app(config, lm)), data)
    assert await _head_ids(api, 1, 0) == [] and await _index_ids(api) == []
    assert list(store_dir.iterdir()) == [] and _leftovers(data) == []


async def test_custom_sequences_are_capped(api, monkeypatch):
    monkeypatch.setattr(store, "MAX_CUSTOM_SEQUENCES", 1)
    assert (await api.post("add_custom_sequence", layer=1, head=0, text="the only one"))[0] == 200
    status, reply = await api.post("add_custom_sequence", layer=1, head=0, text="one too many")
    assert status == 409 and "delete some" in reply["detail"]


async def test_a_full_model_queue_answers_429(api, monkeypatch):
    from headvis.server import compute

    monkeypatch.setattr(compute, "MAX_PENDING_JOBS", 0)
    status, reply = await api.post("add_custom_sequence", layer=1, head=0, text="queued")
    assert status == 429 and "busy" in reply["detail"]


async def test_a_server_bug_is_a_500_without_a_trace(api, monkeypatch):
    def broken(text):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.client.app[JOBS].worker, "custom_records", broken)
    response = await api.client.post(endpoint("add_custom_sequence"),
                                     json={"context": api.context, "layer": 1, "head": 0, "text": "x y"})
    assert response.status == 500
    body = await response.text()
    assert json.loads(body) == {"detail": "internal error (the server log has the details)"}
    assert "Traceback" not in body and "secret" not in body


# -- bad bodies

def _body_cases():
    ok = {"layer": 1, "head": 0, "text": "hello world"}
    return {
        "not JSON": (b"{not json", 400, "not valid JSON"),
        "not UTF-8": (b'{"text": "\xff\xfe"}', 400, "not UTF-8"),
        "a JSON array": (b"[1, 2]", 400, "JSON object"),
        "NaN": (b'{"context": CTX, "layer": 1, "head": 0, "text": NaN}', 400, "NaN is not valid JSON"),
        "deep nesting": (b'{"context": CTX, "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested"),
        "missing text": ({"layer": 1, "head": 0}, 400, "missing field 'text'"),
        "missing layer": ({"head": 0, "text": "hello"}, 400, "missing field 'layer'"),
        "text not a string": ({**ok, "text": 5}, 400, "text must be a string"),
        "empty text": ({**ok, "text": ""}, 400, "text must not be empty"),
        "unknown field": ({**ok, "path": "/etc/passwd"}, 400, "unknown field 'path'"),
        "format 1 body": ({"text": "hello", "id": "c-0123456789ab"}, 400, "missing field 'layer'"),
        "lone surrogate": ({**ok, "text": "\ud800"}, 400, "surrogate"),
        "head not scanned": ({**ok, "head": 2}, 400, "layer 1 head 2 was not scanned (scanned heads: L1H0, L1H1"),
        "text over the byte limit": ({**ok, "text": "é" * (limits.MAX_TEXT_BYTES // 2 + 1)}, 413, "UTF-8 bytes"),
    }


@pytest.mark.parametrize("case", list(_body_cases()))
async def test_bad_add_bodies_are_refused_with_a_message(api, data, case):
    body, status, message = _body_cases()[case]
    if isinstance(body, dict):
        raw = json.dumps({"context": api.context, **body}).encode()
    else:
        raw = body.replace(b"CTX", json.dumps(api.context).encode())
    response = await api.client.post(endpoint("add_custom_sequence"), data=raw,
                                     headers={"Content-Type": "application/json"})
    reply = await response.json()
    assert response.status == status and message in reply["detail"], reply
    assert set(reply) == {"detail"}
    assert await _no_custom_files(api, data)


async def test_a_body_over_the_request_limit_is_413(api):
    raw = json.dumps({"context": api.context, "layer": 1, "head": 0, "text": "a" * limits.MAX_BODY_BYTES}).encode()
    response = await api.client.post(endpoint("add_custom_sequence"), data=raw,
                                     headers={"Content-Type": "application/json"})
    assert response.status == 413 and set(await response.json()) == {"detail"}


async def test_a_body_that_is_not_json_typed_is_415(api):
    response = await api.client.post(endpoint("add_custom_sequence"),
                                     data=json.dumps({"context": api.context, "layer": 1, "head": 0, "text": "x"}),
                                     headers={"Content-Type": "text/plain"})
    assert response.status == 415 and "application/json" in (await response.json())["detail"]


@pytest.mark.parametrize("context", [None, {}, "default", {"setup": "default"}, {"setup": "default", "token": "guess"},
                                     {"setup": "other", "token": "TOKEN"}, {"setup": "default", "token": "TOKEN", "x": 1},
                                     {"setup": "default", "token": 5}])
async def test_a_context_the_server_did_not_issue_is_403(api, data, context):
    if isinstance(context, dict) and context.get("token") == "TOKEN":
        context = {**context, "token": api.context["token"]}
    body = {"layer": 1, "head": 0, "text": "hello"}
    if context is not None:
        body["context"] = context
    response = await api.client.post(endpoint("add_custom_sequence"), json=body)
    assert response.status == 403 and "context" in (await response.json())["detail"]
    assert await _no_custom_files(api, data)


@pytest.mark.parametrize("name", ["add_custom_sequence", "delete_custom_sequence", "save_umap_clusters",
                                  "project_to_umap", "qk_attributions", "ov_attributions"])
@pytest.mark.parametrize("fields, message", [
    ({"layer": 2, "head": 0}, "layer 2 head 0 was not scanned (scanned heads: L1H0, L1H1, L1H4, L3H0, L3H1, L3H4)"),
    ({"layer": 1, "head": 2}, "layer 1 head 2 was not scanned"),
    ({"layer": -1, "head": 0}, "layer must be at least 0"),
    ({"layer": 10**30, "head": 0}, "was not scanned"),
    ({"layer": 10**1000, "head": 0}, "layer 10000000000000000... head 0 was not scanned"),
    ({"layer": 1.0, "head": 0}, "layer must be an integer"),
    ({"layer": True, "head": 0}, "layer must be an integer"),
    ({"layer": "1", "head": 0}, "layer must be an integer"),
    ({"layer": 1}, "missing field 'head'"),
])
async def test_every_endpoint_refuses_heads_that_were_not_scanned(api, name, fields, message):
    rest = {"add_custom_sequence": {"text": "hello world"},
            "delete_custom_sequence": {"sequence_id": "c0123456789ab"},
            "save_umap_clusters": {"clusters": []}}.get(name, _edge_body(0, 2, 1))
    status, reply = await api.post(name, **rest, **fields)
    assert status == 400 and message in reply["detail"], reply
    assert len(reply["detail"]) < 200


@pytest.mark.parametrize("sequence_id, status", [("c0123456789ab", 404), ("c-0123456789ab", 400), ("cXYZ", 400),
                                                 ("../../config", 400), (7, 400), ("c0123456789abc", 400)])
async def test_delete_refuses_unknown_and_malformed_ids(api, data, sequence_id, status):
    got, reply = await api.post("delete_custom_sequence", layer=1, head=0, sequence_id=sequence_id)
    assert got == status and set(reply) == {"detail"}
    assert (data / "config.json").exists()


# -- project_to_umap

async def test_project_to_umap_answers_its_three_shapes_in_turn(api, data):
    before = _umap(data, 3, 4)
    cloud = _cloud(before)
    i = len(cloud) // 2
    status, reply = await api.post("project_to_umap", layer=3, head=4, **_edge_body(*cloud[i]))
    assert (status, reply) == (200, {"found_in_cloud": True, "existing_index": i})

    edge = _new_edges(data, 3, 4)[0]
    status, reply = await api.post("project_to_umap", layer=3, head=4, **_edge_body(*edge))
    assert status == 200, reply
    assert set(reply) == {"found_in_cloud", "found_in_projected", "point"}
    assert (reply["found_in_cloud"], reply["found_in_projected"]) == (False, False)
    point = reply["point"]
    assert set(point) == POINT_KEYS
    assert (point["seq_idx"], point["top_q"], point["top_k"]) == edge
    assert set(point["pca"]) == {"Q", "K", "V", "O"} and point["umap_views"] == []  # the fixture scan is PCA only
    assert all(set(xyz) == {"d0", "d1", "d2"} and all(np.isfinite(list(xyz.values()))) for xyz in point["pca"].values())
    shown = {s["sequence_id"]: s for s in read_json(data / "heads" / "L3H4.json")["sequences"]}
    assert point["tokens"] == shown[edge[0]]["tokens"] and point["norm"] > 0
    after = _umap(data, 3, 4)
    assert after["projected_points"] == [point]
    assert {k: v for k, v in after.items() if k != "projected_points"} == \
        {k: v for k, v in before.items() if k != "projected_points"}
    validate_file(data / "umap" / "L3H4.json", "umap_head.schema.json")

    status, reply = await api.post("project_to_umap", layer=3, head=4, **_edge_body(*edge))
    assert (status, reply) == (200, {"found_in_cloud": False, "found_in_projected": True, "projected_index": 0})
    assert _umap(data, 3, 4)["projected_points"] == [point]
    assert _leftovers(data) == []


async def test_a_cloud_edge_recomputed_lands_on_its_saved_pca_coordinates(api, data):
    """The server's vectors are the scan's: a cloud point projected afresh is where the scan put it."""
    umap = _umap(data, 1, 4)
    shown = {s["sequence_id"]: s for s in read_json(data / "heads" / "L1H4.json")["sequences"]}
    for i in (0, len(umap["seq_idx"]) - 1):
        seq_idx, query_pos, key_pos = _cloud(umap)[i]
        edge = Edge(seq_idx, shown[seq_idx]["token_ids"], shown[seq_idx]["tokens"], query_pos, key_pos)
        point = await api.client.app[JOBS].run(lambda w: w.project(1, 4, edge))
        for name in ("Q", "K", "V", "O"):
            scale = max(np.ptp(umap["pca"][name][d]) for d in ("d0", "d1", "d2"))
            for d in ("d0", "d1", "d2"):
                assert point["pca"][name][d] == pytest.approx(umap["pca"][name][d][i], abs=1e-3 * scale), (i, name, d)
        assert point["norm"] == pytest.approx(umap["norms"][i], rel=1e-4)


async def test_project_to_umap_projects_an_edge_of_a_custom_sequence(api, data):
    _, added = await api.post("add_custom_sequence", layer=1, head=0, text="def f(x): return x + 1")
    status, reply = await api.post("project_to_umap", layer=1, head=0, **_edge_body(added["sequence_id"], 4, 2))
    assert status == 200 and reply["found_in_projected"] is False, reply
    assert reply["point"]["seq_idx"] == added["sequence_id"] and reply["point"]["tokens"] == added["tokens"]
    assert _umap(data, 1, 0)["projected_points"] == [reply["point"]]
    validate_tree(data)


async def test_deleting_a_custom_sequence_removes_its_projected_and_clustered_points(api, data):
    """CONTRACT: delete removes it everywhere, the umap files' projected points and cluster points included."""
    _, added = await api.post("add_custom_sequence", layer=1, head=0, text="def f(x): return x + 1")
    sid = added["sequence_id"]
    status, reply = await api.post("project_to_umap", layer=1, head=0, **_edge_body(sid, 4, 2))
    assert status == 200, reply
    cluster = _cluster(data, 1, 0)
    kept = [list(p) for p in cluster["points"]]
    cluster["points"] = kept + [[sid, 4, 2]]
    status, reply = await api.post("save_umap_clusters", layer=1, head=0, clusters=[cluster])
    assert (status, reply) == (200, {"saved": 1})
    status, _ = await api.post("delete_custom_sequence", layer=1, head=0, sequence_id=sid)
    assert status == 200
    umap = _umap(data, 1, 0)
    assert umap["projected_points"] == [] and umap["clusters"] == [{**cluster, "points": kept}]
    status, reply = await api.post("project_to_umap", layer=1, head=0, **_edge_body(sid, 4, 2))
    assert status == 404 and sid in reply["detail"]
    validate_tree(data)


def _with_views(data, layer: int, head: int) -> dict:
    """Give a head a synthetic UMAP view (a nonlinear map of its PCA coordinates), as --umap would."""
    path = data / "umap" / f"L{layer}H{head}.json"
    body = read_json(path)
    embeddings = {}
    for name, part in body["pca"].items():
        x, y, z = (np.asarray(part[d]) for d in ("d0", "d1", "d2"))
        embeddings[name] = {"d0": (np.tanh(x) + y**2).tolist(), "d1": (x * y).tolist(), "d2": (z - x).tolist()}
    body["views"] = [{"n_neighbors": 15, "min_dist": 0.1, "embeddings": embeddings}]
    write_json(path, body)
    return read_json(path)


async def test_a_new_point_gets_one_umap_view_per_view_by_interpolation(api, data):
    _with_views(data, 1, 0)
    edge = _new_edges(data, 1, 0)[0]
    status, reply = await api.post("project_to_umap", layer=1, head=0, **_edge_body(*edge))
    assert status == 200, reply
    (view,) = reply["point"]["umap_views"]
    assert set(view) == {"Q", "K", "V", "O"}
    assert all(set(xyz) == {"d0", "d1", "d2"} and all(np.isfinite(list(xyz.values()))) for xyz in view.values())
    assert (1, 0) in api.client.app[JOBS].worker._clouds  # cached for the next request
    validate_file(data / "umap" / "L1H0.json", "umap_head.schema.json")


async def test_a_cloud_edge_interpolates_onto_its_own_view_coordinates(api, data):
    umap = _with_views(data, 3, 0)
    shown = {s["sequence_id"]: s for s in read_json(data / "heads" / "L3H0.json")["sequences"]}
    cloud = _cloud(umap)
    # an edge whose key is no other point's key: then none of its four vectors is another point's too
    i = next(i for i, (s, _, k) in enumerate(cloud) if sum((t, c) == (s, k) for t, _, c in cloud) == 1)
    seq_idx, query_pos, key_pos = cloud[i]
    edge = Edge(seq_idx, shown[seq_idx]["token_ids"], shown[seq_idx]["tokens"], query_pos, key_pos)
    point = await api.client.app[JOBS].run(lambda w: w.project(3, 0, edge))
    for name in ("Q", "K", "V", "O"):
        for d in ("d0", "d1", "d2"):
            column = umap["views"][0]["embeddings"][name][d]
            assert point["umap_views"][0][name][d] == pytest.approx(column[i], abs=1e-3 * np.ptp(column) + 1e-9)


async def test_views_refuse_a_model_that_does_not_reproduce_the_scan(api, data):
    umap = _with_views(data, 1, 1)
    umap["pca"]["Q"]["d0"] = [x + 50.0 for x in umap["pca"]["Q"]["d0"]]
    write_json(data / "umap" / "L1H1.json", umap)
    status, reply = await api.post("project_to_umap", layer=1, head=1, **_edge_body(*_new_edges(data, 1, 1)[0]))
    assert status == 409 and "does not reproduce" in reply["detail"]
    assert _umap(data, 1, 1)["projected_points"] == []


async def test_projected_points_are_capped(api, data, monkeypatch):
    monkeypatch.setattr(store, "MAX_PROJECTED_POINTS", 1)
    first, second = _new_edges(data, 3, 1)[:2]
    assert (await api.post("project_to_umap", layer=3, head=1, **_edge_body(*first)))[0] == 200
    status, reply = await api.post("project_to_umap", layer=3, head=1, **_edge_body(*second))
    assert status == 409 and "already has 1 projected points" in reply["detail"]
    status, reply = await api.post("project_to_umap", layer=3, head=1, **_edge_body(*first))
    assert (status, reply["projected_index"]) == (200, 0)  # a known point is still found


async def test_concurrent_projections_of_one_edge_append_it_once(api, data):
    edge = _new_edges(data, 1, 4)[0]
    replies = await asyncio.gather(*(api.post("project_to_umap", layer=1, head=4, **_edge_body(*edge))
                                     for _ in range(4)))
    assert all(status == 200 for status, _ in replies), replies
    assert len(_umap(data, 1, 4)["projected_points"]) == 1
    assert sum("point" in reply for _, reply in replies) >= 1
    assert all(reply.get("projected_index", 0) == 0 for _, reply in replies)


async def test_an_empty_cloud_has_nothing_to_project_onto(api, data):
    umap = _umap(data, 3, 1)
    empty = {"d0": [], "d1": [], "d2": []}
    write_json(data / "umap" / "L3H1.json", {**umap, "seq_idx": [], "top_q": [], "top_k": [], "norms": [],
                                             "pca": {name: empty for name in "QKVO"}})
    write_json(data / "umap" / "L3H1.rotation.json", {"layer": 3, "head": 1, "points": 0})
    status, reply = await api.post("project_to_umap", layer=3, head=1, **_edge_body(*_new_edges(data, 3, 1)[0]))
    assert status == 409 and "empty projection cloud" in reply["detail"]


def _first_shown(data, layer: int, head: int) -> int:
    return read_json(data / "heads" / f"L{layer}H{head}.json")["sequences"][0]["sequence_id"]


def _not_shown(data, layer: int, head: int) -> int:
    shown = {s["sequence_id"] for s in read_json(data / "heads" / f"L{layer}H{head}.json")["sequences"]}
    return min(set(range(NUM_SEQS)) - shown)


@pytest.mark.parametrize("name", ["project_to_umap", "qk_attributions", "ov_attributions"])
@pytest.mark.parametrize("fields, status, message", [
    ({"seq_idx": "NOT_SHOWN"}, 404, "is not shown for L1H0"),
    ({"seq_idx": NUM_SEQS}, 404, f"sequence {NUM_SEQS} is not shown"),
    ({"seq_idx": "c0123456789ab"}, 404, "no custom sequence 'c0123456789ab'"),
    ({"seq_idx": "12"}, 400, "seq_idx must be a scanned sequence id"),
    ({"seq_idx": True}, 400, "seq_idx must be a scanned sequence id"),
    ({"seq_idx": -1}, 400, "seq_idx must be a scanned sequence id"),
    ({"query_pos": SEQ_LEN}, 400, f"query_pos {SEQ_LEN} is past the sequence's end ({SEQ_LEN} tokens)"),
    ({"key_pos": SEQ_LEN, "query_pos": 3}, 400, f"key_pos {SEQ_LEN} is past the sequence's end"),
    ({"key_pos": 6}, 400, "key_pos 6 is after query_pos 5: a causal head cannot attend there"),
    ({"query_pos": -1}, 400, "query_pos must be at least 0"),
    ({"query_pos": 2.0}, 400, "query_pos must be an integer"),
    ({"seq": 3}, 400, "unknown field 'seq'"),
])
async def test_edges_are_checked_against_the_tree(api, data, name, fields, status, message):
    fields = {k: (_not_shown(data, 1, 0) if v == "NOT_SHOWN" else v) for k, v in fields.items()}
    body = {"layer": 1, "head": 0, **_edge_body(_first_shown(data, 1, 0), 5, 2), **fields}
    got, reply = await api.post(name, **body)
    assert got == status and message in reply["detail"], reply
    assert _umap(data, 1, 0)["projected_points"] == []


async def test_position_0_may_be_projected(api, data):
    seq_idx = _first_shown(data, 1, 0)
    status, reply = await api.post("project_to_umap", layer=1, head=0, **_edge_body(seq_idx, 0, 0))
    assert status == 200 and reply["point"]["top_q"] == 0 and reply["point"]["top_k"] == 0


# -- save_umap_clusters

def _cluster(data, layer: int, head: int, name: str = "digits", points: slice = slice(0, 3)) -> dict:
    return {"name": name, "color": "#ff0000", "points": [list(p) for p in _cloud(_umap(data, layer, head))[points]]}


async def test_save_umap_clusters_replaces_the_clusters_of_the_umap_file(api, data):
    before = _umap(data, 3, 0)
    clusters = [_cluster(data, 3, 0), {**_cluster(data, 3, 0, "b", slice(5, 6)), "color": "#0Af"}]
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=clusters)
    assert (status, reply) == (200, {"saved": 2})
    after = _umap(data, 3, 0)
    assert after["clusters"] == clusters
    assert all(len(p) == 3 for c in after["clusters"] for p in c["points"])
    assert {k: v for k, v in after.items() if k != "clusters"} == {k: v for k, v in before.items() if k != "clusters"}
    validate_file(data / "umap" / "L3H0.json", "umap_head.schema.json")
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[])
    assert (status, reply) == (200, {"saved": 0}) and _umap(data, 3, 0)["clusters"] == []
    assert not (data / "umap" / "clusters").exists() and _leftovers(data) == []


async def test_a_cluster_point_that_is_not_in_the_cloud_is_400(api, data):
    cluster = _cluster(data, 3, 0)
    seq_idx, query_pos, key_pos = cluster["points"][1]
    cluster["points"][1] = [seq_idx, query_pos, key_pos + 100]
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[cluster])
    assert status == 400, reply
    assert reply["detail"] == (f"clusters.0.points.1: [{seq_idx}, {query_pos}, {key_pos + 100}] is not a point "
                               "of L3H0's cloud nor a projected point (umap/L3H0.json)")
    assert _umap(data, 3, 0)["clusters"] == []


async def test_a_cluster_may_hold_projected_points(api, data):
    """The reference frontend draws projected points in the cloud, so a lasso can select them: they are kept."""
    edge = _new_edges(data, 3, 0)[0]
    status, reply = await api.post("project_to_umap", layer=3, head=0, **_edge_body(*edge))
    assert status == 200 and reply["found_in_projected"] is False, reply
    cluster = _cluster(data, 3, 0)
    cluster["points"].append(list(edge))
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[cluster])
    assert (status, reply) == (200, {"saved": 1})
    assert _umap(data, 3, 0)["clusters"] == [cluster]
    validate_file(data / "umap" / "L3H0.json", "umap_head.schema.json")


@pytest.mark.parametrize("change, message", [
    ({"points": [[0, 1]]}, "clusters.0.points.0 must have at least 3 items"),
    ({"points": [[0, 1, 2, 3]]}, "clusters.0.points.0 must have at most 3 items"),
    ({"points": [[0, -1, 2]]}, "clusters.0.points.0.1 must be at least 0"),
    ({"points": [[0, 1.5, 2]]}, "clusters.0.points.0.1 must be an integer"),
    ({"points": [5]}, "clusters.0.points.0 must be an array"),
    ({"points": [[0, 2, 1], [0, 2, 1]]}, "clusters.0.points lists an item more than once"),
    ({"color": "red"}, "clusters.0.color must match"),
    ({"color": "#ff00001"}, "clusters.0.color must match"),
    ({"name": ""}, "clusters.0.name must not be empty"),
    ({"name": "n" * 101}, "clusters.0.name must have at most 100 characters"),
    ({"extra": 1}, "clusters.0: unknown field 'extra'"),
    ({"vector": "Q"}, "clusters.0: unknown field 'vector'"),
])
async def test_save_umap_clusters_validates_every_cluster(api, data, change, message):
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=[{**_cluster(data, 3, 0), **change}])
    assert status == 400 and message in reply["detail"], reply
    assert _umap(data, 3, 0)["clusters"] == []


async def test_save_umap_clusters_caps_the_number_of_clusters(api, data):
    clusters = [_cluster(data, 3, 0)] * (limits.MAX_CLUSTERS + 1)
    status, reply = await api.post("save_umap_clusters", layer=3, head=0, clusters=clusters)
    assert status == 400 and f"at most {limits.MAX_CLUSTERS} items" in reply["detail"]


async def test_clusters_and_projections_of_one_head_do_not_lose_each_other(api, data):
    edges = _new_edges(data, 3, 4)[:3]
    cluster = _cluster(data, 3, 4)
    replies = await asyncio.gather(
        *(api.post("project_to_umap", layer=3, head=4, **_edge_body(*edge)) for edge in edges),
        api.post("save_umap_clusters", layer=3, head=4, clusters=[cluster]))
    assert all(status == 200 for status, _ in replies), replies
    umap = _umap(data, 3, 4)
    assert umap["clusters"] == [cluster]
    assert sorted((p["seq_idx"], p["top_q"], p["top_k"]) for p in umap["projected_points"]) == sorted(edges)


# -- routes and the OpenAPI description

ROUTES = ["/api/head_vis/public/add_custom_sequence/v0", "/api/head_vis/public/delete_custom_sequence/v0",
          "/api/head_vis/public/save_umap_clusters/v0", "/api/head_vis/public/project_to_umap/v0",
          "/api/head_vis/public/qk_attributions/v0", "/api/head_vis/public/ov_attributions/v0"]


async def test_the_routes_are_the_reference_frontends(client):
    assert [endpoint(name) for name in ("add_custom_sequence", "delete_custom_sequence", "save_umap_clusters",
                                        "project_to_umap", "qk_attributions", "ov_attributions")] == ROUTES
    for route in ROUTES:
        response = await client.post(route, json={})
        assert response.status == 403  # routed, then refused for want of a context


async def test_unknown_routes_are_404_and_wrong_methods_405(client):
    for method, path, status in [("POST", "/api/nope", 404), ("GET", "/api/nope", 404), ("GET", "/nope", 404),
                                 ("GET", ROUTES[0], 405), ("PUT", ROUTES[3], 405),
                                 ("POST", "/api/head_vis/public/add_custom_sequence/v1", 404),
                                 ("POST", "/api/head_vis/public/nope/v0", 404),
                                 ("POST", "/data/config.json", 405), ("GET", "/data/", 404),
                                 ("GET", "/data/heads", 404), ("DELETE", "/", 405)]:
        response = await client.request(method, path)
        assert response.status == status, (method, path)
        assert set(await response.json()) == {"detail"}
    response = await client.post("/api/add_custom_sequence", json={})  # the format 1 route
    assert response.status == 404
    assert ROUTES[0] in (await response.json())["detail"]


async def test_openapi_describes_every_endpoint_with_valid_schemas(client):
    from jsonschema import Draft202012Validator

    response = await client.get("/api/openapi.json")
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert sorted(p for p, ops in document["paths"].items() if "post" in ops) == sorted(ROUTES)
    assert document["components"]["schemas"]["Error"]["required"] == ["detail"]
    for path, ops in document["paths"].items():
        for op in ops.values():
            if "requestBody" in op:
                Draft202012Validator.check_schema(op["requestBody"]["content"]["application/json"]["schema"])
            for response in op["responses"].values():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if "$ref" not in schema:
                    Draft202012Validator.check_schema(schema)


async def test_replies_match_their_openapi_schemas(api, data):
    from jsonschema import validate

    document = await (await api.client.get("/api/openapi.json")).json()

    def check(name: str, reply: dict) -> None:
        validate(reply, document["paths"][endpoint(name)]["post"]["responses"]["200"]["content"]["application/json"]["schema"])

    _, added = await api.post("add_custom_sequence", layer=1, head=4, text="schema check")
    check("add_custom_sequence", added)
    cloud = _cloud(_umap(data, 1, 4))
    edge = _new_edges(data, 1, 4)[0]
    for body in (_edge_body(*cloud[0]), _edge_body(*edge), _edge_body(*edge)):
        check("project_to_umap", (await api.post("project_to_umap", layer=1, head=4, **body))[1])
    check("save_umap_clusters", (await api.post("save_umap_clusters", layer=1, head=4,
                                                clusters=[_cluster(data, 1, 4)]))[1])
    check("delete_custom_sequence", (await api.post("delete_custom_sequence", layer=1, head=4,
                                                    sequence_id=added["sequence_id"]))[1])
    _, error = await api.post("qk_attributions", layer=1, head=0, **_edge_body(0, 1, 0))
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
