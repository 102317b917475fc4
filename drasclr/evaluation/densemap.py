"""Dense voxel probability maps of an emphysema subtype (Yu et al. 2023, Section 4.3.1, Fig. 3).

The paper slides its subtype classifier over the lung with step 1: every lung voxel gets the
probability computed from the 32^3 patch centred on it, the encoder conditioned on that
voxel's own atlas location. Here:

- **Exact window** (:func:`exact_probabilities`, what every map uses): precisely that.
  Voxel v (index of the 1 mm resampled scan) is the patch ``v - 16 .. v + 15`` on every axis (v at index
  ``P // 2``; scans are padded with air, -1024 HU, as the store's patches), windowed to int16
  HU exactly like the store (``drasclr.data.subject``) and normalised with
  ``drasclr.intensity.normalise_hu``; its coordinate is v's world point (scan affine) mapped
  into the atlas by the subject's saved registration, then ``Atlas.coords_of_points``.
  Voxels are evaluated in batches (each sample with its own coordinate: the encoder mixes one
  kernel per sample, ``drasclr.conv_common``), in chunks whose results are saved atomically in
  a work folder, so memory stays bounded for a whole lung and an interrupted job resumes.
  On CUDA the volume lives on the device, patches are gathered there and the encoder runs
  under bf16 autocast (``amp=False`` for float32).
  ``step=S`` evaluates the voxels of the grid ``S * k`` (global voxel indices, so the values
  there are the step-1 values) around the lung and fills every lung voxel by trilinear
  interpolation.
- **Fully convolutional pass** (:func:`fast_probabilities`, API only, NOT offered as a map
  mode): the encoder run over a block of voxels with the "dilation trick" (each stride-2 layer
  becomes stride 1, later layers dilated by the accumulated stride; verified against the
  strided network), Loc-CondConv kernels mixed once per block at the block centre. It is
  faster per voxel than the exact window, but a different estimator: the exact window
  zero-pads the patch at every layer (at the 2^3 and 1^3 levels most taps are padding), the
  dense pass sees the real neighbourhood there. On synthetic subjects its map barely
  correlates with the exact one and does not find the true lesions (speed and agreement in
  ``benchmarks/RESULTS.md``).
  So ``drasclr densemap`` has no fast mode; the function stays for research and the benchmark.

Why not MONAI's ``sliding_window_inference``: it tiles the image with ROI-sized windows and
blends ROI-sized outputs; a step-1 map would be a window per voxel whose predictor returns a
32^3 output that is blended into the image (32768 times the memory traffic of one number per
voxel), it windows the whole box rather than the lung voxels, and near the image border it
shifts windows inwards instead of padding, so they would no longer be centred on their voxel.
Its ``with_coord`` passes window positions, but the per-voxel gather, the coordinate mapping
and the resumable chunks are the whole job here, so a direct gather is simpler and exact.

Scoring: :func:`box_detections` applies the paper's detection rule (a 32 mm box is detected
when at least 25 % of its voxels have probability above 0.5) and :func:`box_scores` gives
box-level F1, precision and recall; :func:`truth_scores` compares a map with the true lesion
mask of the synthetic cohort (voxel AUC, Dice at 0.5 within the lung), which the paper could
not; :func:`report_sections` renders both with map overlays.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn
from tqdm import tqdm

from drasclr.atomic import atomic_path, atomic_write_bytes
from drasclr.data.atlas import Atlas
from drasclr.device import resolve_device
from drasclr.data.io import CTVolume, read_ct
from drasclr.data.patches import AIR_HU, PATCH_SIZE
from drasclr.intensity import HU_WINDOW, normalise_hu
from drasclr.precision import autocast, use_bf16
from drasclr.ranges import AT_LEAST_ONE, check_number

#: Voxel v is patch index HALF of its patch: the patch covers v - HALF .. v + HALF - 1.
HALF = PATCH_SIZE // 2
#: The paper's detection rule (Section 4.3.1): box detected when >= 25 % of voxels are > 0.5.
DETECTION_THRESHOLD = 0.5
DETECTION_FRACTION = 0.25
#: Lesion labels of the synthetic COPD cohort (``drasclr.data.synthetic``).
LESION_LABELS = {"centrilobular": 1, "paraseptal": 2, "panlobular": 3}
WORK_FORMAT = "drasclr-densemap-work"


# -- the subject ------------------------------------------------------------------------------

@dataclass
class PreparedScan:
    """A scan ready for mapping.

    Attributes:
        original: the scan as read (its grid is the output map's grid).
        iso: the scan resampled to 1 mm (the grid the maps are computed on).
        lung: (X, Y, Z) bool lung voxels of ``iso``.
        subject_to_atlas: (4, 4) RAS matrix, subject world mm -> atlas world mm.
        atlas: the atlas of the store (landmark coordinate convention).
        hu: ``iso`` windowed to int16 HU like the store's patches.
    """

    original: CTVolume
    iso: CTVolume
    lung: np.ndarray
    subject_to_atlas: np.ndarray
    atlas: Atlas
    hu: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.lung.shape != self.iso.array.shape:
            raise ValueError(f"lung mask of shape {self.lung.shape} does not match the 1 mm "
                             f"scan of shape {self.iso.array.shape}")
        self.lung = self.lung.astype(bool, copy=False)
        self.hu = np.rint(np.clip(self.iso.array, *HU_WINDOW)).astype(np.int16)

    def coords_of_voxels(self, voxels: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices of ``iso`` -> (N, 3) float32 Loc-CondConv coordinates: the
        voxel's world point mapped into the atlas, then ``Atlas.coords_of_points``."""
        voxels = np.asarray(voxels, dtype=np.float64).reshape(-1, 3)
        world = voxels @ self.iso.affine[:3, :3].T + self.iso.affine[:3, 3]
        atlas_world = world @ self.subject_to_atlas[:3, :3].T + self.subject_to_atlas[:3, 3]
        return self.atlas.coords_of_points(atlas_world)


def store_atlas_and_transform(store: str | os.PathLike, subject_id: str
                              ) -> tuple[Atlas, np.ndarray]:
    """The store's atlas and the subject's saved subject-to-atlas matrix (clear errors)."""
    from drasclr.data.registration import load_subject_to_atlas
    from drasclr.data.store import PatchStore

    atlas = PatchStore(store).atlas()
    transforms = Path(store) / "transforms" / subject_id
    if not transforms.is_dir():
        raise FileNotFoundError(f"{transforms}: subject {subject_id!r} has no saved registration "
                                f"in the store {store} (run `drasclr preprocess` on its scan)")
    return atlas, load_subject_to_atlas(transforms)


def subject_of_image(store: str | os.PathLike, image: str | os.PathLike) -> str:
    """The subject id whose manifest ``source`` is ``image`` (same file), else the id
    preprocessing derives from the file name when the store has it."""
    from drasclr.data.preprocess import _subject_id_of
    from drasclr.data.store import PatchStore

    image = Path(image)
    manifest = PatchStore(store).manifest
    for row in manifest:
        with contextlib.suppress(OSError):
            if Path(row["source"]).exists() and os.path.samefile(row["source"], image):
                return row["subject_id"]
    guess = _subject_id_of(image)
    if any(row["subject_id"] == guess for row in manifest):
        return guess
    raise ValueError(f"{image}: no subject of the store {store} has this scan as its source; "
                     "give --subject")


def prepare_scan(image: str | os.PathLike | CTVolume, store: str | os.PathLike,
                 subject_id: str, lung_mask: str | os.PathLike | np.ndarray | None = None,
                 segmentation: str = "classical") -> PreparedScan:
    """Read, resample to 1 mm and find the lungs of a scan; load its saved registration.

    Args:
        image: the scan (any format ``read_ct`` reads) or a volume already read.
        store: the patch store that holds the subject's registration and names the atlas.
        subject_id: the subject's id in the store.
        lung_mask: a lung label file on the scan's grid (or an array on the 1 mm grid);
            default: ``segment_lungs`` as preprocessing does.
    """
    from drasclr.data.lung_segmentation import segment_lungs
    from drasclr.data.resample import resample_isotropic

    atlas, to_atlas = store_atlas_and_transform(store, subject_id)
    original = image if isinstance(image, CTVolume) else read_ct(image)
    iso = resample_isotropic(original, 1.0)
    if lung_mask is None:
        labels = segment_lungs(iso, segmentation)
        lung = _labels_on_grid(labels.labels, labels.affine, iso)
    elif isinstance(lung_mask, np.ndarray):
        lung = lung_mask
    else:
        mask = read_ct(lung_mask)
        if mask.array.shape != original.array.shape or not np.allclose(mask.affine, original.affine,
                                                                       atol=1e-3):
            raise ValueError(f"{lung_mask}: lung mask grid differs from the scan's {original.source}")
        lung = _labels_on_grid(mask.array, mask.affine, iso)
    return PreparedScan(original, iso, np.asarray(lung) > 0, to_atlas, atlas)


def _labels_on_grid(labels: np.ndarray, affine: np.ndarray, target: CTVolume) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto ``target``'s grid."""
    matrix = np.linalg.inv(affine) @ target.affine  # target index -> label index
    return ndimage.affine_transform(np.asarray(labels, dtype=np.uint8), matrix[:3, :3],
                                    matrix[:3, 3], output_shape=target.array.shape, order=0,
                                    mode="constant", cval=0) > 0


# -- patches and forward passes ---------------------------------------------------------------

class PatchGatherer:
    """Patches centred on voxels of a padded int16 HU volume held on the compute device."""

    def __init__(self, hu: np.ndarray, pad: int, device: torch.device) -> None:
        padded = np.pad(hu, pad, constant_values=AIR_HU)
        self.pad, self.shape = pad, hu.shape
        self.volume = torch.from_numpy(padded).to(device)

    def crop(self, start: np.ndarray, size: Sequence[int]) -> Tensor:
        """The box ``start .. start + size - 1`` (unpadded voxel indices), int16."""
        s = np.asarray(start) + self.pad
        if (s < 0).any() or (s + np.asarray(size) > np.asarray(self.volume.shape)).any():
            raise ValueError(f"crop at {start.tolist()} of size {list(size)} reaches beyond the "
                             f"{self.pad}-voxel padding")
        return self.volume[s[0]:s[0] + size[0], s[1]:s[1] + size[1], s[2]:s[2] + size[2]]

    def patches(self, voxels: np.ndarray) -> Tensor:
        """(N, 1, 32, 32, 32) network input of the patches centred on ``voxels`` (N, 3)."""
        corners = torch.as_tensor(np.asarray(voxels) - HALF + self.pad, device=self.volume.device)
        if (corners < 0).any() or (corners + PATCH_SIZE > torch.tensor(self.volume.shape,
                                                                      device=corners.device)).any():
            raise ValueError("patch reaches beyond the padding of the scan")
        # A strided view of every patch position; indexing copies only the N patches.
        windows = self.volume.unfold(0, PATCH_SIZE, 1).unfold(1, PATCH_SIZE, 1).unfold(
            2, PATCH_SIZE, 1)
        patches = windows[corners[:, 0], corners[:, 1], corners[:, 2]]
        return normalise_hu(patches)[:, None]


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast where the device computes it natively (when ``amp``; drasclr.precision)."""
    return autocast(device, use_bf16(device, amp))


class ChunkCache:
    """Chunk results of one map job in a work folder, each written atomically.

    The folder holds ``job.json`` with a fingerprint of everything the results depend on
    (scan, lung voxels, coordinates, encoder and head weights, mode, step); a folder left by
    another job is cleared rather than trusted.
    """

    def __init__(self, folder: Optional[str | os.PathLike], fingerprint: str) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is None:
            return
        job = self.folder / "job.json"
        if job.is_file():
            try:
                same = json.loads(job.read_text()).get("fingerprint") == fingerprint
            except (ValueError, OSError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not job.is_file():
            atomic_write_bytes(job, json.dumps({"format": WORK_FORMAT, "version": 1,
                                                "fingerprint": fingerprint}).encode())

    def _path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"chunk_{index:06d}.npy"

    def get(self, index: int, size: int) -> Optional[np.ndarray]:
        if self.folder is None or not self._path(index).is_file():
            return None
        try:
            values = np.load(self._path(index), allow_pickle=False)
        except (ValueError, OSError):
            return None
        return values if values.shape == (size,) else None

    def put(self, index: int, values: np.ndarray) -> None:
        if self.folder is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(values, dtype=np.float32))
            atomic_write_bytes(self._path(index), buffer.getvalue())

    def remove(self) -> None:
        if self.folder is not None and self.folder.is_dir():
            shutil.rmtree(self.folder)


def fingerprint(*parts: Any) -> str:
    """SHA-256 of arrays, tensors, modules (their state) and JSON-able values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            for name, value in part.state_dict().items():
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, np.ndarray):
            digest.update(str((part.dtype, part.shape)).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def exact_probabilities(
    encoder: nn.Module,
    head: nn.Module,
    scan: PreparedScan,
    voxels: np.ndarray,
    *,
    batch: int = 16,
    device: str | torch.device = "auto",
    amp: bool = True,
    chunk_voxels: int = 4096,
    work_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
    coordinate_block: int = 1,
    _coords: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Probability of the head's label at each voxel, from the 32^3 patch centred on it with
    the voxel's own atlas coordinate (Yu et al. 2023, Section 4.3.1, sliding window of step 1).

    Args:
        voxels: (N, 3) int voxel indices of ``scan.iso`` (any, also outside the scan: the
            padding is air).
        batch: patches per forward pass.
        chunk_voxels: voxels per saved chunk (rounded up to whole batches).
        work_dir: where chunk results are kept so an interrupted job resumes; None keeps
            nothing.
        coordinate_block: 1 (exact): every voxel its own coordinate. B > 1: an approximation
            in which the voxels of each B^3 block share the coordinate of the block centre
            and are batched together, so a batch mixes few kernels (faster where the backend
            pays per distinct coordinate; measured in benchmarks/bench_densemap.py).
    Returns:
        (N,) float32 probabilities.
    """
    voxels = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
    device = resolve_device(device)
    if coordinate_block != 1:
        if not isinstance(coordinate_block, int) or coordinate_block < 1:
            raise ValueError(f"coordinate_block: expected a positive int, got {coordinate_block!r}")
        blocks = voxels // coordinate_block
        order = np.lexsort(blocks.T[::-1])  # block by block, so a batch spans few blocks
        values = np.empty(len(voxels), dtype=np.float32)
        centres = blocks[order] * coordinate_block + (coordinate_block - 1) / 2.0
        values[order] = exact_probabilities(
            encoder, head, scan, voxels[order], batch=batch, device=device, amp=amp,
            chunk_voxels=chunk_voxels, work_dir=work_dir, progress=progress,
            _coords=scan.coords_of_voxels(centres))
        return values
    coords = scan.coords_of_voxels(voxels) if _coords is None else _coords
    chunk_voxels = max(batch, math.ceil(chunk_voxels / batch) * batch)
    starts = range(0, len(voxels), chunk_voxels)
    cache = ChunkCache(work_dir, fingerprint("exact", voxels, coords, scan.hu, encoder, head,
                                             chunk_voxels, batch, amp, str(device)))
    if len(voxels):
        pad = HALF + int(max(0, -voxels.min()) + max(0, (voxels - scan.hu.shape).max() + 1))
    else:
        pad = HALF
    gatherer = PatchGatherer(scan.hu, pad, device)
    encoder, head = encoder.to(device).eval(), head.to(device).eval()
    out = np.empty(len(voxels), dtype=np.float32)
    bar = tqdm(total=len(voxels), desc="dense map (exact)", unit="voxel", disable=not progress)
    with bar, torch.inference_mode():
        for index, start in enumerate(starts):
            stop = min(start + chunk_voxels, len(voxels))
            values = cache.get(index, stop - start)
            if values is None:
                values = np.empty(stop - start, dtype=np.float32)
                for b in range(start, stop, batch):
                    e = min(b + batch, stop)
                    x = gatherer.patches(voxels[b:e])
                    loc = torch.from_numpy(coords[b:e]).to(device)
                    with _autocast(device, amp):
                        h = encoder(x, loc)
                    values[b - start:e - start] = head(h.float()).cpu().numpy()
                    bar.update(e - b)
                cache.put(index, values)
            else:
                bar.update(stop - start)
            out[start:stop] = values
    return out


# -- fast mode: the encoder as one fully convolutional pass per block --------------------------

@dataclass(frozen=True)
class DenseLayer:
    """One conv-BN-ELU layer of the encoder with its kernel mixed at one coordinate."""

    weight: Tensor
    bias: Optional[Tensor]
    dilation: int
    bn: nn.BatchNorm3d


def dense_layers(encoder: nn.Module, coord: Tensor) -> list[DenseLayer]:
    """The encoder's layers as stride-1 convolutions, dilated by the accumulated stride, with
    every location-conditioned kernel mixed once at ``coord`` (3,)."""
    from drasclr.nn.conditioning import HyperConv3d, PlainConv3d
    from drasclr.nn.loc_cond_conv import LocCondConv3d

    pairs = [(encoder.conv1, encoder.bn1), (encoder.conv2, encoder.bn2)]
    for block in (encoder.downsample1, encoder.downsample2, encoder.downsample3):
        pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    pairs += [(encoder.conv3, encoder.bn3), (encoder.conv4, encoder.bn4)]
    layers, dilation = [], 1
    for conv, bn in pairs:
        if isinstance(conv, LocCondConv3d):
            routing = torch.sigmoid(conv.routing(coord.to(conv.routing.weight.dtype)))
            weight = torch.einsum("e,e...->...", routing, conv.weight)
        elif isinstance(conv, HyperConv3d):
            weight = conv.generator(coord.to(conv.generator[0].weight.dtype)).view(conv.kernel_shape)
        elif isinstance(conv, PlainConv3d):
            weight = conv.weight
        else:
            raise ValueError(f"the dense pass does not know the layer type {type(conv).__name__}")
        stride = conv.stride[0] if isinstance(conv.stride, tuple) else conv.stride
        layers.append(DenseLayer(weight, conv.bias, dilation, bn))
        dilation *= stride
    return layers


def receptive_margin(layers: Sequence[DenseLayer]) -> int:
    """Voxels each side that the dense pass consumes: 76 for the DrasCLR encoder."""
    return sum(layer.dilation * (layer.weight.shape[-1] // 2) for layer in layers)


def run_dense(layers: Sequence[DenseLayer], x: Tensor) -> Tensor:
    """Conv (no padding, the layer's dilation), BN, ELU for each layer in turn."""
    for layer in layers:
        x = F.conv3d(x, layer.weight.to(x.dtype), None if layer.bias is None
                     else layer.bias.to(x.dtype), dilation=layer.dilation)
        x = F.elu(layer.bn(x))
    return x


def dense_features(encoder: nn.Module, x: Tensor, coord: Tensor) -> Tensor:
    """h of every position of x (1, 1, D, H, W), no padding: output (1, rep, D-2m, H-2m, W-2m)
    with m = ``receptive_margin`` (76). Output q is the representation of the patch whose
    corner is input position q + m, except that the patch's zero padding at every layer is
    replaced by the data around it (the shift-and-stitch equivalence of strided networks:
    the stride-s network applied to x[q:] gives output 0 equal to the dense output q)."""
    x = run_dense(dense_layers(encoder, coord), x)
    fuse = getattr(encoder, "fuse", None)
    if fuse is not None:  # the "concat" ablation: coordinates joined to h at every position
        h = x.movedim(1, -1)
        h = fuse(torch.cat([h, coord.to(h.dtype).expand(*h.shape[:-1], 3)], dim=-1))
        x = h.movedim(-1, 1)
    return x


def fast_probabilities(
    encoder: nn.Module,
    head: nn.Module,
    scan: PreparedScan,
    voxels: np.ndarray,
    *,
    block: int = 32,
    device: str | torch.device = "auto",
    amp: bool = True,
    work_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> np.ndarray:
    """Probabilities at ``voxels`` (N, 3) from one dense pass per ``block``^3 tile of the 1 mm
    grid that holds any of them, kernels mixed at the tile centre's coordinate.

    Not an approximation of :func:`exact_probabilities` (see the module docstring); tiles are
    the resumable chunks. Memory grows with (block + 152)^3 x 128 channels at the last layers.
    """
    voxels = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
    device = resolve_device(device)
    encoder, head = encoder.to(device).eval(), head.to(device).eval()
    tiles = voxels // block
    keys, inverse = np.unique(tiles, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    cache = ChunkCache(work_dir, fingerprint("fast", voxels, scan.hu, scan.subject_to_atlas,
                                             scan.atlas.corners, encoder, head, block, amp,
                                             str(device)))
    with torch.inference_mode():
        margin = receptive_margin(dense_layers(encoder, torch.zeros(3, device=device)))
    low = margin + HALF  # output q of a crop starting at s is voxel s + margin + HALF
    high = margin - HALF + 1  # ... so a tile needs low voxels before it and high - 1 after
    pad = low + block + int(max(0, -voxels.min(initial=0)) +
                            max(0, (voxels - scan.hu.shape).max(initial=0)))
    gatherer = PatchGatherer(scan.hu, pad, device)
    out = np.empty(len(voxels), dtype=np.float32)
    order = np.argsort(inverse, kind="stable")
    splits = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(keys)))[:-1])
    with torch.inference_mode():
        for index, (key, members) in enumerate(tqdm(list(zip(keys, splits)), unit="block",
                                                    desc="dense map (fast)",
                                                    disable=not progress)):
            values = cache.get(index, len(members))
            if values is None:
                start = key * block
                centre = start + (block - 1) / 2.0
                coord = torch.from_numpy(scan.coords_of_voxels(centre[None])[0]).to(device)
                crop = gatherer.crop(start - low, [block + low + high - 1] * 3)
                x = normalise_hu(crop)[None, None]
                with _autocast(device, amp):
                    h = dense_features(encoder, x, coord)  # (1, rep, block, block, block)
                probs = head(h[0].float().movedim(0, -1))  # (block, block, block)
                local = voxels[members] - start
                values = probs[local[:, 0], local[:, 1], local[:, 2]].cpu().numpy()
                cache.put(index, values)
            out[members] = values
    return out


# -- whole maps -------------------------------------------------------------------------------

def grid_points_for(targets: np.ndarray, step: int) -> np.ndarray:
    """(M, 3) voxels of the grid ``step * k`` that trilinear interpolation needs to fill the
    ``targets`` mask: grid point g is needed when a target voxel lies within ``step - 1``
    voxels of it on every axis (a voxel on a grid plane needs only that plane)."""
    padded = np.pad(np.asarray(targets, dtype=np.uint8), [(0, step)] * 3)
    needed = ndimage.maximum_filter(padded, size=2 * step - 1, mode="constant")
    return np.argwhere(needed[::step, ::step, ::step]) * step


def interpolate_grid(values: np.ndarray, points: np.ndarray, step: int,
                     targets: np.ndarray) -> np.ndarray:
    """Trilinear interpolation from values at grid ``points`` (multiples of ``step``) to the
    voxels of ``targets``; exact (the value itself) on the grid points."""
    index = points // step
    grid = np.zeros(index.max(axis=0) + 2, dtype=np.float64)
    grid[index[:, 0], index[:, 1], index[:, 2]] = values
    where = np.argwhere(targets)
    filled = ndimage.map_coordinates(grid, (where / step).T, order=1, mode="nearest",
                                     prefilter=False)
    out = np.zeros(targets.shape, dtype=np.float32)
    out[targets] = filled  # argwhere and boolean indexing share C order
    return out


def probability_map(
    encoder: nn.Module,
    head: nn.Module,
    scan: PreparedScan,
    *,
    step: int = 1,
    region: Optional[np.ndarray] = None,
    batch: int = 16,
    device: str | torch.device = "auto",
    amp: bool = True,
    chunk_voxels: int = 4096,
    work_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
    coordinate_block: int = 1,
) -> np.ndarray:
    """The probability map on the 1 mm grid of ``scan``: values at its lung voxels (within
    ``region`` when given, a bool mask of the same grid), 0 elsewhere.

    ``step=S`` evaluates the grid ``S * k`` and interpolates; the result equals the step-1
    map on the grid voxels. ``coordinate_block`` > 1 is the shared-coordinate approximation
    of :func:`exact_probabilities`.
    """
    check_step(step)
    targets = scan.lung if region is None else scan.lung & np.asarray(region, dtype=bool)
    if not targets.any():
        raise ValueError(f"{scan.original.source}: no lung voxels to map")
    voxels = np.argwhere(targets) if step == 1 else grid_points_for(targets, step)
    values = exact_probabilities(encoder, head, scan, voxels, batch=batch, device=device, amp=amp,
                                 chunk_voxels=chunk_voxels, work_dir=work_dir, progress=progress,
                                 coordinate_block=coordinate_block)
    if step == 1:
        out = np.zeros(targets.shape, dtype=np.float32)
        out[targets] = values
        return out
    return interpolate_grid(values, voxels, step, targets)


def check_step(step: int) -> int:
    check_number("step", step, AT_LEAST_ONE)
    return int(step)


def to_original_grid(map_iso: np.ndarray, iso_affine: np.ndarray, shape: Sequence[int],
                     affine: np.ndarray) -> np.ndarray:
    """Resample a map from the 1 mm grid to the scan's own grid (trilinear), so it overlays
    the input scan voxel for voxel."""
    matrix = np.linalg.inv(iso_affine) @ affine  # original index -> 1 mm index
    if np.allclose(matrix, np.eye(4), atol=1e-6) and tuple(shape) == map_iso.shape:
        return map_iso.astype(np.float32, copy=False)
    return ndimage.affine_transform(map_iso.astype(np.float32), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=tuple(shape), order=1, mode="constant",
                                    cval=0.0).astype(np.float32)


def write_map(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
              percent: bool = False) -> Path:
    """Write a probability map as NIfTI, atomically: float32 in [0, 1], or uint8 percent."""
    import nibabel as nib

    path = Path(path)
    if percent:
        data = np.rint(np.clip(array, 0, 1) * 100).astype(np.uint8)
    else:
        data = np.asarray(array, dtype=np.float32)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    if not percent:
        image.header["cal_min"], image.header["cal_max"] = 0.0, 1.0
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as temporary:
        nib.save(image, str(temporary))
    return path


@dataclass
class DenseMapResult:
    """What :func:`densemap` did: the map file, its subject, step, timings."""

    path: Path
    subject_id: str
    label: str
    step: int
    voxels: int
    seconds: float
    map_iso: np.ndarray = field(repr=False)
    scan: PreparedScan = field(repr=False)
    mapped: np.ndarray = field(repr=False)  # bool, the 1 mm voxels that have a value

    def on_scan_grid(self, volume: np.ndarray) -> np.ndarray:
        """A volume of the 1 mm grid (the map, ``mapped``) on the scan's own grid."""
        original = self.scan.original
        return to_original_grid(np.asarray(volume, dtype=np.float32), self.scan.iso.affine,
                                original.array.shape, original.affine)


def work_dir_for(out: str | os.PathLike) -> Path:
    """The work folder of a map job: hidden, beside the output."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def densemap(
    image: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    head_path: str | os.PathLike,
    checkpoint: Optional[str | os.PathLike] = None,
    subject_id: Optional[str] = None,
    *,
    step: int = 1,
    batch: int = 16,
    device: str | torch.device = "auto",
    amp: bool = True,
    lung_mask: Optional[str | os.PathLike] = None,
    region: Optional[np.ndarray] = None,
    percent: bool = False,
    chunk_voxels: int = 4096,
    progress: bool = True,
    encoder: Optional[nn.Module] = None,
) -> DenseMapResult:
    """The whole job of ``drasclr densemap``: map one scan and write it on the scan's grid.

    The head and encoder come from ``head_path`` (and ``checkpoint`` for a linear probe,
    :func:`drasclr.evaluation.head.head_and_encoder`); ``encoder`` overrides the encoder
    (tests). Chunks are kept in :func:`work_dir_for` ``(out)`` until the map is written.
    """
    from drasclr.evaluation.head import check_head_matches, head_and_encoder, load_head

    check_step(step)
    check_number("batch", batch, AT_LEAST_ONE)
    check_number("chunk_voxels", chunk_voxels, AT_LEAST_ONE)
    started = time.perf_counter()
    device = resolve_device(device)
    if subject_id is None:
        subject_id = subject_of_image(store, image)
    store_atlas_and_transform(store, subject_id)  # cheap checks first: registration, atlas
    if encoder is None:
        head, encoder, metadata = head_and_encoder(head_path, checkpoint, device)
    else:
        head, _, metadata = load_head(head_path, map_location=device)
        check_head_matches(head, encoder, head_path, "the given encoder")
    scan = prepare_scan(image, store, subject_id, lung_mask)
    work = work_dir_for(out)
    map_iso = probability_map(encoder, head, scan, step=step, region=region,
                              batch=batch, device=device, amp=amp,
                              chunk_voxels=chunk_voxels, work_dir=work, progress=progress)
    original = scan.original
    on_grid = to_original_grid(map_iso, scan.iso.affine, original.array.shape, original.affine)
    path = write_map(out, on_grid, original.affine, percent=percent)
    shutil.rmtree(work, ignore_errors=True)
    targets = scan.lung if region is None else scan.lung & region
    return DenseMapResult(path, subject_id, metadata["label"], step, int(targets.sum()),
                          time.perf_counter() - started, map_iso, scan, targets)


# -- scoring ----------------------------------------------------------------------------------

def box_voxels(shape: Sequence[int], affine: np.ndarray, centre_mm: np.ndarray,
               box_mm: float = 32.0) -> np.ndarray:
    """(N, 3) indices of the grid's voxels whose centres lie in the world-axis-aligned cube of
    edge ``box_mm`` centred at ``centre_mm`` (half-open: [c - e/2, c + e/2))."""
    half = box_mm / 2.0
    centre = np.asarray(centre_mm, dtype=np.float64)
    corners = centre + half * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1], indexing="ij")
                                       ).reshape(3, -1).T
    to_voxel = np.linalg.inv(affine)
    idx = corners @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    low = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, np.asarray(shape))
    if (high <= low).any():
        return np.zeros((0, 3), dtype=np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"),
                    axis=-1).reshape(-1, 3)
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    inside = np.all((world >= centre - half - 1e-6) & (world < centre + half - 1e-6), axis=1)
    return grid[inside]


def box_detections(prob: np.ndarray, affine: np.ndarray, centres_mm: np.ndarray,
                   box_mm: float = 32.0, threshold: float = DETECTION_THRESHOLD,
                   min_fraction: float = DETECTION_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """The paper's detection rule (Yu et al. 2023, Section 4.3.1): a box is detected when at
    least ``min_fraction`` of its voxels have probability above ``threshold``.

    Returns:
        (detected (N,) bool, fraction (N,) of the box's voxels above the threshold; NaN for a
        box with no voxel in the map).
    """
    centres_mm = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    fractions = np.full(len(centres_mm), np.nan)
    for i, centre in enumerate(centres_mm):
        idx = box_voxels(prob.shape, affine, centre, box_mm)
        if len(idx):
            fractions[i] = float(np.mean(prob[idx[:, 0], idx[:, 1], idx[:, 2]] > threshold))
    detected = np.nan_to_num(fractions, nan=0.0) >= min_fraction
    return detected, fractions


def box_scores(detected: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """Box-level precision, recall and F1 (0 where undefined) with the counts."""
    detected, positive = np.asarray(detected, bool), np.asarray(positive, bool)
    tp = int(np.sum(detected & positive))
    fp = int(np.sum(detected & ~positive))
    fn = int(np.sum(~detected & positive))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


def subject_boxes(annotations: str | os.PathLike, subject_id: str, label: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Box centres (N, 3) world mm of one subject from an annotation CSV (``subject_id, label,
    x_mm, y_mm, z_mm``, as the synthetic cohort's ``annotations.csv``) and whether each is a
    ``label`` box; only ``label`` and ``healthy`` boxes, as the paper's subtype-vs-healthy task."""
    import csv

    path = Path(annotations)
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        mine = [r for r in rows if r["subject_id"] == subject_id and r["label"] in (label, "healthy")]
        centres = np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in mine])
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not an annotation CSV with subject_id, label, x_mm, y_mm, "
                         f"z_mm ({error!r})") from None
    return centres.reshape(-1, 3), np.array([r["label"] == label for r in mine], dtype=bool)


