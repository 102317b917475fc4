"""One process of a landmark-sharded test run, launched by torchrun (or forked by the tests).

    torchrun ... tests/sharded_worker.py STORE ATLAS OUT_DIR MAX_STEPS [--kill-at STEP --marker FILE]

Trains with the tests' tiny settings and writes ``OUT_DIR/result_rank<R>.pt``: the bank shard
this process holds, the step counter and the loss history. With ``--kill-at``, the last
process SIGKILLs itself when it is about to train step ``STEP + 1`` (after the checkpoint of
step STEP is complete), once: the marker file, created first, stops the restarted run from
dying again.
"""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch

import drasclr
from drasclr.pretrain.trainer import Trainer

TINY_SHARDED = dict(batch_size=8, landmarks_per_batch=4, queue_size=8, num_experts=2, rep_dim=16,
                    moco_dim=16, k_neighbours=1, progress=False, tensorboard=False, backend="grouped",
                    device="cpu", bank_sharding="landmark", checkpoint_every=2, epochs=3)


def train_and_record(store: str, atlas: str, out_dir: str, max_steps: int) -> None:
    torch.set_num_threads(1)
    result = drasclr.train(store=store, atlas=atlas, out_dir=out_dir, max_steps=max_steps, **TINY_SHARDED)
    bank = result.model.bank
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"keys": bank.keys, "pointers": bank.pointers, "landmarks": bank.landmarks,
                "encoder_q": result.model.encoder_q.state_dict(), "history": result.history,
                "checkpoint": str(result.checkpoint)},
               Path(out_dir) / f"result_rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def die_once_at(step: int, marker: Path) -> None:
    """Make the last process SIGKILL itself before training step ``step + 1``, once."""
    original = Trainer._train_step

    def train_step(self, batch):
        if self.step == step and self.process.rank == self.process.world_size - 1:
            try:
                marker.open("x").close()  # exclusive create: only the first run gets here
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch)

    Trainer._train_step = train_step


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("atlas")
    parser.add_argument("out_dir")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--marker", type=Path)
    args = parser.parse_args()
    if args.kill_at is not None:
        die_once_at(args.kill_at, args.marker)
    train_and_record(args.store, args.atlas, args.out_dir, args.max_steps)
