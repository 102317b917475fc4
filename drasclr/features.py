"""Patch and subject representations of an encoder on a patch store (Yu et al. 2023).

The patch representation of subject i at landmark j is h_ij = e(x_ij, p_j); the subject
representation is the mean of h_ij over all landmarks. :func:`extract_features` computes
them in batches that hold whole landmarks (all subjects, or a block of them, at a few
landmarks), so every Loc-CondConv layer mixes one kernel per landmark and convolves all of
that landmark's patches at once, where the authors' code encodes one patch at a time.
``drasclr features`` is its command line (``drasclr.cli.features``).
"""
from __future__ import annotations

import copy
import io
import json
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drasclr.atomic import atomic_path, atomic_write_bytes
from drasclr.data.store import PatchStore
from drasclr.device import resolve_device
from drasclr.file_format import check_header
from drasclr.intensity import normalise_hu
from drasclr.nn import Encoder
from drasclr.precision import autocast, use_bf16
from drasclr.conv_common import LandmarkPartition
from drasclr.ranges import AT_LEAST_ONE, COUNT, check_number

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


#: Element types of the patch representation file.
PATCH_DTYPES = ("float16", "float32")
#: Patches per forward pass by device type. On the CPU small batches are faster: their
#: activations stay in the cache (figures in benchmarks/RESULTS.md); a GPU needs large ones
#: to fill.
DEFAULT_BATCH = {"cuda": 256, "cpu": 16}
#: Store patches that set the BatchNorm statistics of a random-init encoder, in batches of
#: several landmarks, as training batches are.
CALIBRATION_PATCHES, CALIBRATION_BATCH = 1024, 256


