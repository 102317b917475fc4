"""Valid ranges of numeric settings, checked for meaning and not only for type.

A NaN fails every comparison, so a plain ``lr <= 0`` check lets it through and the run trains
into a checkpoint full of NaN. Every numeric setting of the library (config dataclasses and
the numeric arguments of the long jobs) is therefore checked with :func:`check_number`:
finite, of the right kind (a bool is not a number, a float is not an int) and inside its
:class:`Interval`, before any work starts. The error names the setting, the value and the
valid range.

A dataclass declares a field's range in its metadata (``field(..., metadata={"valid":
Interval(...)})``, see :func:`ranged`) and calls :func:`check_fields` in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class Interval:
    """The valid values of a numeric setting, e.g. ``Interval(0, 1, high_open=True)`` is
    [0, 1); ``integer=True`` also requires an integer."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        high = "inf)" if math.isinf(self.high) else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}"

    def as_integer(self) -> "Interval":
        return dataclasses.replace(self, integer=True)


POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
FRACTION = Interval(0, 1, high_open=True)
AT_LEAST_ONE = Interval(1, integer=True)
COUNT = Interval(0, integer=True)  # seeds, counts that may be zero


def check_number(name: str, value: Any, valid: Interval) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite number in ``valid``
    (an integer when ``valid.integer``); bools and text are refused."""
    kind_ok = not isinstance(value, bool) and isinstance(
        value, numbers.Integral if valid.integer else numbers.Real)
    if not kind_ok or value not in valid:
        kind = "an integer" if valid.integer else "a finite number"
        raise ValueError(f"{name}: expected {kind} in {valid}, got {value!r}")


def check_numbers(name: str, values: Iterable[Any], valid: Interval, allow_empty: bool = False
                  ) -> None:
    """:func:`check_number` on every item of a sequence setting (e.g. a grid of C values)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name}: expected a sequence of numbers in {valid}, got {values!r}")
    values = list(values)
    if not values and not allow_empty:
        raise ValueError(f"{name}: expected at least one number in {valid}, got none")
    for value in values:
        check_number(name, value, valid)


def ranged(default: Any, valid: Interval, **metadata: Any) -> Any:
    """A dataclass field with a valid range (``metadata["valid"]``), for :func:`check_fields`."""
    return field(default=default, metadata={**metadata, "valid": valid})


def field_ranges(instance_or_class: Any) -> Mapping[str, Interval]:
    """Field name -> declared Interval of a dataclass (fields without one left out)."""
    return {f.name: f.metadata["valid"] for f in dataclasses.fields(instance_or_class)
            if f.metadata.get("valid") is not None}


def check_fields(instance: Any) -> None:
    """Check every field of a dataclass that declares a range; None means "not set" and is
    left to the field's type (e.g. ``max_steps: int | None``)."""
    for name, valid in field_ranges(instance).items():
        value = getattr(instance, name)
        if value is not None:
            check_number(name, value, valid)
