"""The models of subtype detection: frozen features with a linear probe, and fine-tuning.

Building blocks of :mod:`drasclr.evaluation.detection` (Yu et al. 2023, Table 5), which runs
them in subject-disjoint cross-validation: the representation h of patches at their atlas
coordinates, a scikit-learn linear probe whose regularisation is chosen on the training rows
only, and end-to-end fine-tuning of the encoder with a linear head on augmented patches. Both
losses weight the classes to balance them (``class_weight="balanced"``, ``pos_weight``):
healthy boxes usually outnumber one subtype's.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from drasclr.evaluation.head import SubtypeHead
from drasclr.intensity import normalise_hu
from drasclr.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Interval, check_fields, ranged

#: Inverse regularisation strengths searched by the linear probe.
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class FineTuneConfig:
    """The fine-tuning schedule, shared by DrasCLR and scratch. The defaults are small enough
    for a CPU run on a synthetic cohort; raise ``epochs`` for a real study. ``steps``: a fixed
    number of optimisation steps (mini-batches, reshuffled every pass) whatever the number of
    boxes, instead of ``epochs`` passes; the label-efficiency curve sets it, so that fewer
    labels do not also mean fewer updates."""

    epochs: int = ranged(5, AT_LEAST_ONE)
    batch_size: int = ranged(32, Interval(2, integer=True))  # BatchNorm needs two samples
    lr: float = ranged(1e-3, POSITIVE)
    weight_decay: float = ranged(1e-4, NON_NEGATIVE)
    augment: bool = True
    steps: int | None = ranged(None, AT_LEAST_ONE)

    def __post_init__(self) -> None:
        check_fields(self)


@torch.no_grad()
def encode_patches(encoder: nn.Module, patches: np.ndarray, coords: np.ndarray,
                   batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """(N, rep_dim) float32 frozen representations h of int16 HU patches at their coordinates."""
    encoder = encoder.eval().to(device)
    out = []
    for start in range(0, len(patches), batch_size):
        x = normalise_hu(torch.from_numpy(np.asarray(patches[start:start + batch_size])).to(device))
        loc = torch.as_tensor(coords[start:start + batch_size], dtype=torch.float32, device=device)
        out.append(encoder(x[:, None], loc).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, encoder.rep_dim), np.float32)


def fit_linear_probe(h: np.ndarray, y: np.ndarray, groups: np.ndarray,
                     cs: Sequence[float] = DEFAULT_CS, inner_folds: int = 3, seed: int = 0):
    """Pipeline(StandardScaler, LogisticRegression) fitted on (h, y), C chosen by log-loss in
    a subject-grouped inner cross-validation of these rows only (log-loss, not F1: it is
    smooth, so small inner folds still rank the values of C). With too few subjects for two
    inner folds, C = 1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(StandardScaler(),
                             LogisticRegression(class_weight="balanced", max_iter=5000))
    subjects = min(len(np.unique(groups[y == label])) for label in (0, 1))
    splits = min(inner_folds, subjects)
    if splits < 2 or len(cs) == 1:
        pipeline.set_params(logisticregression__C=float(cs[0]) if len(cs) == 1 else 1.0)
        return pipeline.fit(h, y)
    search = GridSearchCV(
        pipeline, {"logisticregression__C": list(cs)}, scoring="neg_log_loss",
        cv=StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed))
    return search.fit(h, y, groups=groups).best_estimator_


def probe_weights(pipeline) -> tuple[np.ndarray, float]:
    """(weight (D,), bias) on raw h with the scaler folded in: w.(h - m)/s + b = (w/s).h + b'."""
    scaler, model = pipeline[0], pipeline[-1]
    weight = model.coef_[0] / scaler.scale_
    return weight, float(model.intercept_[0] - np.dot(weight, scaler.mean_))


def fine_tune(encoder: nn.Module, patches: np.ndarray, coords: np.ndarray, y: np.ndarray,
              config: FineTuneConfig = FineTuneConfig(), seed: int = 0,
              device: str | torch.device = "cpu", label: str = "positive",
              progress: bool = True) -> tuple[nn.Module, SubtypeHead]:
    """Train a copy of ``encoder`` and a linear head end to end on augmented patches.

    Binary cross-entropy with ``pos_weight`` = negatives / positives, AdamW, mini-batches in a
    seeded order; the last batch of an epoch is dropped when it has one sample (BatchNorm).
    ``config.epochs`` passes, or exactly ``config.steps`` optimisation steps when set;
    ``progress``: a tqdm bar over the steps. Returns the trained encoder and head, both in
    eval mode; ``encoder`` is left untouched.
    """
    from drasclr.pretrain.augment import PatchAugment

    device = torch.device(device)
    y = np.asarray(y, dtype=np.float32)
    if len(np.unique(y)) < 2:
        raise ValueError("fine_tune: the training patches hold only one class")
    model = copy.deepcopy(encoder).to(device).train()
    head = SubtypeHead(model.rep_dim, label).to(device).train()
    optimiser = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()),
                                  lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor((y == 0).sum() / (y == 1).sum(), device=device))
    augment = PatchAugment(patches.shape[-1], augment=config.augment).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    coords_t = torch.as_tensor(coords, dtype=torch.float32)
    targets = torch.from_numpy(y)

    def batches():
        passes = itertools.count() if config.steps is not None else range(config.epochs)
        for _ in passes:
            order = order_rng.permutation(len(y))
            for start in range(0, len(order), config.batch_size):
                batch = np.sort(order[start:start + config.batch_size])
                if len(batch) >= 2:
                    yield batch

    batches_per_pass = len(y) // config.batch_size + (len(y) % config.batch_size >= 2)
    steps = tqdm(itertools.islice(batches(), config.steps), desc=f"fine-tune ({label})",
                 total=config.steps or config.epochs * batches_per_pass, unit="step",
                 disable=not progress, leave=False)
    for batch in steps:
        x = augment(torch.from_numpy(np.asarray(patches[batch])).to(device), generator)
        logits = head.logits(model(x, coords_t[batch].to(device)))
        loss = loss_fn(logits, targets[batch].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval(), head.eval()


@torch.no_grad()
def predict_proba(encoder: nn.Module, head: SubtypeHead, patches: np.ndarray, coords: np.ndarray,
                  batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """(N,) probability of the head's subtype for each patch."""
    h = torch.from_numpy(encode_patches(encoder, patches, coords, batch_size, device))
    return head.cpu()(h).numpy()

