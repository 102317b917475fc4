"""MoCo pretraining loop, `drasclr.train()` and the `drasclr train` command (SPEC section 7).

    drasclr train --config run.yaml [--set key=value ...]
    torchrun --nproc_per_node=4 -m drasclr.cli train --config run.yaml   # DDP, see distributed.py

Each step: read a landmark-grouped batch from the patch store, augment two views of every
patch and one of every neighbour on the device, run `DrasCLR` (losses, key update, enqueue),
SGD with a per-step cosine schedule. Checkpoints (atomic) at every epoch's end and every
``checkpoint_every`` steps hold everything needed to resume exactly; metrics go to
``metrics.csv`` and TensorBoard; a tqdm bar shows loss, top-1 of both losses and patches/s.
All randomness of a step (augmentation, key shuffling) comes from generators re-seeded from
(seed, rank, step), so a resumed run repeats the uninterrupted run's draws.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from drasclr.atomic import atomic_write_bytes, remove_stale_temporaries
from drasclr.device import resolve_device
from drasclr.pretrain.augment import PatchAugment
from drasclr.pretrain.checkpoints import LAST, RESUME_KEYS, load_checkpoint, save_checkpoint
from drasclr.pretrain.config import TrainConfig, describe
from drasclr.pretrain.dataset import EpochBatches, PatchBatches
from drasclr.pretrain.distributed import ProcessInfo, init_distributed
from drasclr.pretrain.moco import DrasCLR
from drasclr.pretrain.sampler import LandmarkBatchSampler
from drasclr.worker_exit import DataLoaderWorkerInit

ENCODER_INPUT = 32  # SPEC section 6: the encoder takes 32^3 patches
METRICS = ("loss", "local_loss", "neighbour_loss", "local_top1", "neighbour_top1")
# fields a resumed run must share with the checkpoint it continues
RESUME_FIXED = ("batch_size", "landmarks_per_batch", "queue_size", "bank_dtype", "rep_dim",
                "moco_dim", "num_experts", "conditioning", "k_neighbors", "seed")


@dataclass
class TrainResult:
    """``checkpoint``: the final full checkpoint; ``history``: one metrics dict per step;
    ``model``: the trained `DrasCLR` module (this process's copy)."""

    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)
    model: DrasCLR | None = None


def train(config: TrainConfig | str | Path | None = None, **overrides: Any) -> TrainResult:
    """Pretrain a DrasCLR encoder; see `TrainConfig` for every option.

    Args:
        config: a `TrainConfig`, a YAML/JSON file of one, or None (defaults).
        overrides: fields to change, e.g. ``train(store=..., atlas=..., max_steps=100)``.
    """
    if config is None:
        config = TrainConfig()
    elif not isinstance(config, TrainConfig):
        config = TrainConfig.load(config)
    if overrides:
        config = config.replace(**overrides)
    device = resolve_device(config.device)
    process = init_distributed(device.type == "cuda")
    if device.type == "cuda" and process.world_size > 1:
        device = torch.device("cuda", process.local_rank)
    config.validate(process.world_size)
    return Trainer(config, device, process).fit()


