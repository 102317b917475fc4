"""Patch store random access: patches/second for random (subject, landmark) pairs + 2 neighbours.

Training draws a batch of random (subject, landmark) pairs and needs each pair's patch and its
k = 2 neighbours' patches of the same subject (Yu et al. 2023, Section 2.4). Compared, in the
same run, interleaved round by round (benchmarks/interleave.py):

- ``gather``: ``PatchStore.gather`` on memory-mapped per-subject files (this project);
- ``load_per_pair``: the reference's per-subject access (``data/copd_patch.py`` testing path):
  ``np.load`` of the subject's whole patch file for every pair, then indexing.

Full-size store: 575 landmarks of 32^3 int16 per subject. Files are read through the page
cache after the first touch, so this is the warm-cache rate of a local disk.

    .venv/bin/python benchmarks/bench_store.py          # interleaved rounds: patches/s, ratios
    make bench                                          # pytest-benchmark timings
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from drasclr.data.atlas import Atlas, nearest_neighbours, normalised_coords
from drasclr.data.store import PatchStore, create_store, patch_path, write_subject
from interleave import interleave

NUM_SUBJECTS, NUM_LANDMARKS, PATCH, BATCH, K = 12, 575, 32, 128, 2


def build_store(root: Path, seed: int = 0) -> Atlas:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(12) * 26] * 3, indexing="ij"), -1).reshape(-1, 3)
    corners = grid[rng.choice(len(grid), NUM_LANDMARKS, replace=False)].astype(np.int64)
    atlas = Atlas(corners, normalised_coords(corners), nearest_neighbours(corners, K),
                  np.ones((4, 4, 4), np.uint8), np.eye(4), PATCH, 26, 0.1, "benchmark")
    create_store(root, atlas, root / "atlas.npz")
    for subject in range(NUM_SUBJECTS):
        patches = rng.integers(-1024, 241, (NUM_LANDMARKS,) + (PATCH,) * 3, dtype=np.int16)
        write_subject(root, f"s{subject:03d}", "synthetic", patches)
    return atlas


def random_batch(rng, atlas: Atlas) -> tuple[np.ndarray, np.ndarray]:
    """BATCH random pairs and their K neighbours: (BATCH * (1 + K),) subject and landmark indices."""
    subjects = rng.integers(0, NUM_SUBJECTS, BATCH)
    landmarks = rng.integers(0, NUM_LANDMARKS, BATCH)
    with_neighbours = np.concatenate([landmarks[:, None], atlas.neighbours[landmarks, :K]], axis=1)
    return np.repeat(subjects, 1 + K), with_neighbours.ravel()


def gather(store: PatchStore, subjects, landmarks) -> np.ndarray:
    return store.gather(subjects, landmarks)


def load_per_pair(store: PatchStore, subjects, landmarks) -> np.ndarray:
    root, ids = store.root, store.subject_ids
    return np.stack([np.load(patch_path(root, ids[s]))[l] for s, l in zip(subjects, landmarks)])


@pytest.fixture(scope="module")
def store_and_atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_store")
    atlas = build_store(root)
    return PatchStore(root), atlas


@pytest.mark.parametrize("method", [gather, load_per_pair], ids=lambda f: f.__name__)
def test_random_access(benchmark, store_and_atlas, method):
    store, atlas = store_and_atlas
    rng = np.random.default_rng(1)
    expected_shape = (BATCH * (1 + K),) + (PATCH,) * 3
    batch = benchmark(lambda: method(store, *random_batch(rng, atlas)))
    assert batch.shape == expected_shape


def main() -> None:
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as folder:
        atlas = build_store(Path(folder))
        store = PatchStore(folder)
        rng = np.random.default_rng(1)
        batches = {gather: 40, load_per_pair: 1}  # per round, about a second each

        def repeated(method, n):
            return lambda: [method(store, *random_batch(rng, atlas)) for _ in range(n)]

        # the warm-up fills the page cache and the memory maps
        rounds = interleave({m.__name__: repeated(m, n) for m, n in batches.items()}, 3)
    for method, n in batches.items():
        rate = n * BATCH * (1 + K) / rounds.median(method.__name__)
        print(f"{method.__name__:>14}: {rate:10.0f} patches/s (median of 3 interleaved rounds)")
    speedups = [batches[gather] * r for r in rounds.ratios("load_per_pair", "gather")]
    print("gather / load_per_pair per round: " + ", ".join(f"{s:.0f}x" for s in speedups))


if __name__ == "__main__":
    main()
