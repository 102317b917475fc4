"""The check `backend="auto"` runs before it trusts the fused Triton kernels on a device.

A kernel that compiles can still compute wrong numbers on a GPU, driver or Triton version it
was never tested on. So the first "auto" call on a CUDA device (per process, per device and
input dtype) runs the kernels once on a small random batch, forward and backward, against the
"grouped" backend; if they disagree beyond the dtype's tolerance, or raise, "auto" uses
"grouped" on that device from then on, with one warning saying why.

`triton_self_check` takes the device, so the tests run it on the CPU under the Triton
interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from drasclr.conv_common import LandmarkPartition
from drasclr.nn.grouped_conv import conv3d_by_landmark

#: Largest error allowed, as a fraction of the grouped result's largest magnitude: float32
#: may run as TF32 on CUDA (cudnn.allow_tf32, on by default for convolutions), half precision
#: rounds the mixed kernel to the input dtype. A kernel with a bug misses by far more.
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_passed: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> the check's outcome


def triton_trusted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether "auto" may use the Triton kernels on ``device`` for ``dtype`` inputs: the first
    call runs `triton_self_check` (once per process, device and dtype); a failure warns once."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _passed:
        reason = triton_self_check(device, dtype)
        if reason is not None:
            warnings.warn(f'backend "auto": the Triton kernels failed their self-check on '
                          f'{device} ({dtype}): {reason}; using "grouped" there instead',
                          RuntimeWarning, stacklevel=2)
        _passed[key] = reason is None
    return _passed[key]


def triton_self_check(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """None when the fused kernels agree with "grouped" on ``device`` (a small batch of uneven
    landmark groups, stride 1 and 2, output and every gradient), else what went wrong."""
    from drasclr import kernels

    if dtype not in TOLERANCE:
        return f"no tolerance known for {dtype}"
    generator = torch.Generator().manual_seed(0)
    landmarks = torch.tensor([2, 0, 2, 1, 2])
    coords = torch.rand(3, 3, generator=generator) * 2 - 1
    partition = LandmarkPartition.from_loc(coords[landmarks].to(device), len(landmarks))
    x = torch.randn(len(landmarks), 4, 6, 5, 4, generator=generator).to(device, dtype)
    weight = (torch.randn(3, 8, 4, 3, 3, 3, generator=generator) / 10).to(device)
    routing = torch.rand(3, 3, generator=generator).to(device)
    bias = torch.randn(8, generator=generator).to(device)
    # a check inside someone's no_grad, inference or autocast block still needs gradients
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        for stride in (1, 2):
            inputs = [t.detach().clone().requires_grad_() for t in (x, weight, routing, bias)]
            try:
                fused = kernels.loc_cond_conv3d_triton(*inputs, partition, stride, 1)
                grad_out = torch.randn(fused.shape, generator=generator).to(device, dtype)
                outcome = [fused, *torch.autograd.grad(fused, inputs, grad_out)]
            except Exception as error:  # any failure of the kernels means: do not use them
                return f"stride {stride}: {type(error).__name__}: {error}"
            expected = _grouped(x, weight, routing, bias, partition, stride, grad_out)
            for name, actual, wanted in zip(("output", "grad x", "grad weight", "grad routing",
                                             "grad bias"), outcome, expected):
                problem = _compare(actual, wanted, TOLERANCE[dtype])
                if problem is not None:
                    return f"stride {stride}, {name}: {problem}"
    return None


def _grouped(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor,
             partition: LandmarkPartition, stride: int, grad_out: Tensor) -> list[Tensor]:
    """Output and gradients of the same call on the "grouped" path, in float32."""
    inputs = [t.detach().float().requires_grad_() for t in (x, weight, routing, bias)]
    x32, weight32, routing32, bias32 = inputs
    kernels = torch.einsum("ge,e...->g...", routing32, weight32)
    out = conv3d_by_landmark(x32, kernels, bias32, partition, stride, 1)
    return [out, *torch.autograd.grad(out, inputs, grad_out.float())]


def _compare(actual: Tensor, expected: Tensor, tolerance: float) -> str | None:
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if not torch.isfinite(actual).all():
        return "not finite"
    scale = expected.abs().max().item()
    error = (actual.float() - expected).abs().max().item()
    if error > tolerance * scale:
        return f"max error {error:.3g} exceeds {tolerance:g} x {scale:.3g}"
    return None
