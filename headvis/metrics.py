"""The row-statistics op's types and torch reference, under their public names.

They live beside the op's kernels, in `headvis.kernels.row_stats_ref` (the
repository's `kernels/`): the kernels import nothing of the scanner, and the
scanner imports the op from here or from there alike.
"""

from __future__ import annotations

from headvis.kernels.row_stats_ref import (ROW_METRICS, AttentionSpec, RowStats, allowed_keys, chunk_scores,
                                           distance_bin_edges, drop_light_entries, ref_pattern, ref_row_stats)

__all__ = ["ROW_METRICS", "AttentionSpec", "RowStats", "allowed_keys", "chunk_scores", "distance_bin_edges",
           "drop_light_entries", "ref_pattern", "ref_row_stats"]
