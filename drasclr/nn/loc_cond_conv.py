"""Loc-CondConv: a 3D convolution whose kernel depends on the patch's atlas location.

Yu et al. 2023, Section 2.2, eqs. 3-4 (docs/method.md#loc-condconv): for a patch at normalised
atlas coordinate p,

    r = sigmoid(W_r p + b_r)              (E,)  one unnormalised weight per expert
    kernel = sum_e r_e * W_e               mixture of E expert kernels
    y = conv3d(x, kernel) + bias           one shared bias, not mixed

Backends (same numbers, different speed):
    "loop":    one sample at a time, like the reference; the test and benchmark baseline.
    "grouped": routing and mixture once per distinct landmark, then all samples in a few
               grouped convolutions (``conv3d_by_landmark``).
    "triton":  the fused kernels of ``drasclr.kernels``; falls back to "grouped"
               with a warning when they are missing or do not cover the call.
    "auto":    "triton" for supported CUDA calls once the kernels have passed their
               self-check on the device (``drasclr.nn.triton_check``), otherwise "grouped".
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drasclr.conv_common import IntOrTriple, LandmarkPartition, as_partition, as_triple, check_loc
from drasclr.nn.grouped_conv import conv3d_by_landmark
from drasclr.nn.triton_check import triton_trusted

BACKENDS = ("auto", "loop", "grouped", "triton")

Loc = Union[Tensor, LandmarkPartition]


def loc_cond_conv3d(
    x: Tensor,
    loc: Loc,
    weight: Tensor,
    routing_weight: Tensor,
    routing_bias: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    dilation: IntOrTriple = 1,
    groups: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Functional Loc-CondConv (Yu et al. 2023, eqs. 3-4).

    Args:
        x: (B, C_in, D, H, W) input patches.
        loc: (B, 3) normalised atlas coordinates, (3,) for the whole batch, or the batch's
            ``LandmarkPartition`` (computed once per batch and shared by all layers).
        weight: (E, C_out, C_in / groups, kD, kH, kW) expert kernels.
        routing_weight: (E, 3) and routing_bias: (E,), the routing ``Linear(3, E)``.
        bias: (C_out,) shared bias, or None.
        stride, padding, dilation, groups: as for ``F.conv3d``.
        backend: one of ``BACKENDS``.

    Returns:
        (B, C_out, D', H', W').
    """
    check_backend(backend)
    _check_conv_args(x, weight, routing_weight, routing_bias, bias, stride, padding, dilation,
                     groups)
    batch = x.shape[0]
    if batch == 0:  # like nn.Conv3d: an empty batch gives an empty output of the right shape
        return F.conv3d(x, weight[0], bias, stride, padding, dilation, groups)
    if backend == "loop":
        return _loop(x, loc, weight, routing_weight, routing_bias, bias,
                     stride, padding, dilation, groups)

    partition = as_partition(loc, batch)
    routing = torch.sigmoid(F.linear(partition.coords.to(routing_weight.dtype),
                                     routing_weight, routing_bias))  # (G, E)
    triton_fn = None
    auto_triton = backend == "auto" and _auto_tries_triton(x.device)
    if backend == "triton" or auto_triton:
        triton_fn, reason = _triton_kernel(x, weight, stride, padding, dilation, groups)
        if reason is not None:  # never silently: "auto" on CUDA warns too
            _warn_fallback_once(reason)
    if triton_fn is not None and auto_triton and not triton_trusted(x.device, _compute_dtype(x)):
        triton_fn = None  # the self-check failed on this device: it has warned once
    if triton_fn is not None:
        return triton_fn(x, weight, routing, bias, partition, stride, padding, dilation)

    kernels = torch.einsum("ge,e...->g...", routing, weight)  # mixture once per landmark
    return conv3d_by_landmark(x, kernels, bias, partition, stride, padding, dilation, groups)


