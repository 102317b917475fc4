"""Epoch plans of landmark-grouped batches: every (subject, landmark) pair once per epoch.

A batch holds ``landmarks_per_batch`` landmarks x ``batch_size / landmarks_per_batch``
subjects, so every Loc-CondConv layer mixes one kernel per landmark and each landmark's
negatives are one (n, D) x (D, K) matmul. ``landmarks_per_batch = 1`` is the reference's mode
(one landmark per batch). The plan is a pure function of (seed, epoch): a resumed run asks for
the same epoch and skips the batches it already trained on.

How a plan is built: per landmark, the subjects are shuffled and cut into chunks of n (the last
chunk of a landmark is shorter when n does not divide the subject count); chunk round r lists
the landmarks' r-th chunks ("cells") in a fresh random landmark order, rounds follow each other,
and each batch takes the next ``landmarks_per_batch`` cells. So a batch holds distinct
landmarks, except across a round boundary when the group size does not divide L.
Under DDP every global batch is split into ``world_size`` contiguous, equal parts (whole
landmark groups when the group count divides); a tail batch whose size the process count does
not divide loses its last few pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """One step's pairs for this process: ``index`` in the epoch, subject and landmark ids."""

    index: int
    subjects: np.ndarray
    landmarks: np.ndarray


class LandmarkBatchSampler:
    """Deterministic, resumable, DDP-aware plan of landmark-grouped batches.

    Args:
        num_subjects: S, subjects in the store.
        num_landmarks: L, landmarks of the atlas.
        batch_size: global pairs per batch (over all processes).
        landmarks_per_batch: G; batch_size must be a multiple.
        seed: base seed; epoch e uses the stream (seed, e).
        rank, world_size: this process and the number of processes.
    """

    def __init__(
        self,
        num_subjects: int,
        num_landmarks: int,
        batch_size: int,
        landmarks_per_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % landmarks_per_batch:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by landmarks_per_batch {landmarks_per_batch}"
            )
        if landmarks_per_batch > num_landmarks:
            raise ValueError(
                f"landmarks_per_batch {landmarks_per_batch} exceeds the {num_landmarks} landmarks"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_subjects, self.num_landmarks = num_subjects, num_landmarks
        self.landmarks_per_batch = landmarks_per_batch
        self.subjects_per_landmark = batch_size // landmarks_per_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self) -> int:
        """Batches per epoch."""
        chunks = -(-self.num_subjects // self.subjects_per_landmark)
        return -(-self.num_landmarks * chunks // self.landmarks_per_batch)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The global epoch: subjects (S*L,), landmarks (S*L,), batch offsets (len + 1,)."""
        rng = np.random.default_rng([self.seed, epoch])
        num_subjects, num_landmarks, n = self.num_subjects, self.num_landmarks, self.subjects_per_landmark
        chunks = -(-num_subjects // n)
        shuffled = rng.permuted(np.tile(np.arange(num_subjects), (num_landmarks, 1)), axis=1)
        padded = np.full((num_landmarks, chunks * n), -1, dtype=np.int64)
        padded[:, :num_subjects] = shuffled
        landmark_order = rng.permuted(np.tile(np.arange(num_landmarks), (chunks, 1)), axis=1)
        cells = (landmark_order * chunks + np.arange(chunks)[:, None]).ravel()  # round-major
        cell_subjects = padded.reshape(num_landmarks * chunks, n)[cells]
        cell_landmarks = np.repeat(cells // chunks, n).reshape(-1, n)
        valid = cell_subjects >= 0
        cell_sizes = valid.sum(1)
        batch_ends = np.cumsum(cell_sizes)[self.landmarks_per_batch - 1 :: self.landmarks_per_batch]
        if len(cell_sizes) % self.landmarks_per_batch:
            batch_ends = np.append(batch_ends, cell_sizes.sum())
        offsets = np.concatenate([[0], batch_ends])
        return cell_subjects[valid], cell_landmarks[valid], offsets

    def batches(self, epoch: int, start: int = 0):
        """This process's batches of ``epoch`` from batch ``start`` on (to resume mid-epoch)."""
        subjects, landmarks, offsets = self.plan(epoch)
        for index in range(start, len(offsets) - 1):
            lo, hi = offsets[index], offsets[index + 1]
            share = (hi - lo) // self.world_size
            if share == 0:
                continue
            lo += self.rank * share
            yield Batch(index, subjects[lo : lo + share], landmarks[lo : lo + share])
