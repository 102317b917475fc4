"""Feature extraction on CPU: ``extract_features`` against a reference-style extractor.

A small synthetic patch store (random HU patches, default 16 subjects x 32 landmarks), the
paper's encoder (8 experts, rep_dim 128) with the same weights in both variants:

    ours       ``drasclr.extract_features`` as called by default: batches of whole landmarks
               (16 patches on the CPU), auto backend (grouped on CPU), the next batch read in
               a background thread;
    ours-256   the same with 256 patches per batch (the CUDA default), to show why the CPU
               default is small;
    reference  the authors' way: the loop backend, one patch at a time (eval, no_grad).

The variants run interleaved round by round (ours, ours-256, reference, ours, ...;
benchmarks/interleave.py), so that a change of load on the shared machine hits all alike; each
round's ratios compare neighbours in time. Printed: patches/s per round, the median of the
per-round ratios to the reference and their min-max, and the largest difference between ours' and
the reference's subject features (a correctness check).

    .venv/bin/python benchmarks/bench_features.py [--subjects 16] [--rounds 5]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from drasclr.data.atlas import build_atlas
from drasclr.data.store import PatchStore, create_store, write_subject
from drasclr.features import extract_features
from drasclr.intensity import normalise_hu
from drasclr.nn import Encoder
from interleave import interleave


def synthetic_store(folder: Path, subjects: int) -> PatchStore:
    """A 111 x 111 x 59 mm box of lung: 4 x 4 x 2 = 32 landmarks; random HU patches."""
    mask = np.ones((111, 111, 59), np.uint8)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "mask.nii.gz")
    atlas = build_atlas(folder / "mask.nii.gz")
    atlas.save(folder / "atlas.npz")
    create_store(folder / "store", atlas, folder / "atlas.npz")
    rng = np.random.default_rng(0)
    for i in range(subjects):
        hu = rng.normal(rng.uniform(-950, -600), 150, (atlas.num_landmarks, 32, 32, 32))
        write_subject(folder / "store", f"s{i:03d}", f"s{i}.nii.gz",
                      patches=hu.clip(-1024, 240).astype(np.int16))
    return PatchStore(folder / "store")


@torch.no_grad()
def reference_features(encoder: Encoder, store: PatchStore, coords: torch.Tensor) -> np.ndarray:
    """Subject features the way the authors' code computes them: one patch per forward pass."""
    features = np.zeros((store.num_subjects, encoder.rep_dim))
    for s in range(store.num_subjects):
        patches = store.subject_patches(s)
        for j in range(store.num_landmarks):
            x = normalise_hu(torch.from_numpy(np.array(patches[j])))[None, None]
            features[s] += encoder(x, coords[j]).numpy()[0]
    return features / store.num_landmarks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        store = synthetic_store(Path(folder), args.subjects)
        patches = store.num_subjects * store.num_landmarks
        torch.manual_seed(0)
        encoder = Encoder().eval()
        reference_encoder = Encoder(backend="loop").eval()
        reference_encoder.load_state_dict(encoder.state_dict())
        coords = torch.as_tensor(store.atlas().coords, dtype=torch.float32)

        variants = {
            "ours": lambda: extract_features(encoder, store, device="cpu", progress=False),
            "ours-256": lambda: extract_features(encoder, store, device="cpu", batch_size=256,
                                                 progress=False),
            "reference": lambda: reference_features(reference_encoder, store, coords),
        }
        expected = variants["reference"]()  # also the warm-up of every variant
        difference = max(np.abs(variants[name]().features - expected).max()
                         for name in ("ours", "ours-256")) / np.abs(expected).max()
        rounds = interleave(variants, args.rounds, warmup=False)  # warmed up just above

    print(f"{store.num_subjects} subjects x {store.num_landmarks} landmarks = {patches} patches, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} interleaved rounds")
    for name, seconds in rounds.seconds.items():
        print(f"  {name:>9}: patches/s per round " + ", ".join(f"{patches / s:.1f}" for s in seconds))
    for name in ("ours", "ours-256"):  # speed-up: the reference's time over the variant's
        print(f"  ratio {name} / reference: {rounds.describe('reference', name)}")
    print(f"  largest subject-feature difference to the reference, relative to the largest "
          f"feature: {difference:.1e}")


if __name__ == "__main__":
    main()
