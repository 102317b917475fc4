"""Timing compared variants round by round (A, B, C, A, B, C, ...) and their per-round ratios.

On a shared machine the load moves within seconds: timing all of A's rounds and then B's
compares them under different loads. Here every round runs each variant once, back to
back, so a ratio taken within a round compares neighbours in time; the median of the
per-round ratios, with their min-max spread, is the figure to quote (benchmarks/RESULTS.md).

    rounds = interleave({"plain": run_plain, "ours": run_ours}, rounds=7)
    print(rounds.describe("ours", "plain"))   # "<median>x (<min>-<max>x, 7 rounds)"
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass
class Rounds:
    """``seconds[name][r]``: the wall time of variant ``name`` in round r."""

    seconds: dict[str, list[float]]

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        """Per round: time of ``numerator`` / time of ``denominator`` (a cost ratio; use
        ``ratios(reference, variant)`` for the speed-up of ``variant``)."""
        return [a / b for a, b in zip(self.seconds[numerator], self.seconds[denominator])]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def describe(self, numerator: str, denominator: str) -> str:
        """``"median (min-max, N rounds)"`` of the per-round ratios."""
        ratios = self.ratios(numerator, denominator)
        return (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x, "
                f"{len(ratios)} rounds)")


def interleave(variants: Mapping[str, Callable[[], object]], rounds: int, *,
               warmup: bool = True, report: Callable[[str], None] | None = None) -> Rounds:
    """Run every variant once per round, in the mapping's order, and time each call.

    Args:
        variants: name -> a callable doing one unit of work (its result is discarded).
        rounds: how many rounds; at least 1.
        warmup: call each variant once before the first round (allocators, oneDNN kernel
            builds, page cache), untimed.
        report: called with a one-line summary after each round (e.g. ``print``).
    """
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    if warmup:
        for run in variants.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
        if report is not None:
            report(f"round {index + 1}/{rounds}: "
                   + ", ".join(f"{name} {values[-1]:.3f} s" for name, values in seconds.items()))
    return Rounds(seconds)
