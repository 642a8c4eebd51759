"""The server's settings (`ServerConfig`) and its shared state, under typed application keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from headvis.models import LoadedModel
from headvis.server.attributions import AttributionStore, ServedDictionaries
from headvis.server.compute import ModelJobs
from headvis.server.net import LOOPBACK_NAMES
from headvis.server.store import CustomStore, JsonFiles, UmapStore
from headvis.server.tree import DataTree

__all__ = ["ATTRIBUTIONS", "CONFIG", "CONTEXT", "DICTIONARIES", "FILES", "JOBS", "PRELOADED", "STORE", "TREE", "UMAP",
           "ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """What `python -m headvis.serve` was asked for."""

    data: Path  # the scanned tree served at /data/ and written to
    url: str  # advertised as server_config.json `server_url`, e.g. http://127.0.0.1:8765
    model: str | None = None  # overrides config.json's model name
    device: str = "cpu"
    frontend: Path | None = None  # the built frontend; None: frontend/dist of the source tree
    allow_origin: str | None = None  # the one cross-origin caller allowed (CORS); None: CORS off
    dictionaries: tuple[Path, ...] = ()  # SAELens folders (--dictionary) the attributions read; () : attributions off
    # Host header names accepted (DNS-rebinding guard); None accepts any (a non-loopback bind).
    allowed_hosts: tuple[str, ...] | None = field(default=LOOPBACK_NAMES)


TREE = web.AppKey("tree", DataTree)
CONFIG = web.AppKey("config", ServerConfig)
CONTEXT = web.AppKey("context", dict)  # the context written to server_config.json
FILES = web.AppKey("files", JsonFiles)  # shared-file read-modify-write
STORE = web.AppKey("store", CustomStore)  # custom_sequences/
UMAP = web.AppKey("umap", UmapStore)  # clusters and projected points of umap/ files
JOBS = web.AppKey("jobs", ModelJobs)  # set once the model is loaded
ATTRIBUTIONS = web.AppKey("attributions", AttributionStore)  # attributions/
DICTIONARIES = web.AppKey("dictionaries", ServedDictionaries)  # set once the model is loaded
PRELOADED = web.AppKey("preloaded", LoadedModel)  # a model handed in by the caller (tests), absent otherwise
