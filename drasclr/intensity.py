"""CT intensity conventions: the HU window and the network's input scale (Yu et al. 2023,
Section 4.1).

Patches are stored as int16 HU clipped to the window [-1024, 240]; the network sees
(HU + 1024) / 632 - 1, i.e. the window mapped onto [-1, 1].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the preprocessing workers use the window without importing torch
    from torch import Tensor

HU_WINDOW = (-1024.0, 240.0)
HALF_WINDOW = (HU_WINDOW[1] - HU_WINDOW[0]) / 2  # 632


def normalise_hu(patches: Tensor) -> Tensor:
    """HU -> network input: clip to the window, then (HU + 1024) / 632 - 1."""
    return window_offset_to_input(hu_to_window_offset(patches))


def hu_to_window_offset(patches: Tensor) -> Tensor:
    """HU clipped to the window, as float32 HU + 1024 (0 at the window's bottom): the scale
    the augmentation works on."""
    return patches.float().clamp(*HU_WINDOW) - HU_WINDOW[0]


def window_offset_to_input(x: Tensor) -> Tensor:
    """HU + 1024 -> the network's input scale, the window mapped onto [-1, 1]."""
    return x / HALF_WINDOW - 1
