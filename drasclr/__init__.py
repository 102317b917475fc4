"""drasclr: DrasCLR (Yu et al., Medical Image Analysis 2023), fast and complete.

Anatomy-aware contrastive learning for 3D lung CT: Loc-CondConv encoders whose kernels depend
on the atlas location of each patch, trained with MoCo against per-landmark memory banks.
Heavy sub-modules are imported on first use.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "train": "drasclr.pretrain",
    "TrainConfig": "drasclr.pretrain",
    "load_reference_checkpoint": "drasclr.checkpoint",
    "evaluate": "drasclr.evaluation",
    "extract_features": "drasclr.features",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'drasclr' has no attribute {name!r}")
