"""drasclr: DrasCLR (Yu et al., Medical Image Analysis 2023), fast and complete.

Anatomy-aware contrastive learning for 3D lung CT: Loc-CondConv encoders whose kernels depend
on the atlas location of each patch, trained with MoCo against per-landmark memory banks.

The user's journey needs this one import::

    import drasclr
    result = drasclr.train(store="store/", atlas="atlas.npz", out_dir="runs/a")
    encoder = drasclr.load_encoder(result.checkpoint)  # or any other checkpoint kind
    features = drasclr.extract_features(result.checkpoint, "store/", out="features.npz")
    drasclr.evaluate(["features.npz"], "clinical.csv", "store/", "report/")

The names below are imported on first use, so ``import drasclr`` stays cheap (no torch).
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY_EXPORTS = {
    "train": "drasclr.pretrain",
    "TrainConfig": "drasclr.pretrain",
    "load_encoder": "drasclr.checkpoint_formats",
    "CheckpointError": "drasclr.checkpoint_formats",
    "extract_features": "drasclr.features",
    "evaluate": "drasclr.evaluation",
    "Encoder": "drasclr.nn",
    "LocCondConv3d": "drasclr.nn",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        value = getattr(import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value  # the next look-up skips __getattr__
        return value
    raise AttributeError(f"module 'drasclr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
