"""Fused Triton Loc-CondConv against a float64 reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes are tiny;
with CUDA the same tests run the compiled kernels (``device`` fixture). The reference is
``drasclr.nn.reference``: each sample convolved with its own mixed kernel, in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drasclr.conv_common import LandmarkPartition
from drasclr.kernels import (
    loc_cond_conv3d_forward,
    loc_cond_conv3d_grad_input,
    loc_cond_conv3d_grad_mixed_kernel,
    loc_cond_conv3d_triton,
    triton_unsupported_reason,
)
from drasclr.nn.reference import reference_mixed_conv3d

# Max abs error allowed, as a fraction of the reference's max abs value (float32 accumulation
# in every case; bf16/fp16 round the mixed kernel to the input dtype before the product).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# Landmark label of each sample: one landmark, all distinct, and uneven interleaved partition
# (sizes 3, 1, 1) so that restoring the original sample order is tested too.
GROUPINGS = {"one": [0, 0, 0, 0], "distinct": [0, 1, 2, 3], "uneven": [2, 0, 2, 1, 2]}
SPATIAL = (4, 5, 6)  # anisotropic, odd and even, to catch axis mix-ups and stride-2 edges
NUM_EXPERTS = 3




def make_partition(labels: list[int], device) -> LandmarkPartition:
    loc = torch.tensor(labels, dtype=torch.float32, device=device)[:, None] * torch.tensor(
        [0.1, -0.2, 0.3], device=device)
    return LandmarkPartition.from_loc(loc, len(labels))


def make_case(grouping, c_in, c_out, kernel_size, dtype, device, memory_format=torch.contiguous_format):
    """Fresh random leaf tensors (x in ``dtype``, parameters in float32) and the grouping."""
    partition = make_partition(GROUPINGS[grouping], device)
    x = torch.randn(partition.batch_size, c_in, *SPATIAL, device=device).to(dtype)
    x = x.to(memory_format=memory_format).requires_grad_()
    fan_in = c_in * kernel_size**3
    weight = torch.randn(NUM_EXPERTS, c_out, c_in, *(kernel_size,) * 3, device=device) / fan_in**0.5
    routing = torch.rand(partition.num_landmarks, NUM_EXPERTS, device=device)
    bias = torch.randn(c_out, device=device)
    leaves = [weight.requires_grad_(), routing.requires_grad_(), bias.requires_grad_()]
    return partition, x, *leaves


def reference(x, weight, routing, bias, partition, stride, padding):
    """The float64 reference, sample b mixed with its landmark's routing row."""
    return reference_mixed_conv3d(x, routing[partition.index], weight, bias, stride, padding)


def reference_from_landmark_kernels(x, kernels, bias, partition, stride, padding):
    """The float64 reference with kernels[index[b]] as sample b's kernel (a one-hot routing)."""
    one_hot = F.one_hot(partition.index, partition.num_landmarks)
    return reference_mixed_conv3d(x, one_hot, kernels, bias, stride, padding)


def assert_close_scaled(actual, expected, dtype, name):
    tol = TOLERANCE[dtype] * expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    assert error <= tol, f"{name}: max error {error:.3g} > {tol:.3g}"


def check_against_reference(x, weight, routing, bias, partition, stride, padding, dtype):
    y = loc_cond_conv3d_triton(x, weight, routing, bias, partition, stride, padding)
    leaves = [t for t in (x, weight, routing, bias) if t is not None]
    # Reference from the same (already rounded) inputs, so only kernel arithmetic is compared.
    y_ref = reference(x, weight, routing, bias, partition, stride, padding)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert_close_scaled(y, y_ref, dtype, "output")

    grad_out = torch.randn(y.shape, device=y.device).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, grad_out)
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_out.double())
    for name, grad, grad_ref in zip(("x", "experts", "routing", "bias"), grads, grads_ref):  # bias last
        assert grad.dtype == (x.dtype if name == "x" else torch.float32)
        assert_close_scaled(grad, grad_ref, dtype, f"grad {name}")
    return y


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("kernel_size,stride,padding", [
    (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 0), (1, 1, 0), (1, 2, 0), (1, 1, 1), (1, 2, 1)])
def test_float32_forward_and_gradients(device, grouping, kernel_size, stride, padding):
    case = make_case(grouping, 3, 5, kernel_size, torch.float32, device)
    partition, *tensors = case
    check_against_reference(*tensors, partition, stride, padding, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 1, 1), (3, 2, 0), (1, 2, 1)])
