"""The exact sliding window: the probability of every asked voxel from the 32^3 patch centred
on it, with the voxel's own atlas coordinate (Yu et al. 2023, Section 4.3.1).

Voxel v (index of the 1 mm grid) is the patch ``v - 16 .. v + 15`` on every axis (v at index
``P // 2``; scans are padded with air, -1024 HU, as the store's patches), windowed to int16 HU
exactly like the store (``drasclr.data.subject``) and normalised with
``drasclr.intensity.normalise_hu``. Voxels are evaluated in batches (each sample with its own
coordinate: the encoder mixes one kernel per sample, ``drasclr.conv_common``), in chunks whose
results are kept by :class:`~drasclr.evaluation.densemap.chunks.ChunkCache`, so memory stays
bounded for a whole lung and an interrupted job resumes. On CUDA the volume lives on the
device, patches are gathered there and the encoder runs under bf16 autocast (``amp=False``
for float32).

Why not MONAI's ``sliding_window_inference``: it tiles the image with ROI-sized windows and
blends ROI-sized outputs; a step-1 map would be a window per voxel whose predictor returns a
32^3 output that is blended into the image (32768 times the memory traffic of one number per
voxel), it windows the whole box rather than the lung voxels, and near the image border it
shifts windows inwards instead of padding, so they would no longer be centred on their voxel.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from drasclr.data.patches import AIR_HU, PATCH_SIZE
from drasclr import precision
from drasclr.device import resolve_device
from drasclr.evaluation.densemap.chunks import ChunkCache, fingerprint
from drasclr.evaluation.densemap.scan import PreparedScan
from drasclr.intensity import normalise_hu

#: Voxel v is patch index HALF of its patch: the patch covers v - HALF .. v + HALF - 1.
HALF = PATCH_SIZE // 2


class PatchGatherer:
    """Patches centred on voxels of a padded int16 HU volume held on the compute device."""

    def __init__(self, hu: np.ndarray, pad: int, device: torch.device) -> None:
        padded = np.pad(hu, pad, constant_values=AIR_HU)
        self.pad, self.shape = pad, hu.shape
        self.volume = torch.from_numpy(padded).to(device)

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


#: Dense maps run bf16 autocast by default on a CPU with native bf16: every patch has its own
#: location, and the per-patch kernel mixtures and convolutions ran 1.30x (1.27-1.61x) faster
#: in bf16 than in float32 (benchmarks/RESULTS.md, "CPU ceiling, part 3").
CPU_BF16 = True


def autocast(device: torch.device, amp: bool):
    """bf16 autocast where it pays (when ``amp``; drasclr.precision), else float32."""
    return precision.autocast(device, precision.use_bf16(device, amp, cpu_default=CPU_BF16))


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
    coords: Optional[np.ndarray] = None,
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
        coords: (N, 3) Loc-CondConv coordinates of the voxels; default each voxel's own
            (``scan.coords_of_voxels``), the paper's map. Others (e.g. one shared by a block
            of voxels) give a different map.
    Returns:
        (N,) float32 probabilities.
    """
    voxels = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
    device = resolve_device(device)
    coords = scan.coords_of_voxels(voxels) if coords is None else np.asarray(coords, np.float32)
    if coords.shape != voxels.shape:
        raise ValueError(f"coords: expected shape {voxels.shape} (one per voxel), got {coords.shape}")
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
                    with autocast(device, amp):
                        h = encoder(x, loc)
                    values[b - start:e - start] = head(h.float()).cpu().numpy()
                    bar.update(e - b)
                cache.put(index, values)
            else:
                bar.update(stop - start)
            out[start:stop] = values
    return out


