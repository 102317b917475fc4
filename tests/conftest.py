"""Shared test set-up.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at collection time. With CUDA present the same
tests run the compiled kernels.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DRASCLR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def atlas_mask_path() -> Path:
    """The authors' real atlas lung mask (../shared/data); tests using it skip when absent."""
    path = SHARED_DATA / "atlas_lung_mask.nii.gz"
    if not path.exists():
        pytest.skip(f"real atlas mask not available at {path}")
    return path


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def float32_cpu(monkeypatch):
    """Every test computes in float32 on every CPU, so tolerances do not depend on the machine:
    a CPU with native bfloat16 would otherwise switch ``amp=True`` (the default) to bf16.
    The bf16 path is tested on purpose in test_precision.py (fixture ``native_bf16``)."""
    from drasclr import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
