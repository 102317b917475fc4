"""Old spellings that still work, each with a DeprecationWarning.

drasclr 0.1 spelled neighbour the American way in a training-config key and in the atlas file;
config files, checkpoints and atlases written then keep loading. The old names live only here
(and in tests/test_deprecated_names.py).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

#: TrainConfig keys (config files, checkpoints): old name -> new name
CONFIG_KEYS = {"k_neighbors": "k_neighbours"}
#: arrays of an atlas file (``Atlas.save``): old name -> new name
ATLAS_ARRAYS = {"neighbors": "neighbours"}


def renamed_keys(values: Mapping[str, Any], renames: Mapping[str, str], source: str) -> dict[str, Any]:
    """``values`` with each old key under its new name, a DeprecationWarning naming ``source``
    for each; ValueError when both spellings are given."""
    result = dict(values)
    for old, new in renames.items():
        if old not in result:
            continue
        if new in result:
            raise ValueError(f"{source}: both {old!r} and its new spelling {new!r} are given; "
                             f"keep {new!r}")
        warnings.warn(f"{source}: {old!r} is deprecated, use {new!r}", DeprecationWarning,
                      stacklevel=3)
        result[new] = result.pop(old)
    return result
