"""Which Loc-CondConv calls the fused Triton kernels handle.

Pure PyTorch on purpose: the caller asks this before it imports Triton, so a machine without
Triton (or without a GPU) gets a reason to fall back instead of an ImportError.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from drasclr.conv_common import IntOrTriple, as_triple

SUPPORTED_KERNEL_SIZES = (1, 3)
SUPPORTED_STRIDES = (1, 2)
SUPPORTED_PADDINGS = (0, 1)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported_reason(
    x: Tensor,
    weight: Tensor,
    stride: IntOrTriple,
    padding: IntOrTriple,
    dilation: IntOrTriple,
    groups: int,
) -> str | None:
    """None when the fused kernels handle this convolution, else a short reason.

    Args:
        x: (B, C_in, D, H, W) input.
        weight: (E, C_out, C_in, kD, kH, kW) experts.
        stride, padding, dilation: as for ``nn.Conv3d`` (int or 3 ints).
        groups: the convolution's channel groups (``nn.Conv3d`` meaning), not landmarks.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if x.device.type != "cuda" and not interpreter_enabled():
        return f"the Triton kernels need a CUDA tensor (got {x.device.type}; TRITON_INTERPRET unset)"
    if x.dim() != 5 or weight.dim() != 6:
        return f"expected a 5-D input and 6-D experts, got {x.dim()}-D and {weight.dim()}-D"
    if groups != 1:
        return f"groups={groups} (only groups=1)"
    kernel_size = tuple(weight.shape[3:])
    if any(k not in SUPPORTED_KERNEL_SIZES for k in kernel_size):
        return f"kernel size {kernel_size} (only {SUPPORTED_KERNEL_SIZES})"
    try:
        stride3 = as_triple(stride, "stride")
        padding3 = as_triple(padding, "padding")
        dilation3 = as_triple(dilation, "dilation")
    except ValueError as error:
        return str(error)
    if any(s not in SUPPORTED_STRIDES for s in stride3):
        return f"stride {stride3} (only {SUPPORTED_STRIDES})"
    if any(p not in SUPPORTED_PADDINGS for p in padding3):
        return f"padding {padding3} (only {SUPPORTED_PADDINGS})"
    if dilation3 != (1, 1, 1):
        return f"dilation {dilation3} (only 1)"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} (only float32, bfloat16, float16)"
    if not weight.is_floating_point():
        return f"experts dtype {weight.dtype} is not floating point"
    return None
