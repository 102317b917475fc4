"""MoCo pretraining loop and `drasclr.train()` (Yu et al. 2023, Section 3); the command line is
`drasclr train` (drasclr/cli/train.py), DDP through torchrun (see distributed.py).

Each step: read a landmark-grouped batch from the patch store, augment two views of every
patch and one of every neighbour on the device, run `DrasCLR` (losses, key update, enqueue),
SGD with a per-step cosine schedule. Checkpoints (atomic) at every epoch's end and every
``checkpoint_every`` steps hold everything needed to resume exactly; metrics go to
``metrics.csv`` and TensorBoard; a tqdm bar shows loss, top-1 of both losses and patches/s.
All randomness of a step (augmentation, key shuffling) comes from generators re-seeded from
(seed, rank, step), so a resumed run repeats the uninterrupted run's draws.

With ``bank_sharding: landmark`` each process holds only its landmarks' queues and draws
batches of those landmarks (`OwnedLandmarkBatchSampler`); checkpoints are then sharded
(`drasclr.pretrain.sharded_checkpoints`) and a run resumes on any number of processes.
"""
from __future__ import annotations

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
from drasclr.data.patches import PATCH_SIZE
from drasclr.deprecated_names import CONFIG_KEYS, renamed_keys
from drasclr.device import resolve_device
from drasclr.precision import autocast, use_bf16
from drasclr.pretrain.augment import PatchAugment
from drasclr.pretrain.checkpoints import LAST, RESUME_KEYS, load_checkpoint, save_checkpoint
from drasclr.pretrain.config import TrainConfig
from drasclr.pretrain.dataset import EpochBatches, PatchBatches
from drasclr.pretrain.distributed import ProcessInfo, init_distributed
from drasclr.pretrain.memory_bank import owned_landmarks
from drasclr.pretrain.moco import DrasCLR
from drasclr.pretrain.sampler import LandmarkBatchSampler, OwnedLandmarkBatchSampler, Segment
from drasclr.pretrain.sharded_checkpoints import TRAINER_STATE, last_checkpoint, load_sharded, save_sharded
from drasclr.worker_exit import DataLoaderWorkerInit

METRICS = ("loss", "local_loss", "neighbour_loss", "local_top1", "neighbour_top1")
# fields a resumed run must share with the checkpoint it continues
RESUME_FIXED = ("batch_size", "landmarks_per_batch", "queue_size", "bank_dtype", "bank_sharding", "rep_dim",
                "moco_dim", "num_experts", "conditioning", "k_neighbours", "seed")


