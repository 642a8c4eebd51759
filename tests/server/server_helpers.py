"""Constants of the fixture scan and a client helper, shared by the server tests (conftest.py makes them)."""

from __future__ import annotations

from pathlib import Path

from headvis.io import read_json

LAYERS = [1, 3]
HEADS = [0, 1, 4]  # heads 0 and 1 share a KV head, 4 reads another (GQA groups of 3)
SEQ_LEN = 32
NUM_SEQS = 12


def endpoint(name: str) -> str:
    """The route of an endpoint, as the reference frontend builds it."""
    return f"/api/head_vis/public/{name}/v0"


class Api:
    """POSTs as the frontend makes them: JSON with the context of server_config.json."""

    def __init__(self, client, data: Path):
        self.client = client
        self.data = data

    @property
    def context(self) -> dict:
        return read_json(self.data / "server_config.json")["context"]

    async def post(self, name: str, **fields):
        """(status, reply JSON)."""
        response = await self.client.post(endpoint(name), json={"context": self.context, **fields})
        return response.status, await response.json()
