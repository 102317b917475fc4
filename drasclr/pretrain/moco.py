"""The DrasCLR model: query encoder, momentum key encoder, per-landmark memory bank.

Yu et al. 2023, Sections 2.3-2.5 and 3 (MoCo v2 with a conditional memory bank). One ``forward`` is
one training step's computation: encode both views and the neighbours, update the key encoder,
compute the local and neighbour losses against the landmarks' queues, enqueue the keys of all
processes. Keys go through the key encoder with the same landmark grouping as the queries; under
DDP with ``shuffle_bn`` the keys are encoded on a batch shuffled across processes (MoCo's shuffled
BatchNorm) and un-shuffled afterwards; on one process, ``key_bn_splits`` random sub-batches stand
in for the processes.

With a landmark-sharded bank (``bank_landmarks`` given, see `drasclr.pretrain.memory_bank`)
every process's batch holds only landmarks whose queues it holds, so queries are scored and
keys enqueued locally; the only key traffic is returning each shuffled-BN key to the process
that drew its sample (one all-to-all of B x D), instead of every process gathering all B keys.
Processes may draw batches of different sizes (a landmark-sharded epoch splits each process's
pairs evenly over the epoch's steps), so the exchanges carry every process's batch size.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drasclr.conv_common import LandmarkPartition
from drasclr.pretrain.distributed import all_to_all, concat_all_gather, gather_sizes, world_size
from drasclr.pretrain.losses import LossOutput, drasclr_loss
from drasclr.pretrain.memory_bank import LandmarkMemoryBank


class DrasCLR(nn.Module):
    """Query/key encoders and the memory bank.

    Args:
        encoder: the query encoder (a `drasclr.nn.Encoder`); the key encoder is its copy.
        num_landmarks: L, one queue per landmark.
        queue_size: K (4096 in the paper).
        temperature: T (0.2).
        momentum: m of the key encoder update (0.999).
        beta: weight of the neighbour loss (1.0).
        neighbour_mode: "sum" (reference) or "mean".
        bank_dtype: float32 or bfloat16 storage.
        shuffle_bn: shuffle keys across processes for BatchNorm under DDP; on one process,
            shuffle them and encode them in ``key_bn_splits`` sub-batches.
        key_bn_splits: sub-batches of the shuffled keys on one process (1: the whole batch).
        generator: random source of the bank's initial keys.
        bank_landmarks: the landmarks whose queues this process holds (landmark sharding;
            every batch it is given must hold only these), or None: all of them, replicated.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_landmarks: int,
        queue_size: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.999,
        beta: float = 1.0,
        neighbour_mode: str = "sum",
        bank_dtype: torch.dtype = torch.float32,
        shuffle_bn: bool = True,
        generator: torch.Generator | None = None,
        bank_landmarks=None,
        key_bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.temperature, self.momentum, self.beta = temperature, momentum, beta
        self.neighbour_mode, self.shuffle_bn = neighbour_mode, shuffle_bn
        self.key_bn_splits = key_bn_splits
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for param in self.encoder_k.parameters():
            param.requires_grad_(False)
        self.sharded = bank_landmarks is not None
        self.bank = LandmarkMemoryBank(
            num_landmarks, queue_size, encoder.config["moco_dim"], bank_dtype, generator, bank_landmarks
        )

    def embed(self, encoder: nn.Module, x: Tensor, partition: LandmarkPartition) -> Tensor:
        """Unit projection z / |z| of patches ``x`` (N, 1, P, P, P), in float32."""
        return F.normalize(encoder.head(encoder(x, partition)).float(), dim=1)

    def forward(
        self,
        view_q: Tensor,
        view_k: Tensor,
        neighbours: Tensor,
        loc: Tensor,
        neighbour_loc: Tensor,
        landmark: Tensor,
        shuffle_generator: torch.Generator | None = None,
    ) -> LossOutput:
        """One step's losses; updates the key encoder and enqueues the keys.

        Args:
            view_q, view_k: (B, 1, P, P, P) two augmented views of the central patches.
            neighbours: (B, k, 1, P, P, P) augmented neighbour patches (k may be 0).
            loc: (B, 3) and neighbour_loc (B, k, 3): normalised atlas coordinates.
            landmark: (B,) landmark indices of the central patches.
            shuffle_generator: the same-seeded generator on every process (shuffled BN).
        """
        batch, k = neighbours.shape[:2]
        partition = LandmarkPartition.from_loc(loc, batch)
        query = self.embed(self.encoder_q, view_q, partition)
        neighbour_query = None
        if k:
            flat_loc = neighbour_loc.reshape(-1, 3)
            neighbour_partition = LandmarkPartition.from_loc(flat_loc, len(flat_loc))
            neighbour_query = self.embed(
                self.encoder_q, neighbours.flatten(0, 1), neighbour_partition
            ).view(batch, k, -1)

        with torch.no_grad():
            self._momentum_update_key_encoder()
            key, enqueued_keys, enqueued_landmarks = self._encode_keys(view_k, loc, landmark, partition,
                                                                       shuffle_generator)

        out = drasclr_loss(
            query, key, neighbour_query, self.bank, landmark, partition,
            self.temperature, self.beta, self.neighbour_mode,
        )
        self._dequeue_and_enqueue(enqueued_keys, enqueued_landmarks)
        return out

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """encoder_k <- m * encoder_k + (1 - m) * encoder_q, all parameters in one fused op."""
        params_k = [p for p in self.encoder_k.parameters()]
        params_q = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(params_k, params_q, 1.0 - self.momentum)

    @torch.no_grad()
    def _encode_keys(
        self, view_k: Tensor, loc: Tensor, landmark: Tensor, partition: LandmarkPartition,
        shuffle_generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This process's keys, and the keys and landmarks to enqueue here: all processes'
        (rank order) for a replicated bank, this process's own for a landmark-sharded one."""
        processes = world_size()
        if processes == 1:
            if self.shuffle_bn and self.key_bn_splits > 1:
                key = self._split_shuffled_keys(view_k, loc, shuffle_generator)
            else:
                key = self.embed(self.encoder_k, view_k, partition)
            return key, key, landmark
        sizes = gather_sizes(len(view_k), view_k.device)
        if not self.shuffle_bn:
            key = self.embed(self.encoder_k, view_k, partition)
            if self.sharded:
                return key, key, landmark
            return key, concat_all_gather(key, sizes), concat_all_gather(landmark, sizes)
        rank = torch.distributed.get_rank()
        offsets = [0, *itertools.accumulate(sizes)]
        all_views, all_loc = concat_all_gather(view_k, sizes), concat_all_gather(loc, sizes)
        # every process draws the same permutation from its identically seeded generator
        shuffle = torch.randperm(offsets[-1], generator=shuffle_generator, device=view_k.device)
        mine = shuffle[offsets[rank] : offsets[rank + 1]]
        shuffled_key = self.embed(
            self.encoder_k, all_views[mine], LandmarkPartition.from_loc(all_loc[mine], len(mine))
        )
        return unshuffle_keys(shuffled_key, shuffle, offsets, landmark, self.sharded)

    @torch.no_grad()
    def _split_shuffled_keys(self, view_k: Tensor, loc: Tensor,
                             shuffle_generator: torch.Generator | None) -> Tensor:
        """Keys encoded in ``key_bn_splits`` random sub-batches, back in batch order.

        One process's stand-in for shuffled BN (MoCo's single-GPU SplitBatchNorm): with the
        whole batch in one BatchNorm pass a key and its query share the batch's statistics,
        a cue that tells the positive from the queue's older keys without looking at the
        patch. Random sub-batches give each key statistics of a different subset.
        """
        shuffle = torch.randperm(len(view_k), generator=shuffle_generator, device=view_k.device)
        parts = [
            self.embed(self.encoder_k, view_k[part], LandmarkPartition.from_loc(loc[part], len(part)))
            for part in shuffle.tensor_split(self.key_bn_splits)
        ]
        key = parts[0].new_empty(len(view_k), parts[0].shape[1])
        key[shuffle] = torch.cat(parts)
        return key

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: Tensor, landmark: Tensor) -> None:
        self.bank.enqueue(keys, landmark)


