"""Where computations run: one rule for every command and API that takes a ``device``."""
from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; any other name as ``torch.device`` reads it.

    Raises:
        ValueError: a CUDA device asked for where CUDA is not available.
    """
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r}: CUDA is not available here")
    return device
