"""Constants of the fixture scan, a client helper and random dictionaries, shared by the server tests."""

from __future__ import annotations

from pathlib import Path

import torch

from headvis.dictionaries import Dictionary, parse_hook, save_dictionary
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

    async def data_file(self, rel: str):
        """GET /data/{rel} as a client reads the tree (custom sequences come from the server's store)."""
        response = await self.client.get(f"/data/{rel}")
        assert response.status == 200, (rel, response.status, await response.text())
        return await response.json()


def random_dictionary(path: Path, hook_name: str, d_in: int, *, d_sae: int = 256, k: int = 8, seed: int = 0) -> Path:
    """A random TopK SAE (unit decoder rows, W_enc = W_dec^T) saved as a SAELens folder at `path`."""
    layer, hook = parse_hook(hook_name)
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    save_dictionary(Dictionary(
        name=path.name, path=path, architecture="topk", hook_name=hook_name, hook_name_out=None, layer=layer,
        hook=hook, d_in=d_in, d_sae=d_sae, d_out=d_in, W_enc=w_dec.T.contiguous(), b_enc=torch.zeros(d_sae),
        W_dec=w_dec, b_dec=0.01 * torch.randn(d_in, generator=g), threshold=None, k=k, apply_b_dec_to_input=True,
        model_name=None, is_transcoder=False), path)
    return path
