"""Patch and subject representations from a trained encoder (SPEC section 8).

The patch representation of subject i at landmark j is h_ij = e(x_ij, p_j); the subject
representation is the mean of h_ij over all landmarks. Patches are encoded in batches that
hold whole landmarks, so every Loc-CondConv layer mixes one kernel per landmark.
"""
from __future__ import annotations

import numpy as np
import torch

from drasclr.intensity import normalise_hu
from drasclr.nn import Encoder
from drasclr.nn.grouping import LandmarkGroups


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
