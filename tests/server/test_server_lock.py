"""One writer per tree: a second server is refused, a killed one leaves no stuck lock, a scan waits its turn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from headvis.errors import HeadvisError
from headvis.io import read_json
from headvis.lock import TreeLock
from headvis.scan import ScanOptions, run_scan
from headvis.server.app import create_app
from server_helpers import HEADS, LAYERS, endpoint

SCANNED = [(layer, head) for layer in LAYERS for head in HEADS]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


class Served:
    """`python -m headvis.serve --data DATA --port 0` in a subprocess, started and read until ready."""

    def __init__(self, data: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "headvis.serve", "--data", str(data), "--port", "0"],
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
        deadline = time.monotonic() + 120
        self.log: list[str] = []
        while not any("ready" in line for line in self.log):
            assert time.monotonic() < deadline and self.process.poll() is None, self.log
            self.log.append(self.process.stderr.readline())
        self.config = read_json(data / "server_config.json")
        self.url = self.config["server_url"]

    def post(self, name: str, **fields) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + endpoint(name), method="POST",
                                         data=json.dumps({"context": self.config["context"], **fields}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def get(self, rel: str):
        with urllib.request.urlopen(f"{self.url}/data/{rel}", timeout=60) as response:
            return json.load(response)

    def stop(self, sig=signal.SIGINT) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self.process.stderr.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _serve_once(data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headvis.serve", "--data", str(data), "--port", "0"],
                          capture_output=True, text=True, timeout=120, env=ENV)


def test_a_second_server_is_refused_and_the_first_keeps_every_one_of_30_concurrent_adds(data):
    first = Served(data)
    try:
        second = _serve_once(data)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert "already in use by a headvis server" in lines[0] and f"pid {first.process.pid}" in lines[0]
        assert first.url in lines[0] and "Traceback" not in second.stderr
        assert read_json(data / "server_config.json") == first.config  # the refused one wrote nothing

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: first.post("add_custom_sequence", layer=1, head=0,
                                                         text=f"prompt number {i}"), range(30)))
        assert [status for status, _ in replies] == [200] * 30, replies
        ids = sorted(reply["sequence_id"] for _, reply in replies)
        assert sorted(e["sequence_id"] for e in first.get("custom_sequences/index.json")["sequences"]) == ids
        for layer, head in SCANNED:
            listed = first.get(f"custom_sequences/L{layer}H{head}.json")["sequences"]
            assert sorted(r["sequence_id"] for r in listed) == ids, (layer, head)
        assert first.stop() == 0
    finally:
        first.kill()
    # stopped cleanly: the files on disk (what a static host serves) list all 30, and static mode is back
    assert sorted(e["sequence_id"] for e in read_json(data / "custom_sequences" / "index.json")["sequences"]) == ids
    for layer, head in SCANNED:
        on_disk = read_json(data / "custom_sequences" / f"L{layer}H{head}.json")["sequences"]
        assert sorted(r["sequence_id"] for r in on_disk) == ids
    assert read_json(data / "server_config.json") == {}


def test_a_killed_server_leaves_no_stuck_lock_and_loses_no_acknowledged_add(data):
    first = Served(data)
    try:
        status, added = first.post("add_custom_sequence", layer=3, head=4, text="kept across a kill -9")
        assert status == 200
        first.stop(signal.SIGKILL)
    finally:
        first.kill()
    # the snapshot files are behind (the server never stopped cleanly); the next server catches them up
    assert read_json(data / "custom_sequences" / "index.json") == {"sequences": []}
    second = Served(data)
    try:
        assert [e["sequence_id"] for e in second.get("custom_sequences/index.json")["sequences"]] == \
            [added["sequence_id"]]
        assert any("brought up to date" in line for line in second.log), second.log
        on_disk = read_json(data / "custom_sequences" / "L3H4.json")["sequences"]
        assert [r["sequence_id"] for r in on_disk] == [added["sequence_id"]]
        assert second.stop() == 0
    finally:
        second.kill()


@pytest.mark.asyncio
async def test_a_second_app_on_one_tree_fails_at_start_up(aiohttp_client, config, lm, data):
    await aiohttp_client(create_app(config, lm))
    with pytest.raises(HeadvisError, match="already in use by a headvis server"):
        await aiohttp_client(create_app(config, lm))
    assert read_json(data / "server_config.json")["server_url"] == config.url  # the first one's, still


def test_a_scan_does_not_replace_a_served_tree(data, lm):
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with TreeLock(data, "server", url="http://127.0.0.1:9"):
        with pytest.raises(HeadvisError, match=r"in use by a headvis server \(pid \d+, http://127.0.0.1:9"):
            run_scan(ScanOptions(out=str(data), seq_len=16, num_seqs=4, layers="1", heads="0", device="cpu"), lm=lm)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert not list(data.parent.glob(f".{data.name}.staging-*"))
