"""The encoder as one fully convolutional pass per block of voxels: kept for the benchmark
only (``bench_densemap.py``), not a map mode of the library.

The "dilation trick": each stride-2 layer becomes stride 1 and later layers are dilated by the
accumulated stride, Loc-CondConv kernels mixed once per block at the block centre. It is a
different estimator from the exact window (``drasclr.evaluation.densemap``): the exact window
zero-pads the patch at every layer (at the 2^3 and 1^3 levels most taps are padding), the
dense pass sees the real neighbourhood there; ``benchmarks/RESULTS.md`` has the measured
speed and disagreement.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from drasclr.device import resolve_device
from drasclr.evaluation.densemap import (
    HALF, ChunkCache, PatchGatherer, PreparedScan, autocast, fingerprint,
)
from drasclr.evaluation.densemap.scoring import DETECTION_THRESHOLD
from drasclr.intensity import normalise_hu


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
                s = start - low + gatherer.pad  # the tile and its margins, unpadded voxel s .. s + edge - 1
                edge = block + low + high - 1
                crop = gatherer.volume[s[0]:s[0] + edge, s[1]:s[1] + edge, s[2]:s[2] + edge]
                x = normalise_hu(crop)[None, None]
                with autocast(device, amp):
                    h = dense_features(encoder, x, coord)  # (1, rep, block, block, block)
                probs = head(h[0].float().movedim(0, -1))  # (block, block, block)
                local = voxels[members] - start
                values = probs[local[:, 0], local[:, 1], local[:, 2]].cpu().numpy()
                cache.put(index, values)
            out[members] = values
    return out


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

