"""headvis: see what every attention head of a transformer language model does.

Entry points: `python -m headvis.scan` (writes the static `data/` tree) and
`python -m headvis.serve` (serves it, with the live endpoints).
"""

__version__ = "0.4.0"
__all__ = ["__version__"]
