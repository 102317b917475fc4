"""The arithmetic the encoder runs in, chosen for the device at hand.

One rule for training, feature extraction and every other encoder pass (``amp=True``, the
default everywhere): bfloat16 autocast where the device computes bfloat16 natively, float32
elsewhere; master weights, optimiser state, losses and the memory bank stay float32.

- CUDA: bfloat16 when ``torch.cuda.is_bf16_supported()`` (Ampere and later).
- CPU: float32 unless ``DRASCLR_CPU_BF16=1`` is set and the CPU has AVX512_BF16 or AMX
  (``cpu_has_native_bf16``). oneDNN runs matmuls and single 3D convolutions faster in
  bfloat16 there, but the whole encoder's feature extraction was slower under bf16 autocast
  than in float32 on the 2-core machine it was measured on (benchmarks/cpu_ceiling.py,
  benchmarks/RESULTS.md), so the CPU default stays float32 until a measurement says otherwise.

Channels-last activations (``Encoder.channels_last``) are a separate, opt-in setting: they
speed up oneDNN's bf16 convolutions taken alone, but not this encoder as a whole on the
machine it was measured on (benchmarks/cpu_ceiling.py, benchmarks/RESULTS.md).

``amp=False`` gives the float32, channels-first path everywhere (the reference numerics).
"""
from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager

import torch


#: Environment variable that opts a CPU with native bfloat16 into bf16 autocast ("1").
CPU_BF16_VARIABLE = "DRASCLR_CPU_BF16"


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX tiles) and oneDNN is
    there to use it; asked once per process."""
    return bool(torch.backends.mkldnn.is_available()
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def use_bf16(device: torch.device | str, amp: bool = True) -> bool:
    """Whether encoder passes on ``device`` run under bfloat16 autocast (``amp`` and the
    device computes bfloat16 natively, see the module docstring)."""
    device = torch.device(device)
    if not amp:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (device.type == "cpu" and os.environ.get(CPU_BF16_VARIABLE) == "1"
            and cpu_has_native_bf16())


def autocast(device: torch.device | str, bf16: bool) -> AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``bf16``, else float32 (autocast disabled)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

