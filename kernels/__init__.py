"""Fused Triton kernels for the scan; `ref_*` in headvis.metrics is their reference."""