class Trainer:
    """One process's training run: inputs checked and model built in ``__init__``."""

    def __init__(self, config: TrainConfig, device: torch.device, process: ProcessInfo) -> None:
        from drasclr.data.atlas import Atlas
        from drasclr.data.store import PatchStore
        from drasclr.nn import Encoder

        self.config, self.device, self.process = config, device, process
        self.out_dir = Path(config.out_dir)
        store, atlas = PatchStore(config.store), Atlas.load(config.atlas)
        _check_inputs(config, store, atlas)
        store.verify_all()  # a damaged patch file stops the run here, never trained on
        self.source = PatchBatches(store, atlas.coords, atlas.neighbor_table(config.k_neighbors),
                                   config.k_neighbors)
        self.sampler = LandmarkBatchSampler(
            store.num_subjects, store.num_landmarks, config.batch_size, config.landmarks_per_batch,
            config.seed, process.rank, process.world_size,
        )
        self.total_steps = config.epochs * len(self.sampler)
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

        torch.manual_seed(config.seed)
        encoder = Encoder(rep_dim=config.rep_dim, moco_dim=config.moco_dim,
                          num_experts=config.num_experts, conditioning=config.conditioning,
                          backend=config.backend)
        if config.sync_bn and process.world_size > 1:
            encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
        self.model = DrasCLR(
            encoder, store.num_landmarks, config.queue_size, config.temperature, config.momentum,
            config.beta, config.neighbour_loss, getattr(torch, config.bank_dtype), config.shuffle_bn,
            generator=torch.Generator().manual_seed(config.seed),
        ).to(device)
        self.step_model: nn.Module = self.model
        if process.world_size > 1:
            # the bank stays identical on every rank by construction (all keys are gathered
            # before enqueueing); broadcasting buffers would copy it every step
            self.step_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.augment = PatchAugment(ENCODER_INPUT, config.augment)
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
            momentum=config.sgd_momentum, weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.epoch, self.next_batch = 0, 0, 0

    # -- schedule -----------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 0 at the last step (per step, not per epoch)."""
        warmup = self.config.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, self.total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        from tqdm import tqdm

        last = self.out_dir / LAST
        if self.process.is_main and self.out_dir.is_dir():
            remove_stale_temporaries(self.out_dir)  # checkpoints of a killed earlier run
        if self.config.resume and last.exists():
            self._restore(load_checkpoint(last, map_location=self.device, required=RESUME_KEYS))
        metrics = MetricsLog(self.out_dir, self.step, self.process.is_main and self.config.tensorboard,
                             enabled=self.process.is_main)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="drasclr train", unit="step",
                   disable=not (self.config.progress and self.process.is_main))
        resumed_step = self.step
        try:
            while self.step < self.total_steps and self.epoch < self.config.epochs:
                for batch in self._loader():
                    row = self._train_step(batch)
                    self.next_batch = batch["index"] + 1
                    metrics.write(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", top1=f"{row['local_top1']:.2f}",
                                    top1_ngb=f"{row['neighbour_top1']:.2f}",
                                    patches_s=f"{row['patches_per_s']:.0f}")
                    if self.step >= self.total_steps:
                        break
                    if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                        self._save(last)
                else:
                    self.epoch, self.next_batch = self.epoch + 1, 0
                    # the epoch's encoder file first: a kill between the two writes then redoes
                    # the epoch's end on resume instead of skipping past the missing file
                    self._save_encoder(self.out_dir / f"encoder_epoch_{self.epoch:04d}.pt")
                    self._save(last)
            if self.step > resumed_step or not last.exists():  # a finished run stays untouched
                self._save(last)
        finally:
            bar.close()
            metrics.close()
        return TrainResult(last, metrics.history(), self.model)

    def _loader(self):
        planned = list(self.sampler.batches(self.epoch, self.next_batch))
        # Its own generator: a DataLoader draws its workers' base seed from the generator it is
        # given, else from torch's global one, which a resumed run would then see advanced
        # differently from the uninterrupted run.
        return torch.utils.data.DataLoader(
            EpochBatches(self.source, planned), batch_size=None, shuffle=False,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.config.seed + self.epoch),
            worker_init_fn=DataLoaderWorkerInit() if self.config.num_workers else None,
        )

    def _train_step(self, batch: dict) -> dict[str, float]:
        started = time.perf_counter()
        config, device = self.config, self.device
        patches = batch["patches"].to(device, non_blocking=True)
        neighbours = batch["neighbours"].to(device, non_blocking=True)
        n, k = neighbours.shape[:2]
        # both views and every neighbour in one augmentation call, each with its own draws
        views = self.augment(
            torch.cat([patches, patches, neighbours.flatten(0, 1)]),
            _generator(device, config.seed, self.process.rank, self.step),
        )
        view_q, view_k, neighbour_views = views[:n], views[n : 2 * n], views[2 * n :]
        self.model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
            out = self.step_model(
                view_q, view_k, neighbour_views.view(n, k, *views.shape[1:]),
                batch["loc"].to(device), batch["neighbour_loc"].to(device).view(n, k, 3),
                batch["landmark"].to(device),
                shuffle_generator=_generator(device, config.seed, -1, self.step),
            )
        values = torch.stack([v.detach().float() for v in out]).tolist()
        if not math.isfinite(values[0]):
            raise FloatingPointError(
                f"loss became {values[0]} at step {self.step + 1} (epoch {self.epoch + 1}); "
                f"training stopped, the last good checkpoint in {self.out_dir} is intact. "
                "Try a lower lr or set grad_clip."
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        patches_done = n * self.process.world_size
        return {"step": self.step, "epoch": self.epoch + 1, **dict(zip(METRICS, values)), "lr": lr,
                "patches_per_s": patches_done / (time.perf_counter() - started)}

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self, path: Path) -> None:
        if not self.process.is_main:
            return
        save_checkpoint({
            "encoder_q": self.model.encoder_q.state_dict(),
            "encoder_config": dict(self.model.encoder_q.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "position": {"step": self.step, "epoch": self.epoch, "batch": self.next_batch},
            "config": self.config.to_dict(),
        }, path)

    def _save_encoder(self, path: Path) -> None:
        if self.process.is_main:
            save_checkpoint({"encoder_q": self.model.encoder_q.state_dict(),
                             "encoder_config": dict(self.model.encoder_q.config)}, path)

    def _restore(self, state: dict) -> None:
        saved = state["config"]
        changed = [name for name in RESUME_FIXED if saved.get(name) != getattr(self.config, name)]
        if changed:
            raise ValueError(
                f"{self.out_dir / LAST}: cannot resume with changed {changed} "
                f"(checkpoint has {[saved.get(n) for n in changed]}); use a new out_dir or resume=false"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        position = state["position"]
        self.step, self.epoch, self.next_batch = position["step"], position["epoch"], position["batch"]


class MetricsLog:
    """Per-step metrics: ``metrics.csv`` (rows past a resumed checkpoint dropped) and TensorBoard."""

    def __init__(self, out_dir: Path, resumed_step: int, tensorboard: bool, enabled: bool) -> None:
        self.path = out_dir / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept_text: list[dict[str, str]] = []
        if self.path.exists():  # keep the rows the checkpoint accounts for
            with open(self.path, newline="") as file:
                # a kill mid-row leaves a partial last line (fields missing): not a step's row
                kept_text = [r for r in csv.DictReader(file)
                             if None not in r and None not in r.values() and "" not in r.values()]
            kept_text = [r for r in kept_text if float(r["step"]) <= resumed_step]
            self.rows = [{k: float(v) for k, v in r.items()} for r in kept_text]
        # The kept rows, as written (a resumed file equals an uninterrupted one's), replace the
        # file atomically, then new rows are appended: a kill while resuming loses nothing.
        buffer = io.StringIO()
        if kept_text:
            writer = csv.DictWriter(buffer, fieldnames=list(kept_text[0]))
            writer.writeheader()
            writer.writerows(kept_text)
        atomic_write_bytes(self.path, buffer.getvalue().encode())
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=list(kept_text[0])) if kept_text else None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resumed_step + 1)

    def _append(self, row: dict[str, float]) -> None:
        if self._csv is None:
            self._csv = csv.DictWriter(self._file, fieldnames=list(row))
            self._csv.writeheader()
        self._csv.writerow(row)

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self._append(row)
        self._file.flush()
        if self.writer is not None:
            for name, value in row.items():
                if name != "step":
                    self.writer.add_scalar(f"train/{name}", value, int(row["step"]))

    def history(self) -> list[dict[str, float]]:
        return list(self.rows)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
        if self.writer is not None:
            self.writer.close()


