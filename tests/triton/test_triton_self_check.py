"""backend="auto" trusts the Triton kernels on a device only after they pass a self-check
against "grouped" there; a failing (or raising) kernel means "grouped", with one warning.

"auto" considers Triton only on CUDA; here `_auto_tries_triton` is widened to the CPU so that
the whole path runs under the interpreter."""
import warnings

import pytest
import torch

from drasclr import kernels
from drasclr.nn import LocCondConv3d, loc_cond_conv, triton_check


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.setattr(triton_check, "_passed", {})


def off_by_one_percent(*args, **kwargs):
    return kernels.loc_cond_conv3d_triton.original(*args, **kwargs) * 1.01


def raising(*args, **kwargs):
    raise RuntimeError("PTX compile failed")


def inject(monkeypatch, kernel):
    kernel.original = kernels.loc_cond_conv3d_triton
    monkeypatch.setattr(kernels, "loc_cond_conv3d_triton", kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_pass_their_self_check(device, dtype):
    assert triton_check.triton_self_check(device, dtype) is None


@pytest.mark.parametrize("kernel, message", [(off_by_one_percent, "stride 1, output: max error"),
                                             (raising, "stride 1: RuntimeError: PTX compile")])
def test_a_wrong_or_raising_kernel_fails_the_check(device, monkeypatch, kernel, message):
    inject(monkeypatch, kernel)
    assert message in triton_check.triton_self_check(device, torch.float32)


def auto_and_grouped(device):
    torch.manual_seed(0)
    layer = LocCondConv3d(3, 4, 3, padding=1, num_experts=2, backend="auto").to(device)
    x = torch.randn(4, 3, 4, 5, 6, device=device)
    loc = (torch.rand(2, 3, device=device) * 2 - 1)[torch.tensor([1, 0, 1, 1])]
    with torch.no_grad():
        layer.backend = "grouped"
        expected = layer(x, loc)
        layer.backend = "auto"
    return layer, x, loc, expected


def test_auto_falls_back_to_grouped_with_one_warning(device, monkeypatch):
    monkeypatch.setattr(loc_cond_conv, "_auto_tries_triton", lambda device: True)
    inject(monkeypatch, raising)
    layer, x, loc, expected = auto_and_grouped(device)
    with pytest.warns(RuntimeWarning, match='self-check on .*PTX compile failed; using "grouped"'):
        first = layer(x, loc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device: no second warning
        second = layer(x, loc)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_auto_uses_the_kernels_once_they_pass(device, monkeypatch):
    monkeypatch.setattr(loc_cond_conv, "_auto_tries_triton", lambda device: True)
    calls = []
    checks = []
    original_check = triton_check.triton_self_check
    monkeypatch.setattr(triton_check, "triton_self_check",
                        lambda *a: checks.append(a) or original_check(*a))

    def counted(*args, **kwargs):
        calls.append(1)
        return counted.original(*args, **kwargs)

    inject(monkeypatch, counted)
    layer, x, loc, expected = auto_and_grouped(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = layer(x, loc)
        assert (len(checks), len(calls)) == (1, 3)  # the check (strides 1 and 2), then the layer
        second = layer(x, loc)
        assert (len(checks), len(calls)) == (1, 4)  # no second check
    for y in (first, second):
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
