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

With a landmark-sharded bank, `OwnedLandmarkBatchSampler` plans instead: each process draws
only pairs of the landmarks it owns (`drasclr.pretrain.memory_bank.owned_landmarks`), so its
bank work needs no other process. Its pairs are laid out like the plan above (per landmark,
shuffled subjects cut into chunks of n; rounds of chunks in random landmark order) and cut
into the epoch's steps, ceil(S * L / batch_size) of them, as evenly as possible. Processes
own floor or ceil(L / W) landmarks, so their batches can differ by a few pairs (the trainer
weights each process's loss by its share of the global batch, which keeps the gradient the
mean over all pairs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drasclr.pretrain.memory_bank import owned_landmarks


@dataclass(frozen=True)
class Batch:
    """One step's pairs for this process: ``index`` in the epoch, subject and landmark ids."""

    index: int
    subjects: np.ndarray
    landmarks: np.ndarray
    global_size: int = 0  # pairs of this step over all processes (0: world_size x len)


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


@dataclass(frozen=True)
class Segment:
    """Where an epoch's plan under one process count starts: step ``start`` with ``consumed[l]``
    pairs of landmark l already trained on (each landmark's subjects are drawn in one fixed
    order per epoch, so a count says which). A run resumed on another process count plans the
    rest of the epoch from a new segment: every pair is still trained on exactly once."""

    start: int
    world_size: int
    consumed: np.ndarray

    def to_dict(self) -> dict:
        return {"start": self.start, "world_size": self.world_size, "consumed": self.consumed.tolist()}

    @classmethod
    def from_dict(cls, values: dict) -> "Segment":
        return cls(values["start"], values["world_size"], np.asarray(values["consumed"], dtype=np.int64))


class OwnedLandmarkBatchSampler(LandmarkBatchSampler):
    """Deterministic, resumable plan of batches that hold only this process's own landmarks.

    Same arguments as `LandmarkBatchSampler`; n = batch_size / landmarks_per_batch subjects of
    one landmark travel together (a chunk), and ``plan`` is not used.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        owned_landmarks(self.num_landmarks, self.rank, self.world_size)  # enough landmarks?
        self.chunk = self.subjects_per_landmark
        self.batch_size = self.chunk * self.landmarks_per_batch

    def __len__(self) -> int:
        """Steps per epoch, the same for every process count."""
        return -(-self.num_subjects * self.num_landmarks // self.batch_size)

    def first_segment(self) -> Segment:
        return Segment(0, self.world_size, np.zeros(self.num_landmarks, dtype=np.int64))

    def _subject_orders(self, epoch: int) -> np.ndarray:
        """(L, S): the order in which each landmark's subjects are drawn in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permuted(np.tile(np.arange(self.num_subjects), (self.num_landmarks, 1)), axis=1)

    def _stream(self, epoch: int, segment: Segment, rank: int, orders: np.ndarray):
        """Process ``rank``'s remaining pairs of the epoch in order, and its step boundaries."""
        owned = owned_landmarks(self.num_landmarks, rank, segment.world_size)
        rng = np.random.default_rng([self.seed, epoch, segment.world_size, rank, segment.start])
        chunks = {l: np.array_split(orders[l, segment.consumed[l]:],
                                    range(self.chunk, self.num_subjects, self.chunk)) for l in owned}
        subjects, landmarks = [], []
        for round_ in range(-(-self.num_subjects // self.chunk)):
            for landmark in rng.permutation(owned):
                if round_ < len(chunks[landmark]) and len(chunks[landmark][round_]):
                    subjects.append(chunks[landmark][round_])
                    landmarks.append(np.full(len(subjects[-1]), landmark))
        subjects = np.concatenate(subjects) if subjects else np.zeros(0, np.int64)
        landmarks = np.concatenate(landmarks) if landmarks else np.zeros(0, np.int64)
        steps = len(self) - segment.start
        sizes = np.full(steps, len(subjects) // steps) + (np.arange(steps) < len(subjects) % steps)
        if sizes[-1] < 2:  # BatchNorm needs two samples
            raise ValueError(
                f"bank_sharding='landmark': process {rank} of {segment.world_size} has only "
                f"{len(subjects)} pairs for {steps} steps, fewer than 2 per batch; use fewer "
                "processes or a larger batch_size"
            )
        return subjects, landmarks, np.concatenate([[0], np.cumsum(sizes)])

    def resegment(self, epoch: int, segment: Segment, step: int) -> Segment:
        """The segment that continues ``segment``'s plan from ``step`` on this process count."""
        orders, consumed = self._subject_orders(epoch), segment.consumed.copy()
        for rank in range(segment.world_size):
            _, landmarks, offsets = self._stream(epoch, segment, rank, orders)
            np.add.at(consumed, landmarks[: offsets[step - segment.start]], 1)
        return Segment(step, self.world_size, consumed)

    def batches(self, epoch: int, start: int = 0, segment: Segment | None = None):
        """This process's batches of ``epoch`` from step ``start`` on, under ``segment``."""
        segment = segment or self.first_segment()
        if segment.world_size != self.world_size:
            raise ValueError(f"segment planned for {segment.world_size} processes, this run has "
                             f"{self.world_size}; use resegment()")
        orders = self._subject_orders(epoch)
        streams = [self._stream(epoch, segment, rank, orders) for rank in range(self.world_size)]
        subjects, landmarks, offsets = streams[self.rank]
        global_sizes = sum(np.diff(stream[2]) for stream in streams)
        for step in range(start - segment.start, len(offsets) - 1):
            lo, hi = offsets[step], offsets[step + 1]
            yield Batch(segment.start + step, subjects[lo:hi], landmarks[lo:hi], int(global_sizes[step]))
