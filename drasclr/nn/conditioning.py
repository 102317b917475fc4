"""How the atlas location enters each convolution: the encoder's ablation variants.

Every convolution of the encoder is called as ``conv(x, partition)``, so one backbone serves all
variants (``Encoder(conditioning=...)``, Yu et al. 2023, Section 4.4.1, Table 6):

    "loc_condconv"  ``LocCondConv3d``, the method (Section 2.2);
    "hypernetwork"  ``HyperConv3d``: a small MLP maps the coordinate to the layer's kernel;
    "none"/"concat" ``PlainConv3d``, location-blind ("concat" adds the coordinate after the
                    backbone, in the encoder).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from drasclr.conv_common import IntOrTriple, as_partition, as_triple
from drasclr.nn.grouped_conv import conv3d_by_landmark
from drasclr.nn.loc_cond_conv import Loc, LocCondConv3d

CONDITIONINGS = ("loc_condconv", "hypernetwork", "concat", "none")


class PlainConv3d(nn.Conv3d):
    """``nn.Conv3d`` with the conditioned layers' call signature; the location is ignored."""

    def forward(self, x: Tensor, loc: Optional[Loc] = None) -> Tensor:
        return super().forward(x)


class HyperConv3d(nn.Module):
    """Hypernetwork convolution: kernel = MLP(p), MLP = Linear(3, hidden), ReLU,
    Linear(hidden, C_out * C_in * k^3); one shared bias. As in Loc-CondConv, the kernel is
    generated once per distinct landmark and applied with ``conv3d_by_landmark``.

    Initialisation: the generated kernel starts at ``nn.Conv3d``'s scale (the last layer's
    bias drawn like a Conv3d weight, its weight small), so the variants start comparably.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTriple,
                 stride: IntOrTriple = 1, padding: IntOrTriple = 0, hidden: int = 8,
                 bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_triple(kernel_size, "kernel_size")
        self.stride = as_triple(stride, "stride")
        self.padding = as_triple(padding, "padding")
        self.kernel_shape = (out_channels, in_channels, *self.kernel_size)
        self.generator = nn.Sequential(
            nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(self.kernel_shape)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = math.prod(self.kernel_shape[1:])
        bound = 1 / math.sqrt(fan_in)  # nn.Conv3d's bound for weight and bias
        self.generator[0].reset_parameters()
        last = self.generator[2]
        nn.init.kaiming_uniform_(last.bias.view(self.kernel_shape), a=math.sqrt(5))
        nn.init.uniform_(last.weight, -bound / last.in_features, bound / last.in_features)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, loc: Loc) -> Tensor:
        partition = as_partition(loc, x.shape[0])
        coords = partition.coords.to(self.generator[0].weight.dtype)
        kernels = self.generator(coords).view(partition.num_landmarks, *self.kernel_shape)
        return conv3d_by_landmark(x, kernels, self.bias, partition, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


def make_conv3x3(conditioning: str, in_channels: int, out_channels: int, stride: int,
                 num_experts: int, backend: str) -> nn.Module:
    """The encoder's 3x3x3, padding 1 convolution (Yu et al. 2023, Section 3) for a conditioning."""
    if conditioning == "loc_condconv":
        return LocCondConv3d(in_channels, out_channels, 3, stride, 1,
                             num_experts=num_experts, backend=backend)
    if conditioning == "hypernetwork":
        return HyperConv3d(in_channels, out_channels, 3, stride, 1)
    if conditioning in ("none", "concat"):
        return PlainConv3d(in_channels, out_channels, 3, stride, 1)
    raise ValueError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")

