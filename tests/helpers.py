"""Builders and process helpers shared by several test files (test files never import each
other; they import from here)."""
from __future__ import annotations

import os
import select
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from scipy.ndimage import gaussian_filter

from drasclr.data.atlas import Atlas, nearest_neighbours, normalised_coords
from drasclr.data.store import create_store, write_subject

# -- stores ------------------------------------------------------------------------------------

TINY = dict(batch_size=8, landmarks_per_batch=2, queue_size=8, num_experts=2, rep_dim=16,
            moco_dim=16, progress=False, tensorboard=False, backend="grouped")

#: The small store of tests/test_store.py: landmarks and patch size.
L, P = 5, 4


def make_atlas(seed=0, num_landmarks=L):
    rng = np.random.default_rng(seed)
    corners = rng.choice(40, size=(num_landmarks, 3), replace=False).astype(np.int64)
    return Atlas(
        corners=corners, coords=normalised_coords(corners), neighbours=nearest_neighbours(corners, 2),
        mask=np.ones((8, 8, 8), np.uint8), affine=np.eye(4), patch_size=P, step=3,
        min_lung_fraction=0.1, source="mask.nii.gz",
    )


def random_patches(rng):
    return rng.integers(-1024, 241, size=(L, P, P, P), dtype=np.int16)


def good_atlas(seed=0):
    rng = np.random.default_rng(seed)
    corners = rng.choice(30, size=(9, 3), replace=False).astype(np.int64)
    return Atlas(corners=corners, coords=normalised_coords(corners),
                 neighbours=nearest_neighbours(corners, 3), mask=np.ones((6, 6, 6), np.uint8),
                 affine=np.diag([0.8, 0.8, 1.5, 1.0]), patch_size=4, step=3,
                 min_lung_fraction=0.2, source="mask.nii.gz")


def make_store(root: Path, num_subjects=4, num_landmarks=6, seed=0, distinct_levels=False):
    """An atlas of ``num_landmarks`` grid landmarks and a store of smooth random HU patches.

    ``distinct_levels`` gives every subject its own mean density (as real lungs differ), a
    signal that survives augmentation, so a short run can learn to tell subjects apart.
    """
    rng = np.random.default_rng(seed)
    corners = np.stack(np.unravel_index(np.arange(num_landmarks), (2, 2, 8)), 1)[:, ::-1] * 26
    corners = np.ascontiguousarray(corners, dtype=np.int64)
    atlas = Atlas(corners=corners, coords=normalised_coords(corners),
                  neighbours=nearest_neighbours(corners, min(3, num_landmarks - 1)),
                  mask=np.ones((4, 4, 4), np.uint8), affine=np.eye(4), patch_size=32, step=26,
                  min_lung_fraction=0.1, source="synthetic")
    atlas_path = root / "atlas.npz"
    atlas.save(atlas_path)
    store = root / "store"
    create_store(store, atlas, atlas_path)
    levels = np.linspace(-850, -150, num_subjects) if distinct_levels else np.full(num_subjects, -500)
    spread = 150 if distinct_levels else 400
    for s, level in enumerate(levels):
        field = gaussian_filter(rng.standard_normal((num_landmarks, 32, 32, 32)), (0, 3, 3, 3))
        hu = level + spread * field / field.std()
        write_subject(store, f"s{s:02d}", "synthetic", patches=hu.clip(-1024, 240).astype(np.int16))
    return store, atlas_path


# -- files of other programs -------------------------------------------------------------------

def write_dicom_series(folder, hu: np.ndarray, spacing, origin_lps, rng, rotation=np.eye(3)) -> None:
    """Slices of ``hu`` (column, row, slice) as DICOM files in shuffled order; the rows and
    columns run along ``rotation``'s first two columns, slices along their cross product."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series_uid = generate_uid()
    stored = np.rint(hu + 1024).astype(np.uint16)  # RescaleIntercept -1024
    for k in rng.permutation(hu.shape[2]):  # file order must not matter
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows, between columns
        ds.ImageOrientationPatient = list(rotation[:, 0]) + list(rotation[:, 1])
        normal = np.cross(rotation[:, 0], rotation[:, 1])
        ds.ImagePositionPatient = list(np.asarray(origin_lps) + k * spacing[2] * normal)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not a DICOM file")


def authors_layout(encoder) -> dict:
    """The encoder's weights as the reference implementation saves them
    (docs/method.md#the-authors-checkpoints): DDP prefix, ``_routing_fn.fc``, ``fc`` head,
    plus a key encoder and queue that loading must ignore."""
    state = {}
    for key, value in encoder.state_dict().items():
        name = key.replace(".routing.", "._routing_fn.fc.")
        name = "fc." + name[len("head."):] if name.startswith("head.") else name
        state[f"module.encoder_q.{name}"] = value.clone()
        state[f"module.encoder_k.{name}"] = torch.randn_like(value.float())
    state["module.queue"] = torch.randn(8, 4, 8)
    state["module.queue_ptr"] = torch.zeros(8, dtype=torch.long)
    return {"epoch": 20, "arch": "custom", "optimizer": {}, "state_dict": state}


# -- processes ---------------------------------------------------------------------------------

def rendezvous_store(world_size: int) -> dist.TCPStore:
    """A TCP store on a port the system picked, hosted by the test process; every worker joins
    it as a client (`worker_environment`), so no port is chosen, freed and re-bound."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=120))


def worker_environment(port: int, rank: int, world_size: int) -> dict[str, str]:
    """The variables torchrun gives a worker, pointing at the `rendezvous_store` on ``port``
    (TORCHELASTIC_USE_AGENT_STORE: rank 0 connects to it instead of hosting one)."""
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                TORCHELASTIC_USE_AGENT_STORE="True")


def wait_for_exit(pids: list[int], timeout: float) -> list[int]:
    """Wait until every process in ``pids`` (not necessarily our children) has exited, or
    ``timeout`` seconds; the ones still running. Waits on pidfds, which turn readable when
    their process exits."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass  # already gone
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        waiting = set(fds)
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0, 1000 * (deadline - time.monotonic()))):
                poller.unregister(fd)
                waiting.discard(fd)
        return sorted(fds[fd] for fd in waiting)
    finally:
        for fd in fds:
            os.close(fd)
