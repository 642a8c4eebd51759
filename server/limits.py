"""The server's documented limits (docs/server.md), in one place.

Each one bounds what a single request can cost: bytes read, tokens run
through the model, files grown, work queued.
"""

__all__ = [
    "BODY_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "MAX_ATTRIBUTION_FILES",
    "MAX_BODY_BYTES",
    "MAX_CLUSTERS",
    "MAX_CLUSTER_NAME",
    "MAX_CUSTOM_SEQUENCES",
    "MAX_PENDING_JOBS",
    "MAX_PROJECTED_POINTS",
    "MAX_SNIPPETS",
    "MAX_TEXT_BYTES",
    "MAX_TOKENS",
    "NEIGHBOURS",
]

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused with 413 before it is parsed
MAX_TEXT_BYTES = 16 * 1024  # `text` of add_custom_sequence, UTF-8 bytes (413 beyond)
MAX_TOKENS = 1024  # a custom text is cut to min(this, the model's context) tokens, BOS included
MAX_CUSTOM_SEQUENCES = 256  # add_custom_sequence answers 409 beyond this many; delete some first
MAX_CLUSTERS = 64  # clusters per save_umap_clusters
MAX_CLUSTER_NAME = 100  # characters of a cluster name
MAX_PROJECTED_POINTS = 1024  # projected_points kept per head; project_to_umap answers 409 beyond
MAX_PENDING_JOBS = 32  # model jobs queued or running; more are refused with 429
NEIGHBOURS = 8  # k of the nearest-neighbour interpolation onto UMAP views
MAX_ATTRIBUTION_FILES = 4096  # attribution files kept (qk and ov together); the attribution endpoints answer 409 beyond
# Snippets per listed feature in an attribution file (the feature library keeps more). With edge.py's 50 pairs and
# 20 marginals of 5 interactions per side, a file lists at most 340 snippet lists: 1360 snippets of <= 15 tokens.
MAX_SNIPPETS = 4
# A connection idle this long is closed: between requests, and from its opening until its first request's headers
# are complete (a silent or a slow-header client). aiohttp's default is an hour.
IDLE_TIMEOUT_S = 15.0
# A request body not all there this long after its headers is refused with 408 (a trickling or stalled client
# would hold its connection and handler otherwise); a 1 MiB body takes milliseconds on loopback.
BODY_TIMEOUT_S = 30.0
