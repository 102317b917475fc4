"""Fixtures shared by the Triton kernel tests."""
import pytest
import torch

from drasclr.kernels.support import interpreter_enabled


@pytest.fixture(autouse=True)
def exact_float32_on_cuda(monkeypatch):
    """Compare float32 at full precision: no TF32 in the kernels (they follow cudnn.allow_tf32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def device(device):
    """The conftest devices where the kernels can run: CPU only under the interpreter (which
    the top-level conftest sets only when there is no CUDA)."""
    if device.type != "cuda" and not interpreter_enabled():
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    return device