@dataclass
class TrainResult:
    """``checkpoint``: the final full checkpoint (with landmark sharding: its ``trainer.pt``,
    everything but the bank); ``history``: one metrics dict per step; ``model``: the trained
    `DrasCLR` module (this process's copy; ``model.bank`` holds this process's shard)."""

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
        from drasclr.data.store import PatchStore
        from drasclr.nn import Encoder

        self.config, self.device, self.process = config, device, process
        self.out_dir = Path(config.out_dir)
        store = PatchStore(config.store)
        atlas = _store_atlas(config, store)
        _check_inputs(config, store)
        store.verify_all()  # a damaged patch file stops the run here, never trained on
        self.source = PatchBatches(store, atlas.coords, atlas.neighbour_table(config.k_neighbours),
                                   config.k_neighbours)
        self.sharded = config.bank_sharding == "landmark"
        self.sampler = (OwnedLandmarkBatchSampler if self.sharded else LandmarkBatchSampler)(
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
            bank_landmarks=owned_landmarks(store.num_landmarks, process.rank, process.world_size)
            if self.sharded else None, key_bn_splits=config.key_bn_splits,
        ).to(device)
        self.step_model: nn.Module = self.model
        if process.world_size > 1:
            # A replicated bank stays identical on every rank by construction (all keys are
            # gathered before enqueueing) and a sharded one differs by design: DDP must neither
            # broadcast the bank at start nor its buffers every step.
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.model, [f"bank.{name}" for name, _ in self.model.bank.named_buffers()]
            )
            self.step_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.augment = PatchAugment(PATCH_SIZE, config.augment)
        self.bf16 = use_bf16(device, config.amp)
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
            momentum=config.sgd_momentum, weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.epoch, self.next_batch = 0, 0, 0
        self.segment = self.sampler.first_segment() if self.sharded else None

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
        if self.config.resume:
            self._resume()
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
                    self.segment = self.sampler.first_segment() if self.sharded else None
                    # the epoch's encoder file first: a kill between the two writes then redoes
                    # the epoch's end on resume instead of skipping past the missing file
                    self._save_encoder(self.out_dir / f"encoder_epoch_{self.epoch:04d}.pt")
                    self._save(last)
            if self.step > resumed_step or self._last is None:  # a finished run stays untouched
                self._save(last)
        finally:
            bar.close()
            metrics.close()
        return TrainResult(self._last if self.sharded else last, metrics.history(), self.model)

    def _loader(self):
        if self.sharded:
            planned = list(self.sampler.batches(self.epoch, self.next_batch, self.segment))
            busiest = max((np.bincount(b.landmarks).max() for b in planned), default=0)
            if busiest > self.config.queue_size:
                raise ValueError(
                    f"queue_size {self.config.queue_size} is smaller than the {busiest} keys a "
                    "landmark receives in one step of this landmark-sharded plan; raise queue_size"
                )
        else:
            planned = list(self.sampler.batches(self.epoch, self.next_batch))
        world = self.process.world_size
        self.global_sizes = {b.index: b.global_size or world * len(b.subjects) for b in planned}
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
        with autocast(device, self.bf16):
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
        # DDP averages the processes' gradients; weighting each process's mean loss by its
        # share of the global batch makes that the gradient of the mean over all pairs
        global_size = self.global_sizes[batch["index"]]
        (out.loss * (n * self.process.world_size / global_size)).backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "epoch": self.epoch + 1, **dict(zip(METRICS, values)), "lr": lr,
                "patches_per_s": global_size / (time.perf_counter() - started)}

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self, path: Path) -> None:
        """Checkpoint to ``path`` (replicated bank), or a sharded checkpoint (landmark sharding:
        a collective call, every process writes its bank shard)."""
        if not (self.sharded or self.process.is_main):
            return
        model = self.model.state_dict()
        position = {"step": self.step, "epoch": self.epoch, "batch": self.next_batch}
        if self.sharded:  # the bank goes into its own per-process files
            model = {name: value for name, value in model.items() if not name.startswith("bank.")}
            position["segment"] = self.segment.to_dict()
        state = {
            "encoder_q": self.model.encoder_q.state_dict(),
            "encoder_config": dict(self.model.encoder_q.config),
            "model": model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "position": position,
            "config": self.config.to_dict(),
        }
        if self.sharded:
            save_sharded(self.out_dir, f"step_{self.step:08d}_epoch_{self.epoch:04d}", self.model.bank, state,
                         self.process.rank)
        else:
            save_checkpoint(state, path)

    def _save_encoder(self, path: Path) -> None:
        if self.process.is_main:
            save_checkpoint({"encoder_q": self.model.encoder_q.state_dict(),
                             "encoder_config": dict(self.model.encoder_q.config)}, path)

    @property
    def _last(self) -> Path | None:
        """The last complete checkpoint (its trainer state file when sharded), or None."""
        if self.sharded:
            directory = last_checkpoint(self.out_dir)
            return None if directory is None else directory / TRAINER_STATE
        last = self.out_dir / LAST
        return last if last.exists() else None

    def _resume(self) -> None:
        if self.sharded:
            directory = last_checkpoint(self.out_dir)
            if directory is not None:
                self._restore(load_sharded(directory, self.model.bank, map_location=self.device))
        elif (self.out_dir / LAST).exists():
            self._restore(load_checkpoint(self.out_dir / LAST, map_location=self.device,
                                          required=RESUME_KEYS))

    def _restore(self, state: dict) -> None:
        saved = renamed_keys(state["config"], CONFIG_KEYS, str(self.out_dir / LAST))
        changed = [name for name in RESUME_FIXED if saved.get(name) != getattr(self.config, name)]
        if changed:
            raise ValueError(
                f"{self._last}: cannot resume with changed {changed} "
                f"(checkpoint has {[saved.get(n) for n in changed]}); use a new out_dir or resume=false"
            )
        if self.sharded:  # the bank was filled from its own files
            missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
            if unexpected or any(not name.startswith("bank.") for name in missing):
                raise ValueError(f"{self._last}: model state does not match ({missing}, {unexpected})")
        else:
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        position = state["position"]
        self.step, self.epoch, self.next_batch = position["step"], position["epoch"], position["batch"]
        if self.sharded:
            self.segment = Segment.from_dict(position["segment"])
            if self.segment.world_size != self.process.world_size:
                self.segment = self.sampler.resegment(self.epoch, self.segment, self.next_batch)


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


def _store_atlas(config: TrainConfig, store):
    """The atlas the store was cut with: the file its store.json records, or ``config.atlas``
    when that is the same atlas (its checksum is the recorded one); another atlas is refused."""
    if config.atlas is None:
        return store.atlas()
    from drasclr.data.atlas import Atlas
    from drasclr.data.store import atlas_checksum

    given = Atlas.load(config.atlas)
    if atlas_checksum(given) != store.config["atlas_checksum"]:
        raise ValueError(
            f"atlas {config.atlas} ({given.num_landmarks} landmarks) is not the atlas the store "
            f"{config.store} was cut with ({store.config['atlas']}, {store.num_landmarks} "
            "landmarks, recorded in its store.json); leave atlas unset to use the store's"
        )
    return given


def _check_inputs(config: TrainConfig, store) -> None:
    """Store checks that must fail before any work starts."""
    if store.num_subjects == 0:
        raise ValueError(f"store {config.store}: no finished subjects to train on")
    if store.patch_size != PATCH_SIZE:
        raise ValueError(f"store {config.store}: patches are {store.patch_size}^3, the encoder takes "
                         f"{PATCH_SIZE}^3")
    if config.landmarks_per_batch > store.num_landmarks:
        raise ValueError(f"landmarks_per_batch {config.landmarks_per_batch} exceeds the store's "
                         f"{store.num_landmarks} landmarks")


def _generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, rank, step): the same draws whenever that step is run."""
    stream = np.random.SeedSequence([seed, rank + 1, step]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(stream[0] >> np.uint64(1)))
