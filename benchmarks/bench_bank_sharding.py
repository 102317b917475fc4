"""Replicated vs landmark-sharded memory bank: bank memory, step time and bytes sent per process.

    python benchmarks/bench_bank_sharding.py [--processes 1 2 4] [--rounds 5] [--steps 10]

Paper-size bank (581 landmarks x K 4096 x D 128, float32), global batch 128 of 16 landmarks
x 8 subjects, Gloo on this CPU. Every process holds both banks and runs the same batches
through each, variants interleaved round by round (A, B, B, A, ...). A step is the bank's
share of a training step: undo the shuffled-BN key shuffle (`drasclr.pretrain.moco.
unshuffle_keys`: replicated gathers every process's keys and landmarks, landmark-sharded
returns each key to its drawer with one all-to-all), score the queries and the summed
neighbour embeddings against their landmarks' queues, enqueue. The encoders are left out:
they cost the same in both designs, and so does the shuffled-BN gather of the key views.

Bytes sent are measured per process as the growth of ``wchar`` in /proc/self/io over the
steps (Gloo writes its socket traffic with write/writev; the steps do no other I/O), and
printed beside the analytic count. Step time is the slowest process's median.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from drasclr.conv_common import LandmarkPartition
from drasclr.pretrain.memory_bank import LandmarkMemoryBank, owned_landmarks
from drasclr.pretrain.moco import unshuffle_keys

LANDMARKS, QUEUE, DIM = 581, 4096, 128
BATCH, SUBJECTS_PER_LANDMARK = 128, 8
VARIANTS = ("replicated", "landmark")


def bytes_sent() -> int:
    with open("/proc/self/io") as file:
        return int(next(line for line in file if line.startswith("wchar")).split()[1])


def analytic_bytes(variant: str, processes: int) -> float:
    """Bytes one process sends per step: every process's batch size (one long each), then
    keys (float32) and landmarks (long) to every other process (replicated), or each key to
    the process that drew it, (W - 1) / W of them on average (landmark)."""
    local = BATCH // processes
    sizes = 8 * (processes - 1)
    if variant == "replicated":
        return sizes + (processes - 1) * local * (DIM * 4 + 8)
    return sizes + local * DIM * 4 * (processes - 1) / processes


def worker(rank: int, processes: int, port: int, rounds: int, steps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if processes > 1:
        dist.init_process_group("gloo", rank=rank, world_size=processes)
    else:  # unshuffle_keys asks the process group for the rank; one process is its own group
        dist.init_process_group("gloo", rank=0, world_size=1)
    owned = owned_landmarks(LANDMARKS, rank, processes)
    banks = {
        "replicated": LandmarkMemoryBank(LANDMARKS, QUEUE, DIM, generator=torch.Generator().manual_seed(0)),
        "landmark": LandmarkMemoryBank(LANDMARKS, QUEUE, DIM, generator=torch.Generator().manual_seed(0),
                                       landmarks=owned),
    }
    memory = {v: (b.keys.nbytes + b.pointers.nbytes) / 2**20 for v, b in banks.items()}
    coords = torch.rand(LANDMARKS, 3, generator=torch.Generator().manual_seed(1))
    local = BATCH // processes
    offsets = [rank * local for rank in range(processes + 1)]
    times = {v: [] for v in VARIANTS}
    sent = {v: [] for v in VARIANTS}
    for round_ in range(rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            generator = torch.Generator().manual_seed(round_)
            if processes > 1:
                dist.barrier()
            before, started = bytes_sent(), time.perf_counter()
            for step in range(steps):
                landmark = torch.from_numpy(np.repeat(
                    np.random.default_rng([round_, step, rank]).choice(owned, local // SUBJECTS_PER_LANDMARK,
                                                                       replace=False),
                    SUBJECTS_PER_LANDMARK))
                partition = LandmarkPartition.from_loc(coords[landmark], local)
                query, summed, shuffled_key = (
                    F.normalize(torch.randn(local, DIM, generator=generator), dim=1) for _ in range(3))
                shuffle = torch.randperm(BATCH, generator=generator)
                key, keys, landmarks = unshuffle_keys(shuffled_key, shuffle, offsets, landmark,
                                                      sharded=variant == "landmark")
                banks[variant].negative_logits(query, landmark, partition)
                banks[variant].negative_logits(summed, landmark, partition)
                banks[variant].enqueue(keys, landmarks)
            elapsed = torch.tensor([(time.perf_counter() - started) / steps])
            if processes > 1:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[variant].append(elapsed.item())
            sent[variant].append((bytes_sent() - before) / steps)
    mean_sent = {}
    for variant in VARIANTS:
        value = torch.tensor([statistics.median(sent[variant])])
        if processes > 1:
            dist.all_reduce(value)
        mean_sent[variant] = value.item() / processes
    if rank == 0:
        results[processes] = {"memory": memory, "times": times, "sent": mean_sent}
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for processes in args.processes:
        mp.start_processes(worker, args=(processes, free_port(), args.rounds, args.steps, results),
                           nprocs=processes, start_method="fork")
    print("| processes | variant | bank MiB / process | step ms (median, min-max) | "
          "landmark / replicated time (median ratio, spread) | bytes sent / process / step "
          "(measured) | (analytic) |")
    print("|---|---|---|---|---|---|---|")
    for processes in args.processes:
        result = results[processes]
        times = result["times"]
        ratios = [b / a for a, b in zip(times["replicated"], times["landmark"])]
        for variant in VARIANTS:
            ms = [1e3 * t for t in times[variant]]
            ratio = (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                     if variant == "landmark" else "")
            print(f"| {processes} | {variant} | {result['memory'][variant]:.0f} | "
                  f"{statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f}) | {ratio} | "
                  f"{result['sent'][variant]:,.0f} | {analytic_bytes(variant, processes):,.0f} |")


if __name__ == "__main__":
    main()