def test_half_precision_forward_and_gradients(device, dtype, kernel_size, stride, padding):
    partition, *tensors = make_case("uneven", 3, 5, kernel_size, dtype, device)
    check_against_reference(*tensors, partition, stride, padding, dtype)


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (1, 1)])
def test_single_input_channel(device, kernel_size, stride):
    """conv1 of the encoder: C_in = 1 (a reduction of only k^3 terms)."""
    partition, *tensors = make_case("uneven", 1, 4, kernel_size, torch.float32, device)
    check_against_reference(*tensors, partition, stride, kernel_size // 2, torch.float32)


def test_many_channels_span_several_tiles(device):
    """More channels than one block along N and K, and no bias."""
    partition, x, weight, routing, _ = make_case("uneven", 40, 36, 1, torch.float32, device)
    check_against_reference(x, weight, routing, None, partition, 1, 0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last_input(device, dtype):
    partition, *tensors = make_case("uneven", 3, 4, 3, dtype, device, torch.channels_last_3d)
    y = check_against_reference(*tensors, partition, 2, 1, dtype)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_launchers_write_every_element_of_poisoned_buffers(device):
    """Output and input-gradient buffers start as NaN; any unwritten element fails.

    The buffers are channels-last views, so the kernels' stride handling is checked too.
    """
    partition, x, weight, routing, bias = make_case("uneven", 3, 4, 3, torch.float32, device)
    stride, padding = (2, 2, 2), (1, 1, 1)
    y_ref = reference(x, weight, routing, bias, partition, stride, padding)
    out = torch.full(y_ref.shape, float("nan"), device=device).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        loc_cond_conv3d_forward(x, weight, routing, bias, partition, stride, padding, out=out)
    assert_close_scaled(out, y_ref, torch.float32, "poisoned output")

    grad_out = torch.randn(y_ref.shape, device=device)
    grad_x_ref, = torch.autograd.grad(y_ref, x, grad_out.double())
    grad_x = torch.full(x.shape, float("nan"), device=device).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        loc_cond_conv3d_grad_input(grad_out, weight, routing, partition, tuple(x.shape), stride, padding,
                                   out=grad_x)
    assert_close_scaled(grad_x, grad_x_ref, torch.float32, "poisoned grad input")


def test_split_reduction_of_kernel_gradient(device):
    """Splitting a landmark's rows over many programs (atomics) gives the same kernel grads."""
    partition, x, *_ = make_case("uneven", 2, 3, 3, torch.float32, device)
    grad_out = torch.randn(partition.batch_size, 3, *SPATIAL, device=device)
    args = (grad_out, x.detach(), partition, (3, 3, 3), (1, 1, 1), (1, 1, 1))
    whole = loc_cond_conv3d_grad_mixed_kernel(*args, rows_per_split=4096)
    split = loc_cond_conv3d_grad_mixed_kernel(*args, rows_per_split=64)  # 120 rows/sample: 6 splits
    kernels = torch.randn(partition.num_landmarks, 3, 2, 3, 3, 3, dtype=torch.float64, device=device,
                          requires_grad=True)
    y_ref = reference_from_landmark_kernels(x.detach(), kernels, None, partition, 1, 1)
    expected, = torch.autograd.grad(y_ref, kernels, grad_out.double())
    assert_close_scaled(whole, expected, torch.float32, "kernel grad, one program per landmark")
    assert_close_scaled(split, expected, torch.float32, "kernel grad, split rows")


def test_autocast_runs_in_the_autocast_dtype(device):
    partition, x, weight, routing, bias = make_case("uneven", 3, 4, 3, torch.float32, device)
    dtype = torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        y = loc_cond_conv3d_triton(x, weight, routing, bias, partition, 1, 1)
    assert y.dtype == dtype
    y_ref = reference(x.to(dtype), weight, routing, bias, partition, 1, 1)
    assert_close_scaled(y, y_ref, dtype, "autocast output")
    grads = torch.autograd.grad(y.float().square().sum(), [x, weight, routing])
    assert [g.dtype for g in grads] == [torch.float32] * 3  # parameters keep their dtype
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("change,expected", [
    ({}, None),
    ({"groups": 2}, "groups=2"),
    ({"dilation": 2}, "dilation"),
    ({"stride": 3}, "stride"),
    ({"padding": (1, 2, 1)}, "padding"),
    ({"kernel_size": 5}, "kernel size"),
    ({"dtype": torch.float64}, "dtype"),
])
def test_unsupported_reason(device, change, expected):
    x = torch.zeros(2, 3, 4, 4, 4, dtype=change.get("dtype", torch.float32), device=device)
    k = change.get("kernel_size", 3)
    weight = torch.zeros(2, 4, 3, k, k, k, device=device)
    reason = triton_unsupported_reason(x, weight, change.get("stride", 1), change.get("padding", 1),
                                       change.get("dilation", 1), change.get("groups", 1))
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_cpu_without_interpreter_is_unsupported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_unsupported_reason(torch.zeros(1, 1, 4, 4, 4), torch.zeros(2, 1, 1, 3, 3, 3), 1, 1, 1, 1)
    assert reason is not None and "CUDA" in reason


@pytest.mark.parametrize("bad,message", [
    ("routing", "routing: expected shape"),
    ("channels", "input channels"),
    ("batch", "partition: grouping is for"),
    ("bias", "bias: expected shape"),
    ("stride", "unsupported call: stride"),
])
def test_bad_input_raises_clear_errors(device, bad, message):
    partition, x, weight, routing, bias = make_case("uneven", 3, 4, 3, torch.float32, device)
    stride = 1
    if bad == "routing":
        routing = routing[:, :2]
    elif bad == "channels":
        x = x[:, :2]
    elif bad == "batch":
        x = x[:3]
    elif bad == "bias":
        bias = bias[:3]
    else:
        stride = 4
    with pytest.raises(ValueError, match=message):
        loc_cond_conv3d_triton(x, weight, routing, bias, partition, stride, 1)
