"""Per-landmark memory bank: one (L, K, D) ring buffer per landmark, updated in one op.

SPEC section 7: one queue of K = 4096 L2-normalised keys per landmark, filled with random unit
vectors at start; each step enqueues the new keys into their own landmark's queue. The
reference stores (D, K, L) and trains one landmark per batch; here a batch mixes landmarks, so

- `enqueue` places a mixed-landmark batch with one scatter: each key's slot is its landmark's
  pointer plus its rank among the batch's keys of that landmark (a cumulative count over the
  batch sorted by landmark), modulo K. No Python loop over landmarks, no host sync.
- `negative_logits` scores every query against its own landmark's queue only, without a
  (B, K, D) copy: queries are laid out as (G, n, D) by landmark group and multiplied with the
  G queues (G, D, K) in one bmm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drasclr.conv_common import LandmarkGroups


class LandmarkMemoryBank(nn.Module):
    """``keys`` (L, K, D) and ``pointers`` (L,): the next slot to overwrite in each queue.

    Args:
        num_landmarks: L.
        queue_size: K, negatives per landmark.
        dim: D, key size (the projection head's output).
        dtype: storage dtype, float32 or bfloat16 (logits are computed in the query's dtype).
        generator: random source of the initial unit vectors (for reproducible runs).
    """

    def __init__(
        self,
        num_landmarks: int,
        queue_size: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if min(num_landmarks, queue_size, dim) < 1:
            raise ValueError(
                f"memory bank: sizes must be >= 1, got L={num_landmarks}, K={queue_size}, D={dim}"
            )
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"memory bank: dtype must be float32 or bfloat16, got {dtype}")
        keys = torch.randn(num_landmarks, queue_size, dim, generator=generator)
        self.register_buffer("keys", F.normalize(keys, dim=-1).to(dtype))
        self.register_buffer("pointers", torch.zeros(num_landmarks, dtype=torch.long))

    @property
    def num_landmarks(self) -> int:
        return self.keys.shape[0]

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
        num_landmarks, queue_size, _ = self.keys.shape
        order = torch.argsort(landmark, stable=True)
        sorted_landmark = landmark[order]
        counts = torch.bincount(landmark, minlength=num_landmarks)
        first_of_landmark = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(landmark), device=landmark.device) - first_of_landmark[sorted_landmark]
        slot = (self.pointers[sorted_landmark] + rank) % queue_size
        self.keys[sorted_landmark, slot] = keys[order].to(self.keys.dtype)
        self.pointers.add_(counts).remainder_(queue_size)

    def negative_logits(self, query: Tensor, landmark: Tensor, groups: LandmarkGroups) -> Tensor:
        """(B, K) dot products of each query with the queue of its own landmark.

        Args:
            query: (B, D).
            landmark: (B,) long, the landmark index of each query.
            groups: the batch's grouping by landmark (as given to the encoder); every group
                must hold a single landmark index.
        """
        sorted_group = groups.index[groups.order]
        group_landmark = landmark[groups.order[groups.offsets[:-1]]]
        queues = self.keys.index_select(0, group_landmark).to(query.dtype)
        if groups.uniform:  # landmark-grouped batches: a plain reshape, no padding
            laid_out = query[groups.order].view(groups.num_groups, groups.counts[0], -1)
            sorted_logits = torch.bmm(laid_out, queues.transpose(1, 2)).flatten(0, 1)
        else:
            position = torch.arange(len(sorted_group), device=query.device)
            position = position - groups.offsets[sorted_group]
            laid_out = query.new_zeros(groups.num_groups, max(groups.counts), query.shape[1])
            laid_out = laid_out.index_put((sorted_group, position), query[groups.order])
            sorted_logits = torch.bmm(laid_out, queues.transpose(1, 2))[sorted_group, position]
        return sorted_logits.new_empty(sorted_logits.shape).index_copy(0, groups.order, sorted_logits)
