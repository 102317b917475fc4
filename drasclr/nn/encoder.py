"""The DrasCLR encoder: 3D CNN over 32^3 patches, conditioned on the atlas location.

Architecture of Yu et al. 2023, Section 3, as the authors' ``models/cnn3d.py`` builds it
(docs/method.md#encoder); layer attribute names are the reference's so its checkpoints load
by a key rename (``drasclr.checkpoint_formats``), with
``head`` for its projection ``fc``. Every convolution is 3x3x3, padding 1, then BatchNorm3d
and ELU (after ``bn4`` too):

    conv1 1->8, conv2 8->8 /2                                   32^3 -> 16^3
    downsample1..3: a->b, b->b, b->b /2 with 8->16, 16->32, 32->64    -> 2^3
    conv3 64->128, conv4 128->rep_dim /2, flatten: h                  -> 1^3
    head: Linear(rep, rep), ReLU, Linear(rep, moco_dim): z = head(h)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from drasclr.conv_common import as_partition
from drasclr.data.patches import PATCH_SIZE
from drasclr.nn.conditioning import CONDITIONINGS, make_conv3x3
from drasclr.nn.grouped_conv import interleave
from drasclr.nn.loc_cond_conv import Loc, LocCondConv3d, check_backend, per_sample_coords


#: Axis orders of the patches an encoder's weights expect: drasclr's patches are cut in the
#: scan's voxel order (x, y, z); the authors' come from SimpleITK arrays, which are (z, y, x)
#: of the same voxels (docs/method.md#patch-axis-order).
PATCH_AXES = ("xyz", "zyx")


class ConvBlock(nn.Module):
    """Three conv-BN-ELU layers, the last with stride 2 (the reference's ``Block``)."""

    def __init__(self, in_channels: int, out_channels: int, conv_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.conv1 = make_conv3x3(in_channels=in_channels, out_channels=out_channels, stride=1,
                                  **conv_kwargs)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = make_conv3x3(in_channels=out_channels, out_channels=out_channels,
                                  stride=1, **conv_kwargs)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.conv3 = make_conv3x3(in_channels=out_channels, out_channels=out_channels,
                                  stride=2, **conv_kwargs)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.act = nn.ELU(inplace=True)

    def forward(self, x: Tensor, loc: Optional[Loc]) -> Tensor:
        x = self.act(self.bn1(self.conv1(x, loc)))
        x = self.act(self.bn2(self.conv2(x, loc)))
        return self.act(self.bn3(self.conv3(x, loc)))


class Encoder(nn.Module):
    """DrasCLR encoder (Yu et al. 2023, Section 3): ``encoder(x, loc) -> h``,
    ``encoder.head(h) -> z``.

    Args:
        rep_dim: size of the representation h (128 in the paper).
        moco_dim: size of the projection z used by the contrastive loss (128).
        num_experts: experts per Loc-CondConv layer (8).
        conditioning: how location enters, one of ``CONDITIONINGS``: "loc_condconv" (the
            method), "hypernetwork", "concat" (coordinates concatenated to h and fused by
            Linear(rep+3, rep), ReLU, Linear(rep, rep)), "none" (plain convolutions).
        backend: Loc-CondConv backend (``drasclr.nn.BACKENDS``) of every layer; settable at
            any time (``encoder.backend = "grouped"``).
        patch_axes: the axis order the weights were trained on, one of ``PATCH_AXES``;
            patches always come in drasclr's (x, y, z) order and an encoder of the authors'
            weights ("zyx") transposes them first.

    ``Encoder(**encoder.config)`` rebuilds the same architecture. ``encoder.channels_last =
    True`` lays its activations out channels-last (same numbers, a speed setting; see
    ``drasclr.precision``).
    """

    def __init__(self, rep_dim: int = 128, moco_dim: int = 128, num_experts: int = 8,
                 conditioning: str = "loc_condconv", backend: str = "auto",
                 patch_axes: str = "xyz") -> None:
        super().__init__()
        for name, value in (("rep_dim", rep_dim), ("moco_dim", moco_dim),
                            ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")
        if patch_axes not in PATCH_AXES:
            raise ValueError(f"patch_axes: expected one of {PATCH_AXES}, got {patch_axes!r}")
        self.patch_axes = patch_axes
        self.rep_dim, self.moco_dim, self.num_experts = rep_dim, moco_dim, num_experts
        self.conditioning = conditioning
        self._backend = check_backend(backend)
        # activations channels-last (torch.channels_last_3d): a speed setting, not architecture
        # (drasclr.precision decides it per device), so not in ``config``
        self.channels_last = False

        conv_kwargs = dict(conditioning=conditioning, num_experts=num_experts, backend=backend)
        self.conv1 = make_conv3x3(in_channels=1, out_channels=8, stride=1, **conv_kwargs)
        self.bn1 = nn.BatchNorm3d(8)
        self.conv2 = make_conv3x3(in_channels=8, out_channels=8, stride=2, **conv_kwargs)
        self.bn2 = nn.BatchNorm3d(8)
        self.downsample1 = ConvBlock(8, 16, conv_kwargs)
        self.downsample2 = ConvBlock(16, 32, conv_kwargs)
        self.downsample3 = ConvBlock(32, 64, conv_kwargs)
        self.conv3 = make_conv3x3(in_channels=64, out_channels=128, stride=1, **conv_kwargs)
        self.bn3 = nn.BatchNorm3d(128)
        self.conv4 = make_conv3x3(in_channels=128, out_channels=rep_dim, stride=2, **conv_kwargs)
        self.bn4 = nn.BatchNorm3d(rep_dim)
        self.act = nn.ELU(inplace=True)
        self.fuse = (nn.Sequential(nn.Linear(rep_dim + 3, rep_dim), nn.ReLU(),
                                   nn.Linear(rep_dim, rep_dim))
                     if conditioning == "concat" else None)
        self.head = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.ReLU(),
                                  nn.Linear(rep_dim, moco_dim))

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``Encoder(**encoder.config)`` rebuilds this encoder."""
        return dict(rep_dim=self.rep_dim, moco_dim=self.moco_dim, num_experts=self.num_experts,
                    conditioning=self.conditioning, backend=self.backend,
                    patch_axes=self.patch_axes)

    @property
    def backend(self) -> str:
        """The Loc-CondConv backend (``drasclr.nn.BACKENDS``); setting it sets every layer's."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend(name)
        for module in self.modules():
            if isinstance(module, LocCondConv3d):
                module.backend = name

    def forward(self, x: Tensor, loc: Loc) -> Tensor:
        """h (B, rep_dim) of patches x (B, 1, 32, 32, 32) at locations loc: (B, 3)
        normalised atlas coordinates, (3,) for the whole batch, or a ``LandmarkPartition``."""
        patch_shape = (1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != patch_shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected patches of shape (B, 1, {PATCH_SIZE}, {PATCH_SIZE}, "
                             f"{PATCH_SIZE}), got {shape}")
        if x.shape[0] == 0:  # like nn.Conv3d: an empty batch gives an empty output
            return x.new_empty(0, self.rep_dim)
        if self.patch_axes == "zyx":
            x = x.transpose(2, 4)
        if self.conditioning in ("none", "concat"):
            coords = per_sample_coords(loc, x.shape[0])  # validated even when unused
            h = self._features(x, None)
            if self.fuse is None:
                return h
            return self.fuse(torch.cat([h, coords.to(h.dtype)], dim=1))

        # Group the batch by landmark once, and put it in the order in which every layer
        # convolves its landmark groups without copying activations (see grouped_conv).
        perm, partition = interleave(as_partition(loc, x.shape[0]))
        if perm is None:
            return self._features(x, partition)
        return self._features(x[perm], partition)[torch.argsort(perm)]

    def _features(self, x: Tensor, loc: Optional[Loc]) -> Tensor:
        x = self.conv1(x, loc)
        if self.channels_last:  # a one-channel input has no layout: the first activation sets it
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.act(self.bn1(x))
        x = self.act(self.bn2(self.conv2(x, loc)))
        x = self.downsample1(x, loc)
        x = self.downsample2(x, loc)
        x = self.downsample3(x, loc)
        x = self.act(self.bn3(self.conv3(x, loc)))
        x = self.act(self.bn4(self.conv4(x, loc)))
        return torch.flatten(x, 1)
