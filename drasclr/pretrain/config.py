"""Training configuration: one dataclass, every field documented, YAML/JSON round trip.

Defaults follow Yu et al. 2023, Section 3 (MoCo v2 with per-landmark queues: K = 4096, m = 0.999,
T = 0.2, SGD lr 0.01 / momentum 0.9 / weight decay 1e-4, batch 128, beta = 1, k = 2
neighbours). Input checks that need no file access live in `TrainConfig.validate`; checks
against the store and the atlas run in the trainer before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drasclr.deprecated_names import CONFIG_KEYS, renamed_keys
from drasclr.nn.conditioning import CONDITIONINGS
from drasclr.pretrain.augment import AugmentConfig
from drasclr.nn.loc_cond_conv import BACKENDS
from drasclr.ranges import (
    AT_LEAST_ONE, COUNT, FRACTION, NON_NEGATIVE, POSITIVE, Interval, check_fields,
)




def _doc(text: str, default: Any, valid: Interval | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": text, "valid": valid, "choices": choices})


@dataclass
class TrainConfig:
    """Everything `drasclr.train` needs; see each field's ``metadata["help"]``."""

    store: str | None = _doc("patch store folder (drasclr.data.store.PatchStore)", None)
    atlas: str | None = _doc("atlas file (drasclr.data.atlas.Atlas); None: the one the store "
                             "records in its store.json; another atlas than that is refused", None)
    out_dir: str = _doc("folder for checkpoints, metrics.csv, TensorBoard events", "runs/pretrain")
    epochs: int = _doc("passes over every (subject, landmark) pair", 20, AT_LEAST_ONE)
    max_steps: int | None = _doc(
        "stop after this many optimiser steps in total (None: no cap)", None, AT_LEAST_ONE
    )
    batch_size: int = _doc("patches per step over all processes (paper: 128)", 128, AT_LEAST_ONE)
    landmarks_per_batch: int = _doc(
        "landmarks per batch; batch_size must be a multiple. 1 = the reference's mode", 16
    , AT_LEAST_ONE)
    queue_size: int = _doc("negatives per landmark queue, K (paper: 4096)", 4096, AT_LEAST_ONE)
    bank_dtype: str = _doc("memory bank storage", "float32", choices=("float32", "bfloat16"))
    bank_sharding: str = _doc(
        "memory bank across processes: replicated (each holds all L queues) or landmark (each "
        "holds ~L / processes queues and draws batches of its own landmarks; "
        "drasclr.pretrain.memory_bank)", "replicated", choices=("replicated", "landmark")
    )
    rep_dim: int = _doc("representation size h (authors' code: 128)", 128, AT_LEAST_ONE)
    moco_dim: int = _doc(
        "projection size z, also the bank's key size (authors' code: 128)", 128, AT_LEAST_ONE
    )
    num_experts: int = _doc("experts per Loc-CondConv layer (authors' code: 8)", 8, AT_LEAST_ONE)
    conditioning: str = _doc("how location enters the encoder (drasclr.nn.Encoder)", "loc_condconv",
                             choices=CONDITIONINGS)
    backend: str = _doc("Loc-CondConv backend", "auto", choices=BACKENDS)
    k_neighbours: int = _doc(
        "neighbour patches per central patch (paper: 2); 0 disables", 2, COUNT
    )
    beta: float = _doc("weight of the neighbour loss (1.0: eq. 9's plain sum)", 1.0, NON_NEGATIVE)
    neighbour_loss: str = _doc(
        "sum: the reference's summed-logit form; mean: per-neighbour InfoNCE averaged", "sum",
        choices=("sum", "mean"),
    )
    temperature: float = _doc("softmax temperature T (paper: 0.2)", 0.2, POSITIVE)
    momentum: float = _doc("key encoder momentum m (paper: 0.999)", 0.999, FRACTION)
    lr: float = _doc("peak learning rate (paper: 0.01)", 0.01, POSITIVE)
    sgd_momentum: float = _doc("SGD momentum (paper: 0.9)", 0.9, FRACTION)
    weight_decay: float = _doc("SGD weight decay (paper: 1e-4)", 1e-4, NON_NEGATIVE)
    warmup_steps: int = _doc(
        "linear warm-up steps before the per-step cosine decay", 0, COUNT
    )
    grad_clip: float | None = _doc(
        "clip the gradient norm to this value (None: no clipping)", None, POSITIVE
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={
        "help": "probabilities and ranges of the random affine, noise and contrast applied to "
                "both views and the neighbours (true/false: the reference's settings / none)",
        "valid": None, "choices": None})
    shuffle_bn: bool = _doc("MoCo's shuffled BatchNorm for keys under DDP", True)
    key_bn_splits: int = _doc(
        "on one process, with shuffle_bn: encode the shuffled key batch in this many sub-batches, "
        "each with its own BatchNorm statistics (the one-process stand-in for shuffled BN); "
        "1: keys see the query batch's statistics", 1, AT_LEAST_ONE
    )
    sync_bn: bool = _doc("SyncBatchNorm in the query encoder under DDP", False)
    amp: bool = _doc(
        "bfloat16 autocast where it pays: CUDA with bf16, or a CPU with AVX512_BF16 or AMX "
        "when DRASCLR_CPU_BF16=1 (unsafe for training there, see drasclr.precision); false: "
        "float32 everywhere", True
    )
    seed: int = _doc("seed of initialisation, sampling and augmentation", 0, COUNT)
    device: str = _doc("auto (cuda when present), cpu, cuda, cuda:N", "auto")
    num_workers: int = _doc("DataLoader worker processes reading the store", 0, COUNT)
    checkpoint_every: int = _doc(
        "also checkpoint every N steps (0: only at epoch ends)", 500, COUNT
    )
    resume: bool = _doc("continue from out_dir/checkpoint_last.pt when it exists", True)
    tensorboard: bool = _doc("write TensorBoard events to out_dir/tensorboard", True)
    progress: bool = _doc("show a tqdm progress bar", True)

    def __post_init__(self) -> None:
        # the older `augment: true/false` (and a mapping of AugmentConfig fields) still work
        self.augment = AugmentConfig.from_value(self.augment, source="augment")
        # Numeric ranges at construction, so no path (Python, YAML, CLI flags) builds a config
        # that trains on a NaN learning rate; the rest waits for `validate`.
        check_fields(self)

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys and wrong types raise ValueError naming them."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a mapping of field names, got {type(values).__name__}")
        values = renamed_keys(values, CONFIG_KEYS, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k], source) for k, v in values.items()})

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with some fields changed (checked like `from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **overrides}, source="overrides")

    def save(self, path: str | Path) -> Path:
        """Write as YAML (.yaml/.yml) or JSON (.json)."""
        path = Path(path)
        text = _dump(self.to_dict(), path)
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config {path}: no such file")
        text = path.read_text(encoding="utf-8")
        try:
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"config {path}: not valid {path.suffix[1:].upper()}: {error}") from None
        return cls.from_dict(values or {}, source=f"config {path}")

    # -- checks ------------------------------------------------------------------------
    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check values that need no file access; raise ValueError naming the field."""
        if not self.store:
            raise ValueError("store: a patch store folder is required")
        if self.atlas is not None and not str(self.atlas).strip():
            raise ValueError("atlas: an empty path; leave it unset to use the store's atlas")
        check_fields(self)  # again: the dataclass is mutable
        if self.batch_size % self.landmarks_per_batch:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by landmarks_per_batch "
                f"{self.landmarks_per_batch}"
            )
        if self.bank_sharding == "replicated" and self.batch_size % world_size:
            raise ValueError(  # a landmark-sharded plan gives processes batches of unequal sizes
                f"batch_size {self.batch_size} is not divisible by the {world_size} processes"
            )
        per_landmark = self.batch_size // self.landmarks_per_batch
        if per_landmark > self.queue_size:
            raise ValueError(
                f"queue_size {self.queue_size} is smaller than the {per_landmark} keys a landmark "
                "receives per step; a step would overwrite its own keys"
            )
        if self.shuffle_bn and world_size == 1 and self.batch_size < 2 * self.key_bn_splits:
            raise ValueError(
                f"key_bn_splits {self.key_bn_splits}: a batch of {self.batch_size} gives key "
                "sub-batches of fewer than 2 samples, too few for BatchNorm statistics"
            )
        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name}: expected one of {allowed}, got {getattr(self, f.name)!r}")
        return self


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check ``value`` against the field's type hint; ints are accepted for floats."""
    if hint is AugmentConfig:
        return AugmentConfig.from_value(value, source)
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"{source}: {name} may not be null")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{source}: {name} must be {names}, got {value!r}")


def _dump(values: dict[str, Any], path: Path) -> str:
    if path.suffix == ".json":
        return json.dumps(values, indent=2) + "\n"
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_dump(values, sort_keys=False)
    raise ValueError(f"config {path}: use a .yaml, .yml or .json file name")
