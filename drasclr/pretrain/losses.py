"""DrasCLR's two contrastive losses against per-landmark queues
(Yu et al. 2023, eqs. 6 and 8; docs/method.md#losses).

For a central patch x_ij with query q = e_q(view 1), positive key k+ = e_k(view 2) and the
queue n_1..n_K of landmark j (all unit vectors):

- local loss: InfoNCE over the logits [q.k+, q.n_1, .., q.n_K] / T, positive = class 0;
- neighbour loss, "sum" (the reference's form, default): the k neighbours' unit embeddings
  r_1..r_k are summed into one logit per candidate, [sum_l r_l.k+, sum_l r_l.n_1, ..] / T;
  "mean": one InfoNCE per neighbour, [r_l.k+, r_l.n_1, ..] / T, averaged over l;
- total = local + beta * neighbour.

Because sum_l r_l.n = (sum_l r_l).n, the summed form scores the summed neighbour embedding
against the queue, so both losses use the same per-landmark negative matmul.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from drasclr.conv_common import LandmarkPartition
from drasclr.pretrain.memory_bank import LandmarkMemoryBank


class LossOutput(NamedTuple):
    loss: Tensor
    local_loss: Tensor
    neighbour_loss: Tensor
    local_top1: Tensor
    neighbour_top1: Tensor


def info_nce(positive: Tensor, negatives: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Cross-entropy of [positive, negatives] / T with class 0, and top-1 accuracy.

    Args:
        positive: (B,) logits of the positive pair (before the temperature).
        negatives: (B, K) logits of the negatives (before the temperature).
    """
    logits = torch.cat([positive[:, None], negatives], dim=1)
    # bf16 logits (autocast) lose the small differences InfoNCE lives on: at least float32
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    top1 = (logits.argmax(dim=1) == 0).float().mean()
    return F.cross_entropy(logits, target), top1


def drasclr_loss(
    query: Tensor,
    key: Tensor,
    neighbours: Tensor | None,
    bank: LandmarkMemoryBank,
    landmark: Tensor,
    partition: LandmarkPartition,
    temperature: float,
    beta: float = 1.0,
    neighbour_mode: str = "sum",
) -> LossOutput:
    """Local + beta * neighbour loss for a batch (Yu et al. 2023, eq. 9).

    Args:
        query: (B, D) unit query embeddings of the central patches.
        key: (B, D) unit keys of the second views (no gradient).
        neighbours: (B, k, D) unit embeddings of the neighbour patches, or None (k = 0).
        bank: the memory bank, read before this step's keys are enqueued.
        landmark: (B,) landmark index of each central patch.
        partition: the batch's grouping by landmark (from the encoder's coordinates).
        neighbour_mode: "sum" (reference) or "mean" (per-neighbour InfoNCE, averaged).
    """
    if neighbour_mode not in ("sum", "mean"):
        raise ValueError(f"neighbour_mode: expected 'sum' or 'mean', got {neighbour_mode!r}")
    key = key.detach()
    local_loss, local_top1 = info_nce(
        (query * key).sum(1), bank.negative_logits(query, landmark, partition), temperature
    )
    if neighbours is None or neighbours.shape[1] == 0:
        zero = local_loss.new_zeros(())
        return LossOutput(local_loss, local_loss, zero, local_top1, zero)
    if neighbour_mode == "sum":
        summed = neighbours.sum(1)
        neighbour_loss, neighbour_top1 = info_nce(
            (summed * key).sum(1), bank.negative_logits(summed, landmark, partition), temperature
        )
    else:
        k = neighbours.shape[1]
        flat = neighbours.flatten(0, 1)
        neighbour_loss, neighbour_top1 = info_nce(
            (flat * key.repeat_interleave(k, 0)).sum(1),
            bank.negative_logits(flat, landmark.repeat_interleave(k), repeat_partition(partition, k)),
            temperature,
        )
    return LossOutput(
        local_loss + beta * neighbour_loss, local_loss, neighbour_loss, local_top1, neighbour_top1
    )


def repeat_partition(partition: LandmarkPartition, repeats: int) -> LandmarkPartition:
    """The grouping of a batch whose samples are each repeated ``repeats`` times in place."""
    steps = torch.arange(repeats, device=partition.order.device)
    return LandmarkPartition(
        coords=partition.coords,
        index=partition.index.repeat_interleave(repeats),
        order=(partition.order[:, None] * repeats + steps).flatten(),
        offsets=partition.offsets * repeats,
        counts=tuple(c * repeats for c in partition.counts),
    )
