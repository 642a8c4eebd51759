"""Attributions: one attention edge decomposed exactly into sparse-dictionary feature pairs.

`edge.qk_attribution` and `edge.ov_attribution` build the attribution files of
CONTRACT section 2; `linearize.LayerLinearization` is the layer as a linear
map of residual-stream parts, frozen at a real input.
"""

from headvis.attributions.edge import KINDS, edge_inputs, ov_attribution, qk_attribution
from headvis.attributions.linearize import LayerLinearization

__all__ = ["KINDS", "LayerLinearization", "edge_inputs", "ov_attribution", "qk_attribution"]