class LocCondConv3d(nn.Module):
    """Loc-CondConv layer (Yu et al. 2023, eqs. 3-4), a drop-in for ``nn.Conv3d`` taking
    ``(x, loc)``.

    Parameters are laid out so an authors' checkpoint loads by a key rename
    (``<layer>._routing_fn.fc.*`` -> ``<layer>.routing.*``, docs/method.md#the-authors-checkpoints):

    Attributes:
        weight: (E, C_out, C_in / groups, k, k, k), the experts; each initialised exactly as
            ``nn.Conv3d`` initialises its weight.
        bias: (C_out,), shared by all experts, initialised as ``nn.Conv3d``'s bias; or None.
        routing: ``nn.Linear(3, E)``; routing weights are ``sigmoid(routing(loc))``.
        backend: one of ``BACKENDS``, settable at any time.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTriple,
        stride: IntOrTriple = 1,
        padding: IntOrTriple = 0,
        dilation: IntOrTriple = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 8,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: {groups} must divide in_channels ({in_channels}) and "
                             f"out_channels ({out_channels})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_triple(kernel_size, "kernel_size")
        self.stride = as_triple(stride, "stride")
        self.padding = as_triple(padding, "padding")
        self.dilation = as_triple(dilation, "dilation")
        self.groups, self.num_experts = groups, num_experts
        self.backend = backend

        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # skip_init: all parameters are drawn in reset_parameters, experts first, so that
        # expert 0 is exactly what nn.Conv3d would draw from the same seed.
        self.routing = nn.utils.skip_init(nn.Linear, 3, num_experts)
        self.reset_parameters()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend(name)

    def reset_parameters(self) -> None:
        """Each expert and the bias exactly as ``nn.Conv3d.reset_parameters`` (fan-in of one
        expert, C_in/groups * k^3), unlike the reference whose 6-D tensor gets a fan-in of
        C_out * C_in * k^3; the routing as ``nn.Linear``."""
        for expert in self.weight:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].shape[1:].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.routing.reset_parameters()

    def forward(self, x: Tensor, loc: Loc) -> Tensor:
        return loc_cond_conv3d(
            x, loc, self.weight, self.routing.weight, self.routing.bias, self.bias,
            self.stride, self.padding, self.dilation, self.groups, self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, "
                f"num_experts={self.num_experts}, backend={self.backend!r}")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def per_sample_coords(loc: Loc, batch_size: int) -> Tensor:
    """(B, 3) coordinates of each sample from any accepted ``loc`` form (validated)."""
    if isinstance(loc, LandmarkPartition):
        partition = as_partition(loc, batch_size)
        return partition.coords[partition.index]
    return check_loc(loc, batch_size).expand(batch_size, 3)


def _check_conv_args(x: Tensor, weight: Tensor, routing_weight: Tensor, routing_bias: Tensor,
                     bias: Optional[Tensor], stride: IntOrTriple, padding: IntOrTriple,
                     dilation: IntOrTriple, groups: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 5-D tensor (B, C, D, H, W), got {shape}")
    if weight.dim() != 6:
        raise ValueError(f"weight: expected 6-D experts (E, C_out, C_in/groups, k, k, k), "
                         f"got shape {tuple(weight.shape)}")
    num_experts, c_out, c_in_per_group = weight.shape[:3]
    if x.shape[1] != c_in_per_group * groups:
        raise ValueError(f"x: expected {c_in_per_group * groups} channels "
                         f"(weight has {c_in_per_group} per group, groups={groups}), "
                         f"got {x.shape[1]}")
    if (tuple(routing_weight.shape) != (num_experts, 3)
            or tuple(routing_bias.shape) != (num_experts,)):
        raise ValueError(f"routing_weight/routing_bias: expected shapes ({num_experts}, 3) and "
                         f"({num_experts},), got {tuple(routing_weight.shape)} and "
                         f"{tuple(routing_bias.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
    as_triple(stride, "stride")
    padded = [size + 2 * pad for size, pad in zip(x.shape[2:], as_triple(padding, "padding"))]
    extent = [d * (k - 1) + 1 for d, k in zip(as_triple(dilation, "dilation"), weight.shape[3:])]
    if any(p < e for p, e in zip(padded, extent)):
        raise ValueError(f"x: spatial size {tuple(x.shape[2:])} (padded {tuple(padded)}) is "
                         f"smaller than the kernel's extent {tuple(extent)}")


def _loop(x: Tensor, loc: Loc, weight: Tensor, routing_weight: Tensor, routing_bias: Tensor,
          bias: Optional[Tensor], stride: IntOrTriple, padding: IntOrTriple,
          dilation: IntOrTriple, groups: int) -> Tensor:
    """The reference semantics, one sample (one routing, one mixture, one conv) at a time."""
    coords = per_sample_coords(loc, x.shape[0]).to(routing_weight.dtype)
    outputs = []
    for sample, coord in zip(x, coords):
        routing = torch.sigmoid(F.linear(coord, routing_weight, routing_bias))
        kernel = torch.einsum("e,e...->...", routing, weight)  # autocast-aware, as grouped
        outputs.append(F.conv3d(sample[None], kernel, bias, stride, padding, dilation, groups))
    return torch.cat(outputs)


def _auto_tries_triton(device: torch.device) -> bool:
    """Where "auto" considers the fused kernels: CUDA devices."""
    return device.type == "cuda"


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the kernels will compute in: the autocast dtype inside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _triton_kernel(x: Tensor, weight: Tensor, stride: IntOrTriple, padding: IntOrTriple,
                   dilation: IntOrTriple, groups: int) -> tuple[Optional[Callable], Optional[str]]:
    """(the fused kernel, None) when it covers this call, else (None, why not)."""
    try:
        from drasclr import kernels

        unsupported_reason = getattr(kernels, "triton_unsupported_reason", None)
        if unsupported_reason is None:
            return None, "drasclr.kernels has no triton_unsupported_reason yet"
        reason = unsupported_reason(x, weight, stride, padding, dilation, groups)
        if reason is not None:
            return None, reason
        kernel = getattr(kernels, "loc_cond_conv3d_triton", None)
    except ImportError as error:
        return None, f"drasclr.kernels cannot be imported ({error})"
    if kernel is None:
        return None, "drasclr.kernels has no loc_cond_conv3d_triton yet"
    return kernel, None


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(reason: str) -> None:
    """Warn the first time each reason makes the Triton path fall back (once per reason)."""
    warnings.warn(f'LocCondConv3d falls back to "grouped" (Triton does not cover this call): {reason}',
                  RuntimeWarning, stacklevel=4)