def _check_inputs(config: TrainConfig, store, atlas) -> None:
    """Store/atlas checks that must fail before any work starts."""
    if store.num_landmarks != atlas.num_landmarks:
        raise ValueError(
            f"atlas {config.atlas} has {atlas.num_landmarks} landmarks but the store "
            f"{config.store} has {store.num_landmarks}; use the atlas the store was cut with"
        )
    if store.num_subjects == 0:
        raise ValueError(f"store {config.store}: no finished subjects to train on")
    if store.patch_size != ENCODER_INPUT:
        raise ValueError(f"store {config.store}: patches are {store.patch_size}^3, the encoder takes "
                         f"{ENCODER_INPUT}^3")
    if config.landmarks_per_batch > store.num_landmarks:
        raise ValueError(f"landmarks_per_batch {config.landmarks_per_batch} exceeds the store's "
                         f"{store.num_landmarks} landmarks")


def _generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, rank, step): the same draws whenever that step is run."""
    stream = np.random.SeedSequence([seed, rank + 1, step]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(stream[0] >> np.uint64(1)))


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "configuration keys (YAML/JSON file or --set):\n" + describe()
    parser.add_argument("--config", help="YAML or JSON file of a TrainConfig")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set lr=0.02 (repeatable)")


def run(args: argparse.Namespace) -> int:
    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    config = config.with_assignments(args.set)
    try:
        result = train(config)
    except FloatingPointError as error:
        print(f"drasclr train: error: {error}", flush=True)
        return 1
    print(f"final checkpoint: {result.checkpoint}")
    return 0
