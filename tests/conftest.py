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

from real_data import ATLAS_MASK, REAL, REAL_CT_AVAILABLE, SCANS, SHARED_DATA  # noqa: E402

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


@pytest.fixture(scope="session")
def real_store(tmp_path_factory):
    """Both real scans preprocessed with the authors' atlas through the command line, once per
    session: (store folder, atlas)."""
    if not REAL_CT_AVAILABLE:
        pytest.skip(f"real CT scans or the atlas mask not available under {SHARED_DATA}")
    from drasclr.cli import main as cli_main
    from drasclr.data.atlas import Atlas

    root = tmp_path_factory.mktemp("real_ct")
    images = root / "images"
    images.mkdir()
    for name in SCANS.values():
        (images / name).symlink_to(REAL / name)
    atlas_path = root / "atlas.npz"
    assert cli_main(["atlas", "--mask", str(ATLAS_MASK), "--out", str(atlas_path)]) in (0, None)
    assert cli_main(["preprocess", "--images", str(images), "--atlas", str(atlas_path),
                     "--out", str(root / "store"), "--no-progress"]) in (0, None)
    return root / "store", Atlas.load(atlas_path)

@pytest.fixture(autouse=True)
def float32_cpu(monkeypatch):
    """Every test computes in float32 on every CPU, so tolerances do not depend on the machine:
    a CPU with native bfloat16 would otherwise switch ``amp=True`` (the default) to bf16.
    The bf16 path is tested on purpose in test_precision.py (fixture ``native_bf16``)."""
    from drasclr import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