def truth_scores(prob: np.ndarray, truth: np.ndarray, lung: np.ndarray,
                 threshold: float = DETECTION_THRESHOLD) -> dict[str, float]:
    """Voxel-level agreement of a map with the true lesion mask, within the lung.

    Returns ``auc`` (``sklearn.metrics.roc_auc_score``; NaN when the lung holds only one
    class), ``dice`` of ``prob > threshold`` with the truth (1 when both are empty), the
    lesion ``prevalence`` and ``voxels`` in the lung.
    """
    from sklearn.metrics import roc_auc_score

    if not (prob.shape == truth.shape == lung.shape):
        raise ValueError(f"map {prob.shape}, truth {truth.shape} and lung {lung.shape} must "
                         "share one grid")
    lung = np.asarray(lung, bool)
    p, t = np.asarray(prob)[lung].astype(np.float64), np.asarray(truth)[lung].astype(bool)
    auc = float(roc_auc_score(t, p)) if 0 < t.sum() < t.size else float("nan")
    predicted = p > threshold
    denominator = predicted.sum() + t.sum()
    dice = float(2 * np.sum(predicted & t) / denominator) if denominator else 1.0
    return {"auc": auc, "dice": dice, "prevalence": float(t.mean()) if t.size else float("nan"),
            "voxels": int(t.size)}


