"""Evaluation of pretrained encoders (Yu et al. 2023, section 4).

``evaluate`` runs the subject-level tasks and writes the report (``drasclr.evaluation.subject``);
the modules beside it hold the pieces (data checks, readout, survival, detection, report).
Imported on first use, so that ``drasclr.evaluation.report`` does not pay for scikit-learn.
"""
from importlib import import_module

_LAZY_EXPORTS = {
    "evaluate": "drasclr.evaluation.subject",
    "EvaluationResult": "drasclr.evaluation.subject",
}

__all__ = list(_LAZY_EXPORTS)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'drasclr.evaluation' has no attribute {name!r}")
