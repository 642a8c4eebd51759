"""`python -m headvis.serve`: serve a scanned data tree, the frontend and the live endpoints.

    python -m headvis.serve --data data                  # http://127.0.0.1:8765
    python -m headvis.serve --data data --port 0 --allow-origin http://localhost:5173
    python -m headvis.serve --data data --dictionary dictionaries/L5 --dictionary dictionaries/L6

The frontend is served at `/`, the data tree at `/data/`, the endpoints of
CONTRACT section 3 at `POST /api/head_vis/public/{name}/v0` (described at
`/api/openapi.json`). `--data` must be a format 2 tree (a format 1 tree is
refused: re-scan it). Each `--dictionary` (a SAELens folder) turns on the QK/OV
attributions of the layer whose attention input it reads, and is OV's target
for the layer before; one that does not fit the model is refused before
serving. docs/server.md has the details. The work lives in
`headvis.server`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from headvis.errors import HeadvisError, run_cli

__all__ = ["build_parser", "main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default also prints the usage)
        print(f"headvis: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be an integer, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be in 0..65535 (0: any free port), not {port}")
    return port


def _origin(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"--allow-origin wants one origin such as http://localhost:5173, not {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m headvis.serve", description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="a folder written by python -m headvis.scan")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (loopback by default)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--model", default=None, help="model to load instead of the scan's (same shape required)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--frontend", default=None, help="built frontend folder (default: frontend/dist of the source tree)")
    p.add_argument("--allow-origin", type=_origin, default=None,
                   help="the one origin allowed to call cross-origin, with credentials (CORS); off by default")
    p.add_argument("--dictionary", action="append", default=[], metavar="DIR",
                   help="a SAELens dictionary folder (cfg.json + sae_weights.safetensors) the attributions read; "
                        "repeatable, one per hook")
    return p


def _logger() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("headvis: %(message)s"))
    for name in ("headvis", "aiohttp.server", "aiohttp.web"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _run(args: argparse.Namespace) -> None:
    from headvis.lock import TreeLock
    from headvis.server.tree import in_use_error, open_data_tree

    tree = open_data_tree(args.data)  # before importing torch: a wrong --data fails at once
    holder = TreeLock.holder(tree.root)  # the app takes the lock itself; this only fails early
    if holder is not None:
        raise in_use_error(tree.root, holder)
    frontend = None
    if args.frontend is not None:
        frontend = Path(args.frontend).expanduser()
        if not (frontend / "index.html").is_file():
            raise HeadvisError(f"--frontend {args.frontend}: no index.html there (build the frontend first)")
    if args.device not in (None, "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise HeadvisError(f"--device must be cpu or cuda, not {args.device!r}")

    from headvis.server.net import allowed_hosts_for, bind, url_for

    sock = bind(args.host, args.port)  # before torch is imported: a busy port fails at once
    url = url_for(sock)

    from headvis.server.app import serve
    from headvis.server.state import ServerConfig

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ServerConfig(data=tree.root, url=url, model=args.model, device=device, frontend=frontend,
                          allow_origin=args.allow_origin, allowed_hosts=allowed_hosts_for(args.host, url),
                          dictionaries=tuple(Path(d).expanduser() for d in args.dictionary))
    asyncio.run(serve(config, sock))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logger()
    return run_cli(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