def agreement(fast: np.ndarray, exact: np.ndarray,
              threshold: float = DETECTION_THRESHOLD) -> dict[str, float]:
    """Fast against exact map at the same voxels: Pearson r, Dice at ``threshold``, mean and
    max absolute difference."""
    a, b = np.asarray(fast, np.float64).ravel(), np.asarray(exact, np.float64).ravel()
    r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    pa, pb = a > threshold, b > threshold
    denominator = pa.sum() + pb.sum()
    dice = float(2 * np.sum(pa & pb) / denominator) if denominator else 1.0
    return {"pearson": r, "dice": dice, "mean_abs": float(np.abs(a - b).mean()),
            "max_abs": float(np.abs(a - b).max())}


# -- report -----------------------------------------------------------------------------------

@dataclass
class MapEvaluation:
    """One subject's map scored against its truth, everything on the scan's own grid.

    Attributes:
        subject_id, label: whose map, of which subtype.
        scan: (X, Y, Z) HU; prob: the map; truth: true lesion mask of that subtype (bool);
        lung: bool lung mask; affine: the grid's affine.
        boxes_mm: (N, 3) annotated box centres; box_positive: (N,) bool, box of the subtype.
    """

    subject_id: str
    label: str
    scan: np.ndarray
    prob: np.ndarray
    truth: np.ndarray
    lung: np.ndarray
    affine: np.ndarray
    boxes_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    box_positive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def scores(self) -> dict[str, float]:
        scores = truth_scores(self.prob, self.truth, self.lung)
        detected, _ = box_detections(self.prob, self.affine, self.boxes_mm)
        boxes = box_scores(detected, self.box_positive)
        scores.update({f"box_{k}": v for k, v in boxes.items()})
        return scores


