"""Multi-process training: process-group set-up from torchrun, and MoCo's collectives.

Launch one process per GPU with torchrun (NCCL on GPUs, Gloo on CPU, chosen automatically):

    # one node, 4 GPUs
    torchrun --nproc-per-node=4 -m drasclr.cli train --config run.yaml
    # two nodes, 4 GPUs each: the same line on every node; HOST is node 0's address
    torchrun --nnodes=2 --node-rank=0 --nproc-per-node=4 --rdzv-backend=c10d \
        --rdzv-endpoint=HOST:29500 --rdzv-id=RUN_NAME --max-restarts=3 \
        -m drasclr.cli train --config run.yaml --bank-sharding landmark
    # (on node 1: --node-rank=1; the c10d rendezvous assigns the ranks)

``batch_size`` in the config is the global batch; each process trains on its share. With
``--max-restarts=N`` torchrun restarts the whole group when a worker dies, up to N times, and
the run continues from its last checkpoint (``resume: true``, the default): the same steps
follow, none lost or repeated. With several nodes ``out_dir`` must be on a file system every
node sees. ``bank_sharding: landmark`` keeps ~1/W of the memory bank per process
(`drasclr.pretrain.memory_bank`) and lets a run resume on a different number of processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(use_cuda: bool) -> ProcessInfo:
    """Join the process group torchrun describes in the environment (no-op when alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ProcessInfo()
    info = ProcessInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=_attempt_store(),
                                rank=info.rank, world_size=world_size)
    return info


def _attempt_store() -> dist.Store:
    """The rendezvous store torchrun describes, with keys scoped to this restart attempt.

    torchrun's c10d rendezvous keeps one TCP store for all restarts of a group
    (``--max-restarts``), so the Gloo/NCCL addresses the dead attempt published are still
    there when the restarted workers look theirs up; a worker that reads a dead peer's address
    first fails with "Connection refused". A prefix per attempt (TORCHELASTIC_RESTART_COUNT)
    makes each attempt see only its own keys.
    """
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_sizes(count: int, device: torch.device) -> list[int]:
    """Every rank's ``count`` (e.g. its batch size), in rank order."""
    sizes = concat_all_gather(torch.tensor([count], device=device))
    return sizes.tolist()


@torch.no_grad()
def concat_all_gather(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order (no gradient).

    ``sizes``: every rank's length along dim 0 when they differ (`gather_sizes`); the parts
    are padded to the longest for the collective and cut back after it.
    """
    if world_size() == 1:
        return tensor
    longest = len(tensor) if sizes is None else max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    if sizes is None:
        return torch.cat(parts)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def all_to_all(tensor: Tensor, send_sizes: list[int], receive_sizes: list[int]) -> Tensor:
    """Send rows ``tensor[sum(send_sizes[:r]) : ...]`` to rank r; receive in rank order."""
    received = tensor.new_empty((sum(receive_sizes), *tensor.shape[1:]))
    dist.all_to_all_single(received, tensor.contiguous(), receive_sizes, send_sizes)
    return received
