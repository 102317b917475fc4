"""What the patch-file integrity check costs.

A full-size subject file: 575 landmarks of 32^3 int16 (37.7 MB). Measured in the same run,
interleaved round by round (A, B, A, B ...), warm page cache:

- ``write``: ``np.save`` into memory, alone, and with the CRC-32 of the bytes (write time);
- ``first open``: ``np.load`` of the whole file (the reference's per-subject access), alone,
  and :func:`drasclr.data.store.verify_patch_file` (read + CRC-32) that a ``PatchStore`` runs
  once per subject when it first opens the file;
- ``per read``: a training read (``PatchStore.gather`` of 128 random patches) from a store
  that verifies against one that does not; after the first open the check is not on this
  path, so the ratio should be 1.

Prints the median ratio with its min-max spread over the rounds.

    .venv/bin/python benchmarks/bench_integrity.py [--rounds 9]
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from drasclr.data.store import PatchStore, patch_path, verify_patch_file
from bench_store import NUM_LANDMARKS, PATCH, build_store


def timed(function, repeat: int = 3) -> float:
    """Best of ``repeat`` calls, seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_store(root)
        store = PatchStore(root)
        path = patch_path(root, store.subject_ids[0])
        checksum = store._checksums[0]
        patches = np.load(path)
        size_mb = path.stat().st_size / 1e6

        def save() -> bytes:
            buffer = io.BytesIO()
            np.save(buffer, patches)
            return buffer.getvalue()

        rng = np.random.default_rng(0)
        subjects = rng.integers(0, store.num_subjects, 128)
        landmarks = rng.integers(0, NUM_LANDMARKS, 128)
        checked, unchecked = PatchStore(root), PatchStore(root, verify=False)
        checked.gather(subjects, landmarks)  # every subject opened (and verified) once
        unchecked.gather(subjects, landmarks)

        rows: dict[str, list[tuple[float, float]]] = {"write": [], "first open": [], "per read": []}
        for _ in range(args.rounds):
            rows["write"].append((timed(save), timed(lambda: zlib.crc32(save()))))
            rows["first open"].append((timed(lambda: np.load(path)),
                                       timed(lambda: verify_patch_file(path, "s000", checksum))))
            rows["per read"].append((timed(lambda: unchecked.gather(subjects, landmarks)),
                                     timed(lambda: checked.gather(subjects, landmarks))))
        print(f"file: {NUM_LANDMARKS} x {PATCH}^3 int16 = {size_mb:.1f} MB; {args.rounds} rounds")
        print("| step | without check, ms (median) | with check, ms (median) | ratio, median (min-max) |")
        print("|---|---|---|---|")
        for name, pairs in rows.items():
            plain = statistics.median(p for p, _ in pairs) * 1e3
            checked_ms = statistics.median(c for _, c in pairs) * 1e3
            print(f"| {name} | {plain:.1f} | {checked_ms:.1f} | "
                  f"{summary([c / p for p, c in pairs])} |")
        crc = statistics.median(c - p for p, c in rows["write"])
        print(f"CRC-32 alone: about {crc * 1e3:.1f} ms per file, {size_mb / 1e3 / crc:.1f} GB/s")


if __name__ == "__main__":
    main()