@torch.no_grad()
def extract_features(
    source: Encoder | str | os.PathLike | None,
    store: PatchStore | str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    patches: bool = False,
    patch_dtype: str = "float16",
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    random_init: int | None = None,
    progress: bool = True,
    amp: bool = True,
) -> FeatureSet:
    """Subject features (mean patch representation h over all landmarks) of every finished
    subject of a patch store, in store order.

    Args:
        source: an ``Encoder`` (copied: the caller's object is neither moved nor changed), or
            a file: drasclr's ``checkpoint_last.pt`` or ``encoder_epoch_NNNN.pt``, or the
            authors' checkpoint (told apart by `drasclr.load_encoder`).
            May be None with ``random_init``.
        store: a patch store (folder or ``PatchStore``); its atlas is the one recorded in its
            ``store.json``.
        out: write the ``FeatureSet`` there (``.npz``, atomic).
        name: the feature set's label in evaluation tables; default "DrasCLR" for drasclr's
            encoders, "DrasCLR (authors)" for the authors', "random init (seed S)".
        patches: also write every patch representation, (subjects, landmarks, rep_dim), as a
            memory-mappable ``<out stem>.patches.npy`` (needs ``out``); its path is recorded
            in the metadata under ``patches``.
        patch_dtype: "float16" or "float32", the element type of that file.
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N". On CUDA patches
            travel from pinned memory.
        batch_size: patches per forward pass; default :data:`DEFAULT_BATCH` of the device.
        random_init: a seed: instead of the source's weights, a randomly initialised encoder of
            the source's architecture (the default ``Encoder()`` without a source), the
            baseline of the evaluation tables. Its BatchNorm statistics are estimated on
            ``CALIBRATION_PATCHES`` of the store's patches, as training would set them: with
            the initial statistics (mean 0, variance 1) the activations shrink layer by layer
            and every patch gets nearly the same h.
        progress: show a progress bar.
        amp: bfloat16 autocast where the device computes bfloat16 natively (CUDA, a CPU with
            AVX512_BF16 or AMX; ``drasclr.precision``); False: float32.

    Raises:
        FileNotFoundError / ValueError: naming the file and the problem, before any encoding:
            a missing or unknown checkpoint, a store without finished subjects, its atlas gone
            or changed, bad arguments.
    """

    started = time.perf_counter()
    if patch_dtype not in PATCH_DTYPES:
        raise ValueError(f"patch_dtype: expected one of {PATCH_DTYPES}, got {patch_dtype!r}")
    if batch_size is not None:
        check_number("batch_size", batch_size, AT_LEAST_ONE)
    if patches and out is None:
        raise ValueError("patches=True writes the patch representations beside the features "
                         "file: give out")
    if source is None and random_init is None:
        raise ValueError("source: give an encoder or checkpoint, or random_init=SEED")
    if not isinstance(source, (Encoder, str, os.PathLike, type(None))):
        raise ValueError(f"source: expected a drasclr Encoder or a checkpoint path, got "
                         f"{type(source).__name__}")
    if random_init is not None:
        check_number("random_init", random_init, COUNT)
    store = store if isinstance(store, PatchStore) else PatchStore(store)
    if store.num_subjects == 0:
        raise ValueError(f"{store.root / 'manifest.csv'}: the store has no finished subjects "
                         "(run `drasclr preprocess`)")
    coords = store.atlas().coords
    device = resolve_device(device)
    batch_size = batch_size or DEFAULT_BATCH.get(device.type, DEFAULT_BATCH["cpu"])
    encoder, metadata = _working_encoder(source, random_init)
    encoder = encoder.to(device).eval()
    bf16 = use_bf16(device, amp)
    coords_t = torch.as_tensor(coords, dtype=torch.float32, device=device)
    if random_init is not None:
        order = np.random.default_rng(random_init).permutation(store.num_landmarks)
        inputs = _encoder_inputs(store, order, CALIBRATION_BATCH, coords_t, device,
                                 limit=CALIBRATION_PATCHES)
        used = calibrate_batchnorm(encoder, inputs, bf16)
        metadata["batchnorm"] = f"statistics estimated on {used} store patches"

    num_subjects, num_landmarks = store.num_subjects, store.num_landmarks
    sums = torch.zeros(num_subjects, encoder.rep_dim, device=device)
    patch_path = Path(out).with_suffix(".patches.npy") if patches else None
    with (atomic_path(patch_path, suffix=".npy") if patch_path else nullcontext()) as temporary, \
            tqdm(total=num_subjects * num_landmarks, unit="patch", desc="drasclr features",
                 disable=not progress, dynamic_ncols=True) as bar:
        patch_file = None
        if temporary is not None:
            patch_file = np.lib.format.open_memmap(
                temporary, mode="w+", dtype=patch_dtype,
                shape=(num_subjects, num_landmarks, encoder.rep_dim))
        for (subject_index, landmark_index), x, partition in _encoder_inputs(
                store, np.arange(num_landmarks), batch_size, coords_t, device):
            with autocast(device, bf16):
                h = encoder(x, partition).float()
            sums.index_add_(0, torch.from_numpy(subject_index).to(device), h)
            if patch_file is not None:
                patch_file[subject_index, landmark_index] = h.cpu().numpy()
            bar.update(len(subject_index))
        features = (sums / num_landmarks).cpu().numpy()
        bad = ~np.isfinite(features).all(axis=1)
        if bad.any():  # raised before the patch file gets its name
            raise ValueError(f"{metadata['source'] or 'encoder'}: non-finite features for "
                             f"{int(bad.sum())} subject(s), e.g. "
                             f"{np.asarray(store.subject_ids)[bad][0]}")
        if patch_file is not None:
            patch_file.flush()
            del patch_file  # closes the map before the rename
    metadata.update(
        name=name or metadata["name"], store=str(store.root.resolve()), rep_dim=encoder.rep_dim,
        num_landmarks=num_landmarks, device=str(device), batch_size=batch_size,
        dtype="bfloat16" if bf16 else "float32",
        seconds=round(time.perf_counter() - started, 3),
    )
    if patch_path is not None:
        metadata.update(patches=str(patch_path.resolve()), patch_dtype=patch_dtype)
    feature_set = FeatureSet(list(store.subject_ids), features.astype(np.float32), metadata)
    if out is not None:
        feature_set.save(out)
    return feature_set


