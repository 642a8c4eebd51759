"""Sparse dictionaries (SAEs and transcoders) for attributions: SAELens folders, hooks, training.

- `dictionary.py`: the in-memory `Dictionary` (encode/decode as SAELens defines them) and
  `check_matches_model`;
- `saelens.py`: `load_dictionary` / `save_dictionary`, the SAELens 6.x and flat cfg layouts;
- `hooks.py`: `parse_hook` and `capture_hooks`, TransformerLens hook names on Hugging Face models;
- `training.py`: the TopK SAE trainer behind `python -m headvis.train_dictionary`.
"""

from headvis.dictionaries.dictionary import Dictionary, check_matches_model
from headvis.dictionaries.hooks import capture_hooks, parse_hook
from headvis.dictionaries.saelens import load_dictionary, save_dictionary

__all__ = ["Dictionary", "capture_hooks", "check_matches_model", "load_dictionary", "parse_hook",
           "save_dictionary"]
