"""The row-statistics op whole: its types and torch reference (`row_stats_ref`), its Triton (`row_stats`) and
numba (`row_stats_cpu`) kernels. Imports nothing of the rest of headvis."""
