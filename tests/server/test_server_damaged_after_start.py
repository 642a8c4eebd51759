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


@pytest.mark.parametrize("body", ["{}", "null", "[]", '{"seq_idx": [1], "top_q": [], "top_k": []}'])
async def test_a_umap_file_of_the_wrong_shape_is_409_not_500(api: Api, data, body):
    point = _cloud_point(data, 1, 0)
    (data / "umap" / "L1H0.json").write_text(body)
    status, reply = await api.post("save_umap_clusters", layer=1, head=0,
                                   clusters=[{"name": "a", "color": "#123456", "points": [point]}])
    assert status == 409 and "umap/L1H0.json is damaged" in reply["detail"], reply
    status, reply = await api.post("project_to_umap", layer=1, head=0, seq_idx=point[0], query_pos=3, key_pos=1)
    assert status == 409, reply


async def test_a_head_file_of_the_wrong_shape_is_409_not_500(api: Api, data):
    shown = read_json(data / "heads" / "L1H0.json")["sequences"][0]["sequence_id"]
    (data / "heads" / "L1H0.json").write_text("{}")
    status, reply = await api.post("project_to_umap", layer=1, head=0, seq_idx=shown, query_pos=3, key_pos=1)
    assert status == 409 and "heads/L1H0.json is damaged" in reply["detail"], reply


async def test_a_delete_whose_umap_cleanup_fails_is_done_and_the_next_start_finishes_it(api: Api, data, aiohttp_client,
                                                                                      config, lm):
    status, added = await api.post("add_custom_sequence", layer=1, head=0, text="a prompt to project then delete")
    sid = added["sequence_id"]
    status, reply = await api.post("project_to_umap", layer=1, head=0, seq_idx=sid, query_pos=3, key_pos=1)
    assert status == 200, reply
    umap = data / "umap" / "L1H0.json"
    good = umap.read_bytes()
    umap.write_text("{")  # the cleanup of this file fails: the delete still happens, and says so truly
    status, reply = await api.post("delete_custom_sequence", layer=1, head=0, sequence_id=sid)
    assert (status, reply) == (200, {"deleted": sid})
    assert (await api.data_file("custom_sequences/index.json")) == {"sequences": []}
    umap.write_bytes(good)  # restored, still naming the deleted sequence
    assert any(p["seq_idx"] == sid for p in read_json(umap)["projected_points"])
    await api.client.close()
    await aiohttp_client(create_app(config, lm))  # the next start removes its points
    assert not any(p["seq_idx"] == sid for p in read_json(umap)["projected_points"])


async def test_a_damaged_stored_record_is_409_and_a_stray_folder_is_ignored(api: Api, data, aiohttp_client, config, lm):
    status, added = await api.post("add_custom_sequence", layer=1, head=0, text="stored, then damaged")
    (record,) = (data / "custom_sequences" / "store").glob(f"*-{added['sequence_id']}/L1H0.json")
    record.write_bytes(record.read_bytes()[:40])
    response = await api.client.get("/data/custom_sequences/L1H0.json")
    assert response.status == 409 and "L1H0.json" in (await response.json())["detail"]
    record.unlink()
    await api.client.close()  # a clean stop (the snapshot rewritten without the lost record)
    (data / "custom_sequences" / "store" / "junk").mkdir()  # not a sequence folder: ignored
    restarted = Api(await aiohttp_client(create_app(config, lm)), data)
    listed = (await restarted.data_file("custom_sequences/index.json"))["sequences"]
    assert [e["sequence_id"] for e in listed] == [added["sequence_id"]]


async def test_other_spellings_of_a_live_custom_file_are_served_live(api: Api, data):
    await api.post("add_custom_sequence", layer=1, head=0, text="live, not the snapshot")
    for path in ("/data//custom_sequences/index.json", "/data/custom_sequences//index.json",
                 "/data/custom_sequences/L1H0.json/"):
        response = await api.client.get(path)
        assert response.status == 200 and len((await response.json())["sequences"]) == 1, path


async def test_a_declared_body_past_the_limit_is_413_at_once(api: Api):
    import time

    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    start = time.monotonic()
    writer.write(b"POST /api/head_vis/public/add_custom_sequence/v0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 2147483648\r\n\r\n{")
    await writer.drain()
    head = await asyncio.wait_for(reader.readline(), timeout=10)
    assert head.startswith(b"HTTP/1.1 413") and time.monotonic() - start < 5
    writer.close()