def evaluate_map(result: DenseMapResult, lesions: str | os.PathLike,
                 annotations: Optional[str | os.PathLike] = None,
                 lesion_label: Optional[int] = None) -> MapEvaluation:
    """Score a :func:`densemap` result against a true lesion label file on the scan's grid
    (the synthetic cohort's ``lesions/<id>.nii.gz``), within the mapped lung voxels, and
    against the subject's boxes in ``annotations`` when given.

    ``lesion_label`` is the subtype's value in ``lesions`` (default :func:`lesion_value` of the
    map's label). Everything is put on the scan's own grid, as the map file is.
    """
    value = lesion_value(result.label) if lesion_label is None else lesion_label
    original = result.scan.original
    truth = read_ct(lesions)
    if truth.array.shape != original.array.shape or not np.allclose(truth.affine, original.affine,
                                                                    atol=1e-3):
        raise ValueError(f"{lesions}: lesion grid {truth.array.shape} differs from the scan's "
                         f"{original.array.shape} ({original.source})")
    centres, positive = (subject_boxes(annotations, result.subject_id, result.label)
                         if annotations is not None else (np.zeros((0, 3)), np.zeros(0, bool)))
    return MapEvaluation(result.subject_id, result.label, original.array,
                         result.on_scan_grid(result.map_iso), np.rint(truth.array) == value,
                         result.on_scan_grid(result.mapped) >= 0.5, original.affine, centres,
                         positive)


