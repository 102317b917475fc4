"""Training batches from the patch store: central patches, their neighbours, coordinates.

For each (subject i, landmark j) of a batch: the patch x_ij, the patches of the k landmarks
nearest to j in the same subject (Yu et al. 2023, Section 2.4) and the landmarks' normalised atlas
coordinates. One vectorised ``PatchStore.gather`` reads a whole batch (centres and neighbours
together); there is no per-sample Python work.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from drasclr.pretrain.sampler import Batch


class PatchBatches:
    """Reads training batches (HU, int16) from a `PatchStore`.

    Args:
        store: a `drasclr.data.store.PatchStore`.
        coords: (L, 3) normalised landmark coordinates (``Atlas.coords``).
        neighbour_table: (L, >= k) landmark indices, nearest first (``Atlas.neighbour_table``).
        k_neighbours: neighbours per central patch (0: none).
    """

    def __init__(self, store, coords: np.ndarray, neighbour_table: np.ndarray, k_neighbours: int) -> None:
        if len(coords) != store.num_landmarks:
            raise ValueError(
                f"atlas has {len(coords)} landmarks but the store at {getattr(store, 'root', '?')} "
                f"has {store.num_landmarks}"
            )
        if neighbour_table.shape[1] < k_neighbours:
            raise ValueError(f"k_neighbours {k_neighbours}: the neighbour table has only "
                             f"{neighbour_table.shape[1]}")
        self.store = store
        self.coords = np.asarray(coords, dtype=np.float32)
        self.neighbour_table = np.asarray(neighbour_table[:, :k_neighbours], dtype=np.int64)
        self.k_neighbours = k_neighbours

    def load(self, subjects: np.ndarray, landmarks: np.ndarray) -> dict[str, torch.Tensor]:
        """A batch as tensors.

        Returns:
            patches (N, P, P, P) int16, neighbours (N, k, P, P, P) int16, landmark (N,) long,
            loc (N, 3) float32, neighbour_loc (N, k, 3) float32.
        """
        n, k = len(subjects), self.k_neighbours
        neighbours = self.neighbour_table[landmarks]  # (N, k)
        all_landmarks = np.concatenate([landmarks[:, None], neighbours], axis=1)  # (N, 1 + k)
        all_subjects = np.repeat(np.asarray(subjects)[:, None], 1 + k, axis=1)
        patches = torch.from_numpy(
            np.ascontiguousarray(self.store.gather(all_subjects.ravel(), all_landmarks.ravel()))
        )
        patches = patches.view(n, 1 + k, *patches.shape[1:])
        return {
            "patches": patches[:, 0],
            "neighbours": patches[:, 1:],
            "landmark": torch.from_numpy(np.asarray(landmarks, dtype=np.int64)),
            "loc": torch.from_numpy(self.coords[landmarks]),
            "neighbour_loc": torch.from_numpy(self.coords[neighbours]),
        }


class EpochBatches(Dataset):
    """A list of planned batches as a map-style dataset, for DataLoader workers/prefetch."""

    def __init__(self, source: PatchBatches, batches: list[Batch]) -> None:
        self.source, self.batches = source, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        batch = self.batches[i]
        return {"index": batch.index, **self.source.load(batch.subjects, batch.landmarks)}