@torch.no_grad()
def unshuffle_keys(
    shuffled_key: Tensor, shuffle: Tensor, offsets: list[int], landmark: Tensor, sharded: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """After the shuffled-BN key encoding: this process's keys, and the keys and landmarks it
    enqueues (all processes' for a replicated bank, its own for a landmark-sharded one).

    ``shuffle`` (N,) maps shuffled positions to global sample indices; this process encoded
    ``shuffled_key``, the samples ``shuffle[offsets[rank]:offsets[rank + 1]]``.
    """
    rank = torch.distributed.get_rank()
    if sharded:
        key = return_to_drawers(shuffled_key, shuffle, offsets, rank)
        return key, key, landmark
    sizes = [hi - lo for lo, hi in itertools.pairwise(offsets)]
    all_keys = concat_all_gather(shuffled_key, sizes)[torch.argsort(shuffle)]
    return all_keys[offsets[rank] : offsets[rank + 1]], all_keys, concat_all_gather(landmark, sizes)


def return_to_drawers(encoded: Tensor, shuffle: Tensor, offsets: list[int], rank: int) -> Tensor:
    """Undo the key shuffle with one all-to-all: each process gets back only its own keys.

    ``shuffle`` (N,) maps shuffled positions to global sample indices; process j encoded the
    samples ``shuffle[offsets[j]:offsets[j + 1]]`` (``encoded`` holds this process's part)
    and sample i was drawn by the process r with ``offsets[r] <= i < offsets[r + 1]``.
    """
    boundaries = torch.tensor(offsets[1:-1], device=shuffle.device)
    drawer = torch.bucketize(shuffle, boundaries, right=True)  # who drew each shuffled sample
    encoder_of = torch.bucketize(torch.arange(len(shuffle), device=shuffle.device), boundaries, right=True)
    processes = len(offsets) - 1
    my_drawers = drawer[offsets[rank] : offsets[rank + 1]]
    send_order = torch.argsort(my_drawers, stable=True)
    mine = drawer == rank  # positions of my samples, ascending: grouped by encoder, in its order
    received = all_to_all(
        encoded[send_order],
        torch.bincount(my_drawers, minlength=processes).tolist(),
        torch.bincount(encoder_of[mine], minlength=processes).tolist(),
    )
    key = torch.empty_like(received)
    key[shuffle[mine] - offsets[rank]] = received
    return key
