"""Triton kernels, imported as ``drasclr.kernels`` (this folder is mapped by setup.py).

``triton_unsupported_reason`` needs no Triton; the kernel entry points import Triton on first
use, so ``import drasclr.kernels`` works on machines without it (the caller then falls back).
"""
from .support import triton_unsupported_reason

_KERNEL_API = (
    "loc_cond_conv3d_triton",
    "loc_cond_conv3d_forward",
    "loc_cond_conv3d_grad_input",
    "loc_cond_conv3d_grad_mixed_kernel",
    "LocCondConv3dFunction",
)

__all__ = ["triton_unsupported_reason", *_KERNEL_API]


def __getattr__(name: str):
    if name in _KERNEL_API:
        from . import loc_cond_conv3d

        return getattr(loc_cond_conv3d, name)
    raise AttributeError(f"module 'drasclr.kernels' has no attribute {name!r}")
