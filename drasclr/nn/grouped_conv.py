"""Convolve every sample with the kernel of its landmark, in a few large calls.

Every location-conditioned layer of this package (Loc-CondConv, the hypernetwork ablation)
ends in the same step: G per-landmark kernels, B samples, sample b convolved with the kernel
of its landmark. Calling ``F.conv3d`` once per sample (as the authors' code does)
leaves the hardware idle between tiny calls. Instead, the batch is *interleaved*: groups of
equal size n form a bucket, laid out sample-major (sample 0 of each group of the bucket, then
sample 1, ...). A bucket is then a free view

    (n * G_n, C_in, D, H, W) -> (n, G_n * C_in, D, H, W)

and one grouped convolution (``partition = G_n * conv_groups``) applies all G_n kernels at once.
A batch with uniform groups (the usual sampling) is a single bucket and a single call.
Where a group's output is tiny (few samples x few voxels, the encoder's last layers with many
landmarks) a batched matmul over unfolded patches replaces the grouped convolution, which
oneDNN runs slowly there.

Reordering a large activation costs about as much as the convolution itself on CPU, so an
encoder interleaves its input ONCE (``interleave``) and passes the ``InterleavedPartition`` to
every layer, which then needs no copies at all; a lone layer given an ordinary
``LandmarkPartition`` interleaves and restores its own input and output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from drasclr.conv_common import IntOrTriple, LandmarkPartition, as_triple

# Buckets whose per-group output has at most this many columns (samples x output voxels) run
# as a batched matmul instead of a grouped convolution (measured on CPU, benchmarks/RESULTS.md).
GEMM_MAX_COLUMNS = 8


@dataclass(frozen=True)
class Bucket:
    """Batch positions ``[start, start + count * len(members))``: ``count`` samples of each
    of the groups ``members`` ((G_n,) long tensor), sample-major."""

    start: int
    count: int
    members: Tensor


@dataclass(frozen=True)
class InterleavedPartition(LandmarkPartition):
    """The grouping of a batch already in interleaved order (see the module docstring).

    A full ``LandmarkPartition`` (``index``, ``order``, ``offsets`` describe the interleaved
    batch), so every backend accepts it; ``buckets`` lets ``conv3d_by_landmark`` skip reordering.
    """

    buckets: tuple[Bucket, ...]


def interleave(partition: LandmarkPartition) -> tuple[Optional[Tensor], InterleavedPartition]:
    """Permutation to the interleaved batch order and the grouping of the permuted batch.

    Returns:
        (perm, interleaved): ``x[perm]`` is the interleaved batch (perm is None when the batch
        already is), described by ``interleaved``.
    """
    if isinstance(partition, InterleavedPartition):
        return None, partition
    device = partition.order.device
    if partition.num_landmarks == 1:  # any order is interleaved
        bucket = Bucket(0, partition.batch_size, torch.zeros(1, dtype=torch.long, device=device))
        return None, InterleavedPartition(
            coords=partition.coords, index=partition.index, order=partition.order,
            offsets=partition.offsets, counts=partition.counts, buckets=(bucket,))
    by_count: dict[int, list[int]] = {}
    for group, count in enumerate(partition.counts):
        by_count.setdefault(count, []).append(group)
    buckets, samples, start = [], [], 0
    for count, member_list in by_count.items():
        members = torch.tensor(member_list, device=device)
        first = partition.offsets[members]  # (G_n,) first sorted position of each member group
        positions = torch.arange(count, device=device)[:, None] + first[None, :]  # (n, G_n)
        samples.append(partition.order[positions.reshape(-1)])
        buckets.append(Bucket(start, count, members))
        start += count * len(member_list)
    perm = torch.cat(samples)
    index = partition.index[perm]
    interleaved = InterleavedPartition(
        coords=partition.coords, index=index, order=torch.argsort(index, stable=True),
        offsets=partition.offsets, counts=partition.counts, buckets=tuple(buckets))
    return perm, interleaved


def conv3d_by_landmark(
    x: Tensor,
    kernels: Tensor,
    bias: Optional[Tensor],
    partition: LandmarkPartition,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    dilation: IntOrTriple = 1,
    conv_groups: int = 1,
) -> Tensor:
    """Sample b convolved with ``kernels[partition.index[b]]`` (plus ``bias``), as ``F.conv3d``.

    Args:
        x: (B, C_in, D, H, W).
        kernels: (G, C_out, C_in / conv_groups, kD, kH, kW), one kernel per landmark group.
        bias: (C_out,) shared by all partition, or None.
        partition: the batch's landmark grouping; an ``InterleavedPartition`` avoids all copies.
        stride, padding, dilation, conv_groups: as ``stride``, ``padding``, ``dilation`` and
            ``groups`` of ``F.conv3d``.

    Returns:
        (B, C_out, D', H', W') in the order of x.
    """
    if kernels.shape[0] != partition.num_landmarks:
        raise ValueError(f"kernels: expected {partition.num_landmarks} per-landmark kernels "
                         f"(one per group), got {kernels.shape[0]}")
    if partition.num_landmarks == 1:
        return F.conv3d(x, kernels[0], bias, stride, padding, dilation, conv_groups)
    if not isinstance(partition, InterleavedPartition):
        perm, interleaved = interleave(partition)
        y = conv3d_by_landmark(x[perm], kernels, bias, interleaved, stride, padding, dilation,
                            conv_groups)
        return y[torch.argsort(perm)]

    stride, padding, dilation = (as_triple(v, name) for v, name in (
        (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    # a list, not a generator: torch.compile cannot trace math.prod of a generator
    out_voxels = math.prod([(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in zip(
        x.shape[2:], kernels.shape[3:], stride, padding, dilation)])
    # split, not one narrow per bucket: a narrow's backward fills a zero gradient of all of x
    x_buckets = x.split([bucket.count * bucket.members.shape[0] for bucket in partition.buckets])
    outputs = []
    for bucket, x_bucket in zip(partition.buckets, x_buckets):
        num_members = bucket.members.shape[0]
        bucket_kernels = kernels if num_members == partition.num_landmarks else kernels[bucket.members]
        gemm = (bucket.count * out_voxels <= GEMM_MAX_COLUMNS and conv_groups == 1
                and dilation == (1, 1, 1))
        if gemm:
            y = _bucket_gemm(x_bucket, bucket_kernels, bias, bucket.count, stride, padding)
        else:
            y = _bucket_conv(x_bucket, bucket_kernels, bias, bucket.count, stride, padding,
                             dilation, conv_groups)
        outputs.append(y)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def is_channels_last(x: Tensor) -> bool:
    """Whether a 5-D activation is laid out channels-last (``torch.channels_last_3d``); a
    one-channel tensor is both layouts and counts as channels-first."""
    return x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last_3d)


def _bucket_conv(x: Tensor, kernels: Tensor, bias: Optional[Tensor], count: int,
                 stride: tuple, padding: tuple, dilation: tuple, conv_groups: int) -> Tensor:
    """One grouped convolution over an interleaved bucket (the groups side by side).

    Channels-first, the bucket's (n * G_n, C, ...) -> (n, G_n * C, ...) is a free view.
    Channels-last it is not (a sample's voxels lie between its group's channels and the next
    group's), so the input is copied once into (n, D, H, W, G_n, C) order and the output back,
    gradients likewise (whether the faster channels-last convolutions pay for the copies:
    benchmarks/cpu_ceiling.py)."""
    num_members = kernels.shape[0]
    channels_last = num_members > 1 and is_channels_last(x)
    if channels_last:
        x_grouped = _SideBySide.apply(x, num_members)
    else:
        x_grouped = x.reshape(count, num_members * x.shape[1], *x.shape[2:])
    y = F.conv3d(
        x_grouped,
        kernels.reshape(-1, *kernels.shape[2:]),
        None if bias is None else bias.repeat(num_members),
        stride, padding, dilation, num_members * conv_groups,
    )
    if channels_last:
        return _OneByOne.apply(y, num_members)
    return y.reshape(x.shape[0], kernels.shape[1], *y.shape[2:])


def _side_by_side(x: Tensor, groups: int) -> Tensor:
    """Channels-last (n G, C, D, H, W) -> channels-last (n, G C, D, H, W), one copy."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    packed = x.unflatten(0, (-1, groups)).permute(0, 3, 4, 5, 1, 2).contiguous()  # n D H W G C
    return packed.flatten(4).permute(0, 4, 1, 2, 3)


def _one_by_one(y: Tensor, groups: int) -> Tensor:
    """Channels-last (n, G C, D, H, W) -> channels-last (n G, C, D, H, W), one copy."""
    y = y.contiguous(memory_format=torch.channels_last_3d)
    y = y.permute(0, 2, 3, 4, 1).unflatten(4, (groups, -1))  # (n, D, H, W, G, C)
    y = y.permute(0, 4, 1, 2, 3, 5).contiguous().flatten(0, 1)  # memory (n G, D, H, W, C)
    return y.permute(0, 4, 1, 2, 3)


class _SideBySide(torch.autograd.Function):
    """``_side_by_side`` whose gradient is ``_one_by_one``: autograd's own backward of the
    permutes would hand the next layer a channels-first gradient, which every elementwise
    backward (BatchNorm, ELU) then reads against channels-last activations, many times slower."""

    @staticmethod
    def forward(ctx, x: Tensor, groups: int) -> Tensor:
        ctx.groups = groups
        return _side_by_side(x, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _one_by_one(grad, ctx.groups), None


class _OneByOne(torch.autograd.Function):
    """``_one_by_one`` whose gradient is ``_side_by_side`` (see ``_SideBySide``)."""

    @staticmethod
    def forward(ctx, y: Tensor, groups: int) -> Tensor:
        ctx.groups = groups
        return _one_by_one(y, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _side_by_side(grad, ctx.groups), None


def _bucket_gemm(x: Tensor, kernels: Tensor, bias: Optional[Tensor], count: int,
                 stride: tuple, padding: tuple) -> Tensor:
    """The same (dilation 1, conv_groups 1) as one batched matmul over unfolded patches,
    (G_n, C_out, C_in k^3) @ (G_n, C_in k^3, n * voxels). Used where the per-group output
    (n * voxels columns) is tiny, as in the encoder's last layers: there oneDNN's many-group
    convolution is several times slower than plain convolution (benchmarks/RESULTS.md)."""
    num_members, c_out = kernels.shape[:2]
    kernel_size = kernels.shape[3:]
    columns = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for dim, (k, s) in enumerate(zip(kernel_size, stride)):
        columns = columns.unfold(2 + dim, k, s)  # (N, C, D', H', W', kD, kH, kW)
    out_size = columns.shape[2:5]
    columns = columns.reshape(count, num_members, x.shape[1], *out_size, *kernel_size)
    columns = columns.permute(1, 2, 6, 7, 8, 0, 3, 4, 5).reshape(
        num_members, -1, count * math.prod(out_size))  # rows (C, kD, kH, kW) as in kernels
    y = torch.bmm(kernels.reshape(num_members, c_out, -1), columns)
    y = y.view(num_members, c_out, count, *out_size).permute(2, 0, 1, 3, 4, 5)
    y = y.reshape(x.shape[0], c_out, *out_size)
    return y if bias is None else y + bias.view(-1, 1, 1, 1)
