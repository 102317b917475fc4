"""Patch and subject representations from a trained encoder (SPEC section 8).

The patch representation of subject i at landmark j is h_ij = e(x_ij, p_j); the subject
representation is the mean of h_ij over all landmarks. Patches are encoded in batches that
hold whole landmarks, so every Loc-CondConv layer mixes one kernel per landmark.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from drasclr.atomic import atomic_write_bytes
from drasclr.file_format import check_header

from drasclr.intensity import normalise_hu
from drasclr.nn import Encoder
from drasclr.nn.grouping import LandmarkGroups

FEATURES_FORMAT = "drasclr-features"
FEATURES_VERSION = 1


@dataclass
class FeatureSet:
    """Subject features of one encoder on one store, as saved in a ``.npz`` file.

    Attributes:
        subject_ids: the store's subjects, in store order.
        features: (N, D) float32 subject representations, row i for ``subject_ids[i]``.
        metadata: how they were made (``name``, ``encoder`` kind and source, ``store`` ...);
            ``name`` labels the feature set's rows in the evaluation tables.
    """

    subject_ids: list[str]
    features: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "features"))

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` file atomically."""
        path = Path(path)
        header = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, **self.metadata}
        buffer = io.BytesIO()
        np.savez(buffer, metadata=np.array(json.dumps(header)),
                 subject_ids=np.array(self.subject_ids, dtype=str),
                 features=np.asarray(self.features, dtype=np.float32))
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        """Read a file written by :meth:`save`; ValueError naming the file when it is not one,
        when its arrays disagree, or when it holds non-finite features."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such features file (make one with `drasclr features`)")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["metadata"]))
                subject_ids = [str(s) for s in data["subject_ids"]]
                features = np.asarray(data["features"], dtype=np.float32)
        except Exception as error:  # zip, key and JSON errors all mean "not a features file"
            raise ValueError(f"{path}: not a drasclr features file ({error})") from error
        check_header(path, header, FEATURES_FORMAT, FEATURES_VERSION, "features file")
        if features.ndim != 2 or features.shape[0] != len(subject_ids):
            raise ValueError(f"{path}: features of shape {features.shape} for "
                             f"{len(subject_ids)} subject ids (expected ({len(subject_ids)}, D))")
        if len(set(subject_ids)) != len(subject_ids):
            raise ValueError(f"{path}: subject ids occur more than once")
        bad = ~np.isfinite(features).all(axis=1)
        if bad.any():
            names = ", ".join(np.asarray(subject_ids)[bad][:5])
            raise ValueError(f"{path}: non-finite features for {int(bad.sum())} subject(s): {names}")
        metadata = {k: v for k, v in header.items() if k not in ("format", "version")}
        return cls(subject_ids=subject_ids, features=features, metadata=metadata)


@torch.no_grad()
def subject_features(
    encoder: Encoder,
    store,
    coords: np.ndarray,
    subjects_per_batch: int = 8,
    landmarks_per_batch: int = 16,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Mean patch representation per subject: (num_subjects, rep_dim) float32.

    Args:
        encoder: a trained encoder (put in eval mode here).
        store: a `drasclr.data.store.PatchStore`.
        coords: (L, 3) normalised landmark coordinates of the store's atlas.
    """
    if len(coords) != store.num_landmarks:
        raise ValueError(
            f"coords: the atlas has {len(coords)} landmarks, the store {store.num_landmarks}"
        )
    encoder = encoder.eval().to(device)
    coords_t = torch.as_tensor(coords, dtype=torch.float32, device=device)
    num_subjects, num_landmarks = store.num_subjects, store.num_landmarks
    sums = torch.zeros(num_subjects, encoder.config["rep_dim"], device=device)
    for s0 in range(0, num_subjects, subjects_per_batch):
        subjects = np.arange(s0, min(s0 + subjects_per_batch, num_subjects))
        for l0 in range(0, num_landmarks, landmarks_per_batch):
            landmarks = np.arange(l0, min(l0 + landmarks_per_batch, num_landmarks))
            subject_index = np.repeat(subjects, len(landmarks))
            landmark_index = np.tile(landmarks, len(subjects))
            patches = torch.from_numpy(store.gather(subject_index, landmark_index)).to(device)
            loc = coords_t[torch.from_numpy(landmark_index).to(device)]
            h = encoder(normalise_hu(patches)[:, None], LandmarkGroups.from_loc(loc, len(loc)))
            sums.index_add_(0, torch.from_numpy(subject_index).to(device), h.float())
    return (sums / num_landmarks).cpu().numpy()
