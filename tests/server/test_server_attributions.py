"""The attribution endpoints with dictionaries: files, manifest, cache, OV targets, refusals at start-up."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import pytest_asyncio
from jsonschema import validate

from headvis.errors import HeadvisError
from headvis.io import read_json, write_json
from headvis.schemas import load_schema, validate_tree
from headvis.server import limits
from headvis.server.app import create_app
from headvis.server.attributions import ATTRIBUTIONS_UNAVAILABLE, ServedDictionaries, read_dictionaries
from headvis.server.state import JOBS
from headvis.server.tree import open_data_tree

from server_helpers import Api, endpoint, random_dictionary

pytestmark = pytest.mark.asyncio

# public names (CONTRACT section 2 and the schema), listed literally
FILE_KEYS = {"pairs", "query_marginals", "key_marginals", "kind", "layer", "head", "seq_idx", "query_pos", "key_pos",
             "score", "attention", "dictionary", "terms", "total", "feature_libraries"}
PAIR_KEYS = {"query_feature", "key_feature", "attribution", "query_description", "key_description",
             "query_snippets", "key_snippets", "query_activation", "key_activation"}
MARGINAL_KEYS = {"feature", "description", "snippets", "marginal_score", "top_interactions"}


def _first_shown(data, layer: int, head: int) -> int:
    return read_json(data / "heads" / f"L{layer}H{head}.json")["sequences"][0]["sequence_id"]


def _edge(seq_idx, query_pos: int, key_pos: int) -> dict:
    return {"seq_idx": seq_idx, "query_pos": query_pos, "key_pos": key_pos}


def _file(data, kind: str, layer: int, head: int, seq_idx, query_pos: int, key_pos: int):
    return data / "attributions" / kind / f"L{layer}H{head}S{seq_idx}Q{query_pos}K{key_pos}.json"


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-3)


async def _started(aiohttp_client, config, lm, data) -> Api:
    return Api(await aiohttp_client(create_app(config, lm)), data)


@pytest_asyncio.fixture
async def attr_api(aiohttp_client, config, lm, data, dictionaries) -> Api:
    """A server with layer 1's input dictionary only: OV onto the head's output direction."""
    return await _started(aiohttp_client, dataclasses.replace(config, dictionaries=(dictionaries["L1"],)), lm, data)


@pytest_asyncio.fixture
async def both_api(aiohttp_client, config, lm, data, dictionaries) -> Api:
    """A server with layer 1's input and output dictionaries: OV onto the output dictionary's features."""
    paths = (dictionaries["L1"], dictionaries["L1out"])
    return await _started(aiohttp_client, dataclasses.replace(config, dictionaries=paths), lm, data)


def _count_jobs(api: Api, monkeypatch) -> list:
    """Record every attribution the model thread computes."""
    worker = api.client.app[JOBS].worker
    calls = []
    real = worker.attribution

    def counted(*args, **kwargs):
        calls.append(args[:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, "attribution", counted)
    return calls


async def test_qk_is_computed_written_listed_then_served_from_the_file(attr_api, data, monkeypatch):
    calls = _count_jobs(attr_api, monkeypatch)
    seq_idx = _first_shown(data, 1, 0)
    status, reply = await attr_api.post("qk_attributions", layer=1, head=0, **_edge(seq_idx, 9, 4))
    assert status == 200, reply
    validate(reply, load_schema("attribution_file.schema.json"))
    assert FILE_KEYS <= set(reply) and "target" not in reply
    assert (reply["kind"], reply["layer"], reply["head"], reply["seq_idx"], reply["query_pos"], reply["key_pos"]) == \
        ("qk", 1, 0, seq_idx, 9, 4)
    assert reply["dictionary"] == {"name": "L1", "hook": "blocks.1.hook_resid_pre", "d_sae": 256}
    assert _close(reply["total"], reply["score"]), (reply["total"], reply["score"])
    assert reply["pairs"] and all(set(p) == PAIR_KEYS for p in reply["pairs"])
    assert all(set(m) == MARGINAL_KEYS for m in reply["query_marginals"] + reply["key_marginals"])
    assert reply["pairs"][0]["query_description"] == f"feature {reply['pairs'][0]['query_feature']}"
    assert reply["feature_libraries"] == {"L1": None} and "python -m headvis.features" in reply["note"]
    assert 0 < reply["attention"] <= 1
    path = _file(data, "qk", 1, 0, seq_idx, 9, 4)
    assert read_json(path) == reply
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H0S{seq_idx}": {"qk": [[9, 4]], "ov": []}}
    validate_tree(data)
    assert len(calls) == 1

    response = await attr_api.client.post(endpoint("qk_attributions"),
                                          json={"context": attr_api.context, "layer": 1, "head": 0,
                                                **_edge(seq_idx, 9, 4)})
    assert response.status == 200 and response.content_type == "application/json"
    assert await response.read() == path.read_bytes()  # the file as it is
    assert len(calls) == 1  # no model job
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H0S{seq_idx}": {"qk": [[9, 4]], "ov": []}}


async def test_a_file_made_with_another_dictionary_is_computed_again(attr_api, data, monkeypatch):
    seq_idx = _first_shown(data, 1, 1)
    status, first = await attr_api.post("qk_attributions", layer=1, head=1, **_edge(seq_idx, 7, 7))
    assert status == 200, first
    path = _file(data, "qk", 1, 1, seq_idx, 7, 7)
    write_json(path, {**first, "dictionary": {**first["dictionary"], "d_sae": 512}, "pairs": []})
    calls = _count_jobs(attr_api, monkeypatch)
    status, again = await attr_api.post("qk_attributions", layer=1, head=1, **_edge(seq_idx, 7, 7))
    assert status == 200 and len(calls) == 1
    assert again == first and read_json(path) == first
    assert read_json(data / "attributions" / "manifest.json")[f"L1H1S{seq_idx}"] == {"qk": [[7, 7]], "ov": []}
    write_json(path, {"not": "an attribution"})  # unreadable as one: recomputed too
    status, again = await attr_api.post("qk_attributions", layer=1, head=1, **_edge(seq_idx, 7, 7))
    assert status == 200 and again == first and len(calls) == 2


async def test_ov_without_a_target_dictionary_projects_onto_the_heads_output_direction(attr_api, data):
    seq_idx = _first_shown(data, 1, 4)
    status, reply = await attr_api.post("ov_attributions", layer=1, head=4, **_edge(seq_idx, 12, 3))
    assert status == 200, reply
    validate(reply, load_schema("attribution_file.schema.json"))
    assert reply["kind"] == "ov" and reply["target"]["kind"] == "head_output_direction"
    assert _close(reply["total"], reply["score"]), (reply["total"], reply["score"])
    assert all(p["query_feature"] is None for p in reply["pairs"])
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H4S{seq_idx}": {"qk": [], "ov": [[12, 3]]}}
    status, qk = await attr_api.post("qk_attributions", layer=1, head=4, **_edge(seq_idx, 12, 3))
    assert status == 200 and qk["kind"] == "qk"
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H4S{seq_idx}": {"qk": [[12, 3]], "ov": [[12, 3]]}}
    validate_tree(data)


async def test_server_config_names_the_layers_with_attributions(both_api, data):
    """Layer 1's input dictionary is served (L1out only adds OV's target): attributions of layer 1 only."""
    assert read_json(data / "server_config.json")["capabilities"] == {"attribution_layers": [1]}


async def test_ov_with_a_target_dictionary_lists_its_features(both_api, data):
    seq_idx = _first_shown(data, 1, 0)
    status, reply = await both_api.post("ov_attributions", layer=1, head=0, **_edge(seq_idx, 10, 2))
    assert status == 200, reply
    validate(reply, load_schema("attribution_file.schema.json"))
    target = reply["target"]
    assert (target["kind"], target["name"], target["hook"]) == ("dictionary", "L1out", "blocks.1.hook_resid_post")
    assert target["features"] and len(target["features"]) == len(target["values"])
    assert _close(reply["total"], reply["score"]), (reply["total"], reply["score"])
    assert {p["query_feature"] for p in reply["pairs"]} <= set(target["features"])
    assert reply["feature_libraries"] == {"L1": None, "L1out": None}
    assert "L1out" in reply["note"]
    validate_tree(data)


async def test_changing_the_target_dictionary_recomputes_the_ov_file(aiohttp_client, config, lm, data, dictionaries):
    seq_idx = _first_shown(data, 1, 0)
    api = await _started(aiohttp_client, dataclasses.replace(config, dictionaries=(dictionaries["L1"],)), lm, data)
    _, before = await api.post("ov_attributions", layer=1, head=0, **_edge(seq_idx, 10, 2))
    await api.client.close()
    paths = (dictionaries["L1"], dictionaries["L1out"])
    api = await _started(aiohttp_client, dataclasses.replace(config, dictionaries=paths), lm, data)
    _, after = await api.post("ov_attributions", layer=1, head=0, **_edge(seq_idx, 10, 2))
    assert before["target"]["kind"] == "head_output_direction" and after["target"]["kind"] == "dictionary"
    assert read_json(_file(data, "ov", 1, 0, seq_idx, 10, 2)) == after
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H0S{seq_idx}": {"qk": [], "ov": [[10, 2]]}}


async def test_a_layer_without_a_dictionary_is_404_saying_how_to_get_one(attr_api, data):
    status, reply = await attr_api.post("qk_attributions", layer=3, head=0, **_edge(_first_shown(data, 3, 0), 5, 2))
    assert status == 404
    assert "layer 3" in reply["detail"] and "blocks.3.hook_resid_pre" in reply["detail"]
    assert "python -m headvis.train_dictionary --layer 3 --hook resid_pre --out DIR" in reply["detail"]
    assert "--dictionary DIR" in reply["detail"] and "layers 1" in reply["detail"]
    assert read_json(data / "attributions" / "manifest.json") == {}


@pytest.mark.parametrize("name", ["qk_attributions", "ov_attributions"])
async def test_without_any_dictionary_attributions_are_501_after_validating_the_body(api, data, name):
    status, reply = await api.post(name, layer=1, head=0, **_edge(_first_shown(data, 1, 0), 5, 2))
    assert (status, reply) == (501, {"detail": ATTRIBUTIONS_UNAVAILABLE})
    assert "--dictionary DIR" in ATTRIBUTIONS_UNAVAILABLE
    status, reply = await api.post(name, layer=1, head=0, **_edge(_first_shown(data, 1, 0), 5, 6))
    assert status == 400  # validated first
    assert read_json(data / "attributions" / "manifest.json") == {}


@pytest.mark.parametrize("name", ["qk_attributions", "ov_attributions"])
async def test_a_key_after_the_query_is_400_before_any_work(attr_api, data, monkeypatch, name):
    calls = _count_jobs(attr_api, monkeypatch)
    status, reply = await attr_api.post(name, layer=1, head=0, **_edge(_first_shown(data, 1, 0), 4, 5))
    assert status == 400 and "key_pos 5 is after query_pos 4" in reply["detail"]
    assert calls == []


async def test_an_edge_the_decomposition_refuses_is_400_not_500(attr_api, data, monkeypatch):
    from headvis.server import compute

    def refuse(*args, **kwargs):
        raise HeadvisError("key_pos 2 is not a key that query_pos 5 may attend to")

    monkeypatch.setattr(compute, "qk_attribution", refuse)
    status, reply = await attr_api.post("qk_attributions", layer=1, head=0, **_edge(_first_shown(data, 1, 0), 5, 2))
    assert (status, reply) == (400, {"detail": "key_pos 2 is not a key that query_pos 5 may attend to"})
    assert read_json(data / "attributions" / "manifest.json") == {}
    assert not list((data / "attributions" / "qk").iterdir())


async def test_concurrent_requests_for_one_edge_compute_it_once(attr_api, data, monkeypatch):
    calls = _count_jobs(attr_api, monkeypatch)
    seq_idx = _first_shown(data, 1, 0)
    replies = await asyncio.gather(*(attr_api.post("qk_attributions", layer=1, head=0, **_edge(seq_idx, 6, 1))
                                     for _ in range(4)),
                                   attr_api.post("qk_attributions", layer=1, head=0, **_edge(seq_idx, 6, 2)))
    assert all(status == 200 for status, _ in replies), replies
    assert all(reply == replies[0][1] for _, reply in replies[:4])
    assert len(calls) == 2
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H0S{seq_idx}": {"qk": [[6, 1], [6, 2]], "ov": []}}


async def test_attribution_files_are_capped(attr_api, data, monkeypatch):
    from headvis.server import attributions

    monkeypatch.setattr(attributions, "MAX_ATTRIBUTION_FILES", 1)
    seq_idx = _first_shown(data, 1, 0)
    assert (await attr_api.post("qk_attributions", layer=1, head=0, **_edge(seq_idx, 3, 1)))[0] == 200
    status, reply = await attr_api.post("ov_attributions", layer=1, head=0, **_edge(seq_idx, 3, 1))
    assert status == 409 and "attribution files" in reply["detail"]
    assert (await attr_api.post("qk_attributions", layer=1, head=0, **_edge(seq_idx, 3, 1)))[0] == 200  # cached
    assert limits.MAX_ATTRIBUTION_FILES >= 1024


async def test_deleting_a_custom_sequence_removes_its_attributions(attr_api, data):
    _, added = await attr_api.post("add_custom_sequence", layer=1, head=0, text="def f(x): return x + 1")
    sid = added["sequence_id"]
    kept_seq = _first_shown(data, 1, 0)
    for name, head in (("qk_attributions", 0), ("ov_attributions", 0), ("qk_attributions", 4)):
        status, reply = await attr_api.post(name, layer=1, head=head, **_edge(sid, 5, 3))
        assert status == 200 and reply["seq_idx"] == sid, reply
    assert (await attr_api.post("qk_attributions", layer=1, head=0, **_edge(kept_seq, 5, 3)))[0] == 200
    assert set(read_json(data / "attributions" / "manifest.json")) == {f"L1H0S{sid}", f"L1H4S{sid}",
                                                                       f"L1H0S{kept_seq}"}
    validate_tree(data)
    status, _ = await attr_api.post("delete_custom_sequence", layer=1, head=0, sequence_id=sid)
    assert status == 200
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H0S{kept_seq}": {"qk": [[5, 3]], "ov": []}}
    assert sorted(p.name for p in (data / "attributions").rglob("*.json")) == [f"L1H0S{kept_seq}Q5K3.json",
                                                                               "manifest.json"]
    status, reply = await attr_api.post("qk_attributions", layer=1, head=0, **_edge(sid, 5, 3))
    assert status == 404 and sid in reply["detail"]
    validate_tree(data)


async def test_start_up_makes_the_manifest_list_exactly_the_files(aiohttp_client, config, lm, data, dictionaries):
    seq_idx = _first_shown(data, 1, 0)
    config = dataclasses.replace(config, dictionaries=(dictionaries["L1"],))
    api = await _started(aiohttp_client, config, lm, data)
    for q in (4, 5):
        assert (await api.post("qk_attributions", layer=1, head=0, **_edge(seq_idx, q, 1)))[0] == 200
    await api.client.close()
    # what a killed server can leave: a file not listed, a listed edge without its file, a deleted sequence's file
    _file(data, "qk", 1, 0, seq_idx, 4, 1).unlink()
    orphan = _file(data, "ov", 1, 0, "c0123456789ab", 2, 1)
    write_json(orphan, {"kind": "ov"})
    unlisted = read_json(_file(data, "qk", 1, 0, seq_idx, 5, 1))
    write_json(_file(data, "qk", 1, 0, seq_idx, 6, 1), {**unlisted, "query_pos": 6})
    (data / "attributions" / "qk" / ".L1H0S0Q1K0.json.x.tmp").write_text("{")
    await _started(aiohttp_client, config, lm, data)
    assert read_json(data / "attributions" / "manifest.json") == {f"L1H0S{seq_idx}": {"qk": [[5, 1], [6, 1]], "ov": []}}
    assert not orphan.exists() and not list((data / "attributions").rglob(".*"))
    validate_tree(data)


async def test_the_openapi_reply_schema_is_the_attribution_file_schema(attr_api, data):
    document = await (await attr_api.client.get("/api/openapi.json")).json()
    seq_idx = _first_shown(data, 1, 0)
    for name in ("qk_attributions", "ov_attributions"):
        _, reply = await attr_api.post(name, layer=1, head=0, **_edge(seq_idx, 8, 8))
        schema = document["paths"][endpoint(name)]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        validate(reply, schema)
        with pytest.raises(Exception):
            validate({**reply, "extra": 1}, schema)
        assert "501" in document["paths"][endpoint(name)]["post"]["responses"]


# -- with a feature library

@pytest.fixture(scope="session")
def described(scanned, lm, dictionaries, tmp_path_factory):
    """A copy of the scan with the feature library of dictionary L1 (python -m headvis.features)."""
    import shutil

    from headvis.features import FeatureOptions, build_features

    data = tmp_path_factory.mktemp("described") / "data"
    shutil.copytree(scanned, data)
    build_features(FeatureOptions(dictionary=str(dictionaries["L1"]), data=str(data), device="cpu"), lm=lm)
    return data


async def test_features_are_described_by_their_library_with_a_few_snippets(aiohttp_client, config, lm, described,
                                                                           dictionaries, tmp_path):
    import shutil

    data = tmp_path / "described"
    shutil.copytree(described, data)
    config = dataclasses.replace(config, data=data, dictionaries=(dictionaries["L1"],))
    api = await _started(aiohttp_client, config, lm, data)
    status, reply = await api.post("qk_attributions", layer=1, head=0, **_edge(_first_shown(data, 1, 0), 9, 4))
    assert status == 200, reply
    validate(reply, load_schema("attribution_file.schema.json"))
    created = read_json(data / "features" / "L1" / "index.json")["created"]
    assert reply["feature_libraries"] == {"L1": created} and "note" not in reply
    snippets = [p["query_snippets"] for p in reply["pairs"]] + [m["snippets"] for m in reply["key_marginals"]]
    assert any(snippets) and all(len(s) <= limits.MAX_SNIPPETS for s in snippets)
    assert not reply["pairs"][0]["query_description"].startswith("feature ")
    validate_tree(data)


# -- refused at start-up

def _check(paths, data):
    return ServedDictionaries.check(read_dictionaries(tuple(paths)), open_data_tree(data))


async def test_dictionaries_that_cannot_be_served_are_refused_at_start(lm, data, dictionaries, tmp_path):
    d_model = lm.info.d_model
    cases = [
        ([random_dictionary(tmp_path / "narrow", "blocks.1.hook_resid_pre", 100)], "is for d_model 100"),
        ([random_dictionary(tmp_path / "deep", "blocks.99.hook_resid_pre", d_model)], "reads layer 99"),
        ([dictionaries["L1out"], random_dictionary(tmp_path / "L2", "blocks.2.hook_resid_pre", d_model)],
         "both read the input of layer 2"),
        ([random_dictionary(tmp_path / "mid", "blocks.1.hook_resid_mid", d_model)], "reads blocks.1.hook_resid_mid"),
        ([random_dictionary(tmp_path / "L6", "blocks.6.hook_resid_pre", d_model)], "which no scanned layer uses"),
        ([dictionaries["L1"], random_dictionary(tmp_path / "other" / "L1", "blocks.3.hook_resid_pre", d_model)],
         "two dictionaries are named L1"),
    ]
    for paths, message in cases:
        with pytest.raises(HeadvisError, match=message):
            _check(paths, data)
    with pytest.raises(HeadvisError, match="no such folder"):
        read_dictionaries((tmp_path / "missing",))
    served = _check([dictionaries["L1"], dictionaries["L1out"]], data)
    assert served.source(1).name == "L1" and served.target(1).name == "L1out" and served.source(3) is None
    lines = served.log_lines()
    assert len(lines) == 2 and "QK and OV source of layer 1" in lines[0] and "OV target of layer 1" in lines[1]
    assert "python -m headvis.features --dictionary" in lines[0]
