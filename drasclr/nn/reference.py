"""The float64 reference of Loc-CondConv: its semantics in plain lines, one sample at a time.

Tests and benchmarks compare every backend (and the Triton kernels) against this, as the Triton
tutorials keep a reference beside each kernel. Slow on purpose: nothing here is batched or fused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from drasclr.conv_common import IntOrTriple


def reference_loc_cond_conv3d(x: Tensor, loc: Tensor, weight: Tensor, routing_weight: Tensor,
                              routing_bias: Tensor, bias: Optional[Tensor] = None,
                              stride: IntOrTriple = 1, padding: IntOrTriple = 0,
                              dilation: IntOrTriple = 1, groups: int = 1) -> Tensor:
    """Loc-CondConv (Yu et al. 2023, Section 2.2) in float64. For the sample at atlas
    coordinate p: routing r = sigmoid(W_r p + b_r) (eq. 4), kernel = sum_e r_e W_e (eq. 3),
    y = conv3d(x, kernel) + bias with one bias shared by the experts.

    Args:
        x: (B, C_in, D, H, W); loc: (B, 3) or (3,) normalised atlas coordinates.
        weight: (E, C_out, C_in / groups, kD, kH, kW); routing_weight: (E, 3); routing_bias: (E,).
        bias, stride, padding, dilation, groups: as for ``F.conv3d``.
    """
    p = loc.double().expand(x.shape[0], 3)
    routing = torch.sigmoid(p @ routing_weight.double().T + routing_bias.double())  # (B, E)
    return reference_mixed_conv3d(x, routing, weight, bias, stride, padding, dilation, groups)


def reference_mixed_conv3d(x: Tensor, routing: Tensor, weight: Tensor,
                           bias: Optional[Tensor] = None, stride: IntOrTriple = 1,
                           padding: IntOrTriple = 0, dilation: IntOrTriple = 1,
                           groups: int = 1) -> Tensor:
    """Sample b convolved with ``sum_e routing[b, e] * weight[e]`` (eq. 3) plus ``bias``, in
    float64; the routing (B, E) is given, as the Triton kernels take it."""
    weight, bias = weight.double(), None if bias is None else bias.double()
    # starts with the empty output of no sample, so an empty batch gets the right shape too
    outputs = [F.conv3d(x[:0].double(), weight[0], bias, stride, padding, dilation, groups)]
    for sample, r in zip(x.double(), routing.double()):
        kernel = torch.einsum("e,e...->...", r, weight)
        outputs.append(F.conv3d(sample[None], kernel, bias, stride, padding, dilation, groups))
    return torch.cat(outputs)
