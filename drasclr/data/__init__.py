"""From CT files to a landmark patch store (Yu et al. 2023, Sections 2.1, 3, 4.1).

``build_atlas`` turns an atlas lung mask into landmarks; ``preprocess`` turns a cohort of CT
files into a patch store that ``PatchStore`` reads. Sub-modules are imported on first use, so
``import drasclr.data`` stays light (no ANTs, no torch).
"""
from importlib import import_module

_LAZY_EXPORTS = {
    "Atlas": "drasclr.data.atlas",
    "build_atlas": "drasclr.data.atlas",
    "PatchStore": "drasclr.data.store",
    "create_store": "drasclr.data.store",
    "write_subject": "drasclr.data.store",
    "preprocess": "drasclr.data.preprocess",
}

__all__ = list(_LAZY_EXPORTS)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'drasclr.data' has no attribute {name!r}")