def overlay_figure(evaluation: MapEvaluation, path: str | os.PathLike) -> Path:
    """PNG of the axial slice with the most true lesion in the mapped lung (else most lung): the scan in grey,
    the true lesion outline, the probability map semi-transparent (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z_axis = int(np.argmax(np.abs(evaluation.affine[2, :3])))  # the axis along world z
    reduce_axes = tuple(a for a in range(3) if a != z_axis)
    counts = (evaluation.truth & evaluation.lung).sum(axis=reduce_axes)
    if counts.max() == 0:
        counts = evaluation.lung.sum(axis=reduce_axes)
    z = int(np.argmax(counts))

    def axial(volume: np.ndarray) -> np.ndarray:
        return np.take(volume, z, axis=z_axis).T  # rows: second in-plane axis

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.imshow(np.clip(axial(evaluation.scan), -1024, 240), cmap="gray", origin="lower")
    shown = np.ma.masked_where(axial(evaluation.lung) == 0, axial(evaluation.prob))
    image = axis.imshow(shown, cmap="magma", vmin=0, vmax=1, alpha=0.55, origin="lower")
    if axial(evaluation.truth).any():
        axis.contour(axial(evaluation.truth).astype(float), levels=[0.5], colors="cyan",
                     linewidths=0.8)
    axis.set_title(f"{evaluation.subject_id}: P({evaluation.label}), slice {z}", fontsize=9)
    axis.axis("off")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def report_sections(evaluations: Sequence[MapEvaluation], report_dir: str | os.PathLike,
                    max_figures: int = 3, agreement_rows: Sequence[Sequence] = ()) -> list:
    """The dense-map part of the report: the truth table (voxel AUC and Dice against the true
    lesions, box-level detection by the paper's rule) and up to ``max_figures`` overlays,
    written under ``report_dir/densemap/``. ``agreement_rows``: optional rows
    (subject, Pearson r, Dice) of fast against exact maps."""
    from drasclr.evaluation.report import Figure, Score, Section, Table

    report_dir = Path(report_dir)
    rows, figures, per_metric = [], [], {}
    for evaluation in evaluations:
        s = evaluation.scores()
        rows.append([evaluation.subject_id, evaluation.label, s["auc"], s["dice"],
                     100 * s["prevalence"], s["box_f1"], s["box_precision"], s["box_recall"]])
        for key in ("auc", "dice", "box_f1", "box_precision", "box_recall"):
            per_metric.setdefault(key, []).append(s[key])
    for evaluation in list(evaluations)[:max_figures]:
        name = f"densemap/{evaluation.subject_id}_{evaluation.label}.png"
        overlay_figure(evaluation, report_dir / name)
        figures.append(Figure(f"{evaluation.subject_id}: {evaluation.label} probability",
                              Path(name), "Axial slice: scan (grey), true lesion outline (cyan), "
                              "probability map (colour, lung only)."))
    if per_metric:
        rows.append(["all", "", *[Score.of([v for v in per_metric[k] if np.isfinite(v)])
                                  for k in ("auc", "dice")], "",
                     *[Score.of(per_metric[k]) for k in ("box_f1", "box_precision",
                                                         "box_recall")]])
    tables = [Table("Dense maps against the true lesions",
                    ["subject", "subtype", "voxel AUC", "Dice (p > 0.5)", "lesion % of lung",
                     "box F1", "box precision", "box recall"], rows,
                    "Within the lung; boxes: 32 mm, detected when >= 25% of voxels have p > 0.5 "
                    "(Yu et al. 2023, Section 4.3.1).")]
    if agreement_rows:
        tables.append(Table("Fast against exact maps", ["subject", "Pearson r", "Dice (p > 0.5)"],
                            [list(row) for row in agreement_rows]))
    intro = ("Probability of each emphysema subtype at every lung voxel, from the 32^3 patch "
             "centred on it with its own atlas coordinate (the paper's sliding window, Fig. 3), "
             "scored against the synthetic cohort's true lesion masks.")
    return [Section("Dense voxel maps", intro, tables, figures)]


def lesion_value(label: str) -> int:
    """The synthetic cohort's lesion label of a subtype name."""
    if label not in LESION_LABELS:
        raise ValueError(f"label {label!r}: no lesion value known; expected one of "
                         f"{sorted(LESION_LABELS)}")
    return LESION_LABELS[label]


__all__ = [
    "DenseMapResult", "MapEvaluation", "PatchGatherer", "PreparedScan", "agreement",
    "box_detections", "box_scores", "box_voxels", "subject_boxes", "check_step", "dense_features",
    "densemap", "evaluate_map", "exact_probabilities", "fast_probabilities", "interpolate_grid",
    "overlay_figure", "prepare_scan", "probability_map", "report_sections", "subject_of_image",
    "to_original_grid", "truth_scores", "write_map",
]