def landmark_batches(num_subjects: int, landmarks: np.ndarray, batch_size: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(subject_index, landmark_index) of each batch, covering every subject at ``landmarks``.

    A batch holds whole landmarks: all subjects at ``batch_size // num_subjects`` landmarks
    (at least one; with more subjects than ``batch_size``, one landmark's subjects in blocks),
    listed landmark by landmark.
    """
    per_landmark = min(num_subjects, batch_size)
    landmarks_per_batch = max(1, batch_size // num_subjects)
    for start in range(0, len(landmarks), landmarks_per_batch):
        block = np.asarray(landmarks[start:start + landmarks_per_batch], dtype=np.int64)
        for first in range(0, num_subjects, per_landmark):
            subjects = np.arange(first, min(first + per_landmark, num_subjects))
            yield np.tile(subjects, len(block)), np.repeat(block, len(subjects))


def random_encoder(config: dict, seed: int) -> Encoder:
    """``Encoder(**config)`` with weights drawn under ``torch.manual_seed(seed)``; the caller's
    random stream is left alone. Frozen use needs :func:`calibrate_batchnorm` first."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Encoder(**config)


def calibrate_batchnorm(encoder: Encoder, inputs: Iterable, bf16: bool) -> int:
    """Set every BatchNorm's running statistics to their average over ``inputs`` (batches of
    ``(index, x, partition)``), as ``torch.optim.swa_utils.update_bn`` does for one-input models;
    leaves the encoder in eval mode. Returns the number of patches used (batches of one are
    skipped: the 1^3 activations of the last layer have no batch variance)."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the batches
    encoder.train()
    used = 0
    for _, x, partition in inputs:
        if len(x) > 1:
            with autocast(x.device, bf16):
                encoder(x, partition)
            used += len(x)
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
    encoder.eval()
    return used


def _encoder_inputs(store: PatchStore, landmarks: np.ndarray, batch_size: int,
                    coords: torch.Tensor, device: torch.device, limit: int | None = None):
    """``((subject_index, landmark_index), x, partition)`` per batch of :func:`landmark_batches`:
    normalised patches (B, 1, P, P, P) on ``device`` and their ``LandmarkPartition``, computed
    once per batch for all layers. The next batch is read from the store (and pinned, for
    CUDA) in a background thread while this one is encoded. ``limit``: stop after that many
    patches."""
    plan = landmark_batches(store.num_subjects, landmarks, batch_size)
    pin = device.type == "cuda"

    def read(indices: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        patches = torch.from_numpy(store.gather(*indices))
        return patches.pin_memory() if pin else patches

    done = 0
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = None
        for indices in plan:
            if limit is not None and done >= limit:
                break
            done += len(indices[0])
            upcoming = (indices, reader.submit(read, indices))
            if pending is not None:
                yield _to_device(*pending, coords, device)
            pending = upcoming
        if pending is not None:
            yield _to_device(*pending, coords, device)


def _to_device(indices, future, coords: torch.Tensor, device: torch.device):
    x = normalise_hu(future.result().to(device, non_blocking=True))[:, None]
    landmark = torch.from_numpy(indices[1]).to(device)
    return indices, x, LandmarkPartition.from_loc(coords[landmark], len(landmark))


def _working_encoder(source, random_init: int | None) -> tuple[Encoder, dict]:
    """An encoder this call may move and change, and the metadata that says where it came
    from (``encoder``: its kind, ``source``: the file, ``name``: the default label)."""
    from drasclr.checkpoint_formats import AUTHORS_CHECKPOINT, read_encoder_file

    metadata: dict = {"source": None}
    if isinstance(source, Encoder):
        encoder = copy.deepcopy(source)
        metadata.update(encoder="Encoder object", name="DrasCLR")
    elif source is not None:
        encoder, kind = read_encoder_file(source)
        metadata.update(encoder=kind, source=str(Path(source).resolve()),
                        name="DrasCLR (authors)" if kind == AUTHORS_CHECKPOINT else "DrasCLR")
    if random_init is not None:
        encoder = random_encoder(encoder.config if source is not None else Encoder().config,
                                 int(random_init))
        metadata.update(encoder="random init", random_init=int(random_init),
                        name=f"random init (seed {int(random_init)})")
    metadata["encoder_config"] = dict(encoder.config)
    return encoder, metadata
