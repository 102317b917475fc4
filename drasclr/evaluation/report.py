"""The evaluation report's content model: sections of tables and figures.

Every evaluation (subject-level readout, survival, COVID severity, detection, dense maps,
label efficiency, ablations) returns :class:`Section` objects; the writer renders them all
into one report (``report.html``, ``report.md``, PNG figures and ``results.json``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Score:
    """A metric over folds (or repeats): its values, summarised as mean and SD."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> "Score":
        return cls(tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel()))

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


@dataclass
class Table:
    """One table: a header and rows of cells (text, numbers or :class:`Score`)."""

    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""


@dataclass
class Figure:
    """A PNG written into the report folder (``path`` relative to it)."""

    title: str
    path: Path
    caption: str = ""


@dataclass
class Section:
    """A part of the report: a heading, a paragraph, its tables and figures."""

    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
