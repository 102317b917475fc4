"""Per-landmark memory bank: one (L, K, D) ring buffer per landmark, updated in one op.

Yu et al. 2023, Section 3 (the conditional memory bank): one queue of K = 4096 L2-normalised keys
per landmark, filled with random unit vectors at start; each step enqueues the new keys into their
own landmark's queue. The authors' code stores (D, K, L) and trains one landmark per batch; here a
batch mixes landmarks, so

- `enqueue` places a mixed-landmark batch with one scatter: each key's slot is its landmark's
  pointer plus its rank among the batch's keys of that landmark (a cumulative count over the
  batch sorted by landmark), modulo K. No Python loop over landmarks, no host sync.
- `negative_logits` scores every query against its own landmark's queue only, without a
  (B, K, D) copy: queries are laid out as (G, n, D) by landmark group and multiplied with the
  G queues (G, D, K) in one bmm.

Sharding across processes (``bank_sharding: landmark``). At the paper's size (L = 581, K =
4096, D = 128, float32) the bank is 1162 MiB on every process when replicated. Sharded, each
process holds the queues of the landmarks it owns, l % W == rank (`owned_landmarks`: round
robin, so W processes own floor or ceil(L / W) each, never none): 582 MiB on 2 processes,
292 MiB on 4. ``keys`` is then (L_local, K, D) and ``landmarks`` the global indices held.

How queries meet their queues: every process draws batches of its own landmarks only
(`drasclr.pretrain.sampler.OwnedLandmarkBatchSampler`), so scoring and enqueueing are local.
The only key traffic left is shuffled BatchNorm's: keys encoded on a batch shuffled across
processes go back to the process that drew their sample (`drasclr.pretrain.moco.
return_to_drawers`, one all-to-all). Bytes one process sends per step (b = B / W samples,
paper size, B = 128, W = 4, so b = 32):

- chosen (own-landmark batches): b * D * 4 * (W - 1) / W = 12 KiB;
- replicated bank (all keys and landmarks to every process): (W - 1) * b * (4D + 8) = 49 KiB;
- batches of any landmark with an exchange with the owners: queries and summed neighbour
  embeddings to the owners and their K logits back, 2 * b * (D + K) * 4 * (W - 1) / W = 792
  KiB, plus the keys (12 KiB); shipping the owners' queues instead costs 2 MiB per landmark.

The choice moves 4x less than the replicated bank and ~67x less than the exchange, needs no
extra round trip in the loss, and keeps the loss in expectation: a query's negatives are its
own landmark's queue either way, every (subject, landmark) pair is still drawn once per epoch,
and keys are still encoded on batches mixed across processes. Measured with Gloo in
`benchmarks/RESULTS.md` ("Memory bank sharding"; `benchmarks/bench_bank_sharding.py`). Common
to all three and unchanged: shuffled BN gathers the key views, (W - 1) * b * 32^3 * 4 = 12 MiB.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drasclr.conv_common import LandmarkPartition


def owned_landmarks(num_landmarks: int, rank: int, world_size: int) -> np.ndarray:
    """The global indices of the landmarks process ``rank`` owns under landmark sharding.

    Round robin, ``l % world_size == rank``: every process owns floor or ceil(L / W) landmarks
    (never none), and a landmark's owner is ``l % W`` without a table.
    """
    if world_size > num_landmarks:
        raise ValueError(
            f"bank_sharding='landmark': {world_size} processes but only {num_landmarks} landmarks; "
            "every process must own at least one landmark queue (use fewer processes or "
            "bank_sharding='replicated')"
        )
    return np.arange(rank, num_landmarks, world_size)


class LandmarkMemoryBank(nn.Module):
    """``keys`` (L_local, K, D) and ``pointers`` (L_local,): the queues of the landmarks this
    process holds, global indices ``landmarks`` (L_local,), and the next slot of each queue.

    Methods take global landmark indices; every one must be held here.

    Args:
        num_landmarks: L, landmarks of the atlas.
        queue_size: K, negatives per landmark.
        dim: D, key size (the projection head's output).
        dtype: storage dtype, float32 or bfloat16 (logits are computed in the query's dtype).
        generator: random source of the initial unit vectors (for reproducible runs).
        landmarks: the global indices held here (sorted, distinct); None: all L (replicated).
            Initial rows are drawn landmark by landmark for all L, so a shard's rows equal the
            replicated bank's rows of the same landmarks, without ever allocating all of them.
    """

    def __init__(
        self,
        num_landmarks: int,
        queue_size: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        landmarks: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if min(num_landmarks, queue_size, dim) < 1:
            raise ValueError(
                f"memory bank: sizes must be >= 1, got L={num_landmarks}, K={queue_size}, D={dim}"
            )
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"memory bank: dtype must be float32 or bfloat16, got {dtype}")
        held = np.arange(num_landmarks) if landmarks is None else np.asarray(landmarks, dtype=np.int64)
        if len(held) == 0 or np.any(np.diff(held) <= 0) or held[0] < 0 or held[-1] >= num_landmarks:
            raise ValueError(
                f"memory bank: landmarks must be distinct sorted indices in 0..{num_landmarks - 1}, "
                f"got {held.tolist()}"
            )
        keys = torch.empty(len(held), queue_size, dim, dtype=dtype)
        row = 0
        for landmark in range(num_landmarks):
            draw = torch.randn(queue_size, dim, generator=generator)
            if row < len(held) and held[row] == landmark:
                keys[row] = F.normalize(draw, dim=-1)
                row += 1
        local_index = torch.full((num_landmarks,), -1, dtype=torch.long)
        local_index[torch.from_numpy(held)] = torch.arange(len(held))
        self.register_buffer("keys", keys)
        self.register_buffer("pointers", torch.zeros(len(held), dtype=torch.long))
        # derived from the constructor's arguments, so not part of the state dict
        self.register_buffer("landmarks", torch.from_numpy(held), persistent=False)
        self.register_buffer("local_index", local_index, persistent=False)

    @property
    def num_landmarks(self) -> int:
        """L, all landmarks (``len(bank.landmarks)`` are held here)."""
        return len(self.local_index)

    @property
    def queue_size(self) -> int:
        return self.keys.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, landmark: Tensor) -> None:
        """Write ``keys`` (N, D) into the queues of ``landmark`` (N,) in one scatter.

        Keys of one landmark land in batch order starting at that landmark's pointer and wrap
        around the ring. A landmark must receive at most K keys per call (checked in
        `TrainConfig.validate`, not here, to keep this free of host syncs).
        """
        held, queue_size, _ = self.keys.shape
        landmark = self.local_index[landmark]
        order = torch.argsort(landmark, stable=True)
        sorted_landmark = landmark[order]
        counts = torch.bincount(landmark, minlength=held)
        first_of_landmark = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(landmark), device=landmark.device) - first_of_landmark[sorted_landmark]
        slot = (self.pointers[sorted_landmark] + rank) % queue_size
        self.keys[sorted_landmark, slot] = keys[order].to(self.keys.dtype)
        self.pointers.add_(counts).remainder_(queue_size)

    def negative_logits(self, query: Tensor, landmark: Tensor, partition: LandmarkPartition) -> Tensor:
        """(B, K) dot products of each query with the queue of its own landmark.

        Args:
            query: (B, D).
            landmark: (B,) long, the landmark index of each query.
            partition: the batch's grouping by landmark (as given to the encoder); every group
                must hold a single landmark index.
        """
        sorted_group = partition.index[partition.order]
        group_landmark = self.local_index[landmark[partition.order[partition.offsets[:-1]]]]
        queues = self.keys.index_select(0, group_landmark).to(query.dtype)
        if partition.uniform:  # landmark-grouped batches: a plain reshape, no padding
            laid_out = query[partition.order].view(partition.num_landmarks, partition.counts[0], -1)
            sorted_logits = torch.bmm(laid_out, queues.transpose(1, 2)).flatten(0, 1)
        else:
            position = torch.arange(len(sorted_group), device=query.device)
            position = position - partition.offsets[sorted_group]
            laid_out = query.new_zeros(partition.num_landmarks, max(partition.counts), query.shape[1])
            laid_out = laid_out.index_put((sorted_group, position), query[partition.order])
            sorted_logits = torch.bmm(laid_out, queues.transpose(1, 2))[sorted_group, position]
        return sorted_logits.new_empty(sorted_logits.shape).index_copy(0, partition.order, sorted_logits)
