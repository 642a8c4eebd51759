"""A tree damaged while the server runs: a clear 409 that names the file, never a 500; idle connections are closed."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from headvis.io import read_json
from headvis.server import app as server_app
from headvis.server.app import create_app
from server_helpers import Api

pytestmark = pytest.mark.asyncio


def _cloud_point(data, layer: int, head: int) -> list:
    umap = read_json(data / "umap" / f"L{layer}H{head}.json")
    return [umap["seq_idx"][0], umap["top_q"][0], umap["top_k"][0]]


async def test_a_truncated_umap_file_is_409_naming_it(api: Api, data):
    point = _cloud_point(data, 1, 0)
    path = data / "umap" / "L1H0.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    status, reply = await api.post("save_umap_clusters", layer=1, head=0,
                                   clusters=[{"name": "a", "color": "#123456", "points": [point]}])
    assert status == 409 and "umap/L1H0.json is damaged" in reply["detail"], reply
    status, reply = await api.post("project_to_umap", layer=1, head=0, seq_idx=point[0], query_pos=3, key_pos=1)
    assert status == 409 and "umap/L1H0.json" in reply["detail"], reply


async def test_a_umap_file_replaced_by_a_folder_is_409(api: Api, data):
    path = data / "umap" / "L3H4.json"
    path.unlink()
    path.mkdir()
    status, reply = await api.post("save_umap_clusters", layer=3, head=4, clusters=[])
    assert status == 409 and "L3H4.json" in reply["detail"], reply


async def test_custom_sequences_replaced_by_a_file_is_409_and_the_listing_stays(api: Api, data):
    status, first = await api.post("add_custom_sequence", layer=1, head=0, text="added before the damage")
    assert status == 200
    folder = data / "custom_sequences"
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    status, reply = await api.post("add_custom_sequence", layer=1, head=0, text="added after the damage")
    assert status == 409 and "changed under the server" in reply["detail"], reply
    status, reply = await api.post("delete_custom_sequence", layer=1, head=0, sequence_id=first["sequence_id"])
    assert status == 409, reply
    listed = (await api.data_file("custom_sequences/index.json"))["sequences"]
    assert [e["sequence_id"] for e in listed] == [first["sequence_id"]]  # a failed delete leaves it listed


async def test_a_silent_connection_and_a_half_sent_header_are_closed(config, lm, monkeypatch):
    """aiohttp's default keeps them for an hour; `serve`'s runner closes them after IDLE_TIMEOUT_S (shortened here)."""
    from aiohttp import web

    from headvis.server.net import bind

    monkeypatch.setattr(server_app, "IDLE_TIMEOUT_S", 0.5)
    runner = server_app.runner_for(create_app(config, lm))
    await runner.setup()
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        silent = await asyncio.open_connection("127.0.0.1", port)
        partial = await asyncio.open_connection("127.0.0.1", port)
        partial[1].write(b"GET /data/config.json HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        await partial[1].drain()
        for reader, writer in (silent, partial):
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed by the server, nothing sent
            writer.close()
    finally:
        await runner.cleanup()
