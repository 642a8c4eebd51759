"""Feature libraries: what each feature of a sparse dictionary does, stored beside the data tree.

`python -m headvis.features --dictionary DIR --data data` runs the dictionary over the scan's
corpus and writes `data/features/{dictionary name}/`; `FeatureLibrary.open(data, name)` answers
`describe(feature) -> (description, snippets)` for the attribution replies (CONTRACT section 2).

- `collect.py`: the two streaming passes (top windows, interval samples, token counts) in bounded memory;
- `describe.py`: the description derived from the data;
- `library.py`: the stored layout, `write_library` and `FeatureLibrary`;
- `build.py`: the command.
"""

from headvis.features.build import FeatureOptions, build_features, compute_tables, main
from headvis.features.collect import FeatureTables, collect_features
from headvis.features.describe import derive_description
from headvis.features.library import FeatureLibrary, read_labels

__all__ = ["FeatureLibrary", "FeatureOptions", "FeatureTables", "build_features", "collect_features",
           "compute_tables", "derive_description", "main", "read_labels"]
