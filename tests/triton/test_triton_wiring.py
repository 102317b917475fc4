"""LocCondConv3d(backend="triton") end to end, against the grouped backend
run in float64 on a copy of the same layer, and its fallback warning."""
import copy
import warnings

import pytest
import torch


loc_cond_conv = pytest.importorskip("drasclr.nn.loc_cond_conv")
LocCondConv3d = loc_cond_conv.LocCondConv3d

# Max abs error as a fraction of the reference's max abs value (as test_triton_loc_cond_conv).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}




def assert_close_scaled(actual, expected, dtype, name):
    tol = TOLERANCE[dtype] * expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    assert torch.isfinite(actual).all() and error <= tol, f"{name}: max error {error:.3g} > {tol:.3g}"


def layer_and_reference(device, stride):
    layer = LocCondConv3d(3, 5, 3, stride=stride, padding=1, num_experts=4, backend="triton").to(device)
    reference = copy.deepcopy(layer).double()
    reference.backend = "grouped"
    x = torch.randn(5, 3, 4, 5, 6, device=device)
    loc = torch.rand(3, 3, device=device)[torch.tensor([2, 0, 2, 1, 2])] * 2 - 1  # uneven groups
    return layer, reference, x, loc


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_matches_float64_grouped_backend(device, stride):
    layer, reference, x, loc = layer_and_reference(device, stride)
    x = x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported call must not fall back
        y = layer(x, loc)
    y_ref = reference(x64, loc.double())
    assert_close_scaled(y, y_ref, torch.float32, "output")

    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [x64, *reference.parameters()], grad_out.double())
    names = ["x"] + [name for name, _ in layer.named_parameters()]  # routing grads included
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        assert_close_scaled(grad, grad_ref, torch.float32, f"grad {name}")


def test_layer_under_autocast(device):
    layer, reference, x, loc = layer_and_reference(device, 1)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x, loc)
    assert y.dtype == torch.bfloat16
    y_ref = reference(x.to(torch.bfloat16).double(), loc.double())
    assert_close_scaled(y, y_ref, torch.bfloat16, "autocast output")
    grads = torch.autograd.grad(y.float().square().sum(), list(layer.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_unsupported_call_warns_and_falls_back(device):
    layer, reference, x, loc = layer_and_reference(device, 1)
    layer.dilation = reference.dilation = (2, 2, 2)
    loc_cond_conv._warn_fallback_once.cache_clear()  # the warning is once per reason per process
    with pytest.warns(RuntimeWarning, match="falls back.*dilation"):
        y = layer(x, loc)
    assert_close_scaled(y, reference(x.double(), loc.double()), torch.float32, "fallback output")
