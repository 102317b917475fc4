"""The arithmetic the encoder runs in, chosen for the device and the workload at hand.

One rule for training, feature extraction, dense maps and every other encoder pass
(``amp=True``, the default everywhere): bfloat16 autocast where the device computes bfloat16
natively and it pays, float32 elsewhere; master weights, optimiser state, losses and the
memory bank stay float32.

- CUDA: bfloat16 when ``torch.cuda.is_bf16_supported()`` (Ampere and later).
- CPU with AVX512_BF16 or AMX (``cpu_has_native_bf16``): the caller's measured default for its
  workload (``use_bf16(..., cpu_default=...)``), which ``DRASCLR_CPU_BF16`` overrides ("1":
  bfloat16, "0": float32). Measured on a 2-core AMD EPYC with AVX512_BF16, idle, interleaved
  (benchmarks/cpu_ceiling.py, benchmarks/RESULTS.md): dense maps, where every patch has its own
  location, run 1.30x faster in bf16, so they default to it; feature extraction (one landmark
  per batch) ran 0.95x and the training step 1.11x with a spread of 0.90-1.43x, so both stay
  float32. Training under bf16 on that CPU is also unsafe: in short runs at 8 patches per
  step (one process, or two under DDP) the loss collapsed within a few steps in most runs
  (every embedding nearly the same) and one run ended in a non-finite loss, differently from
  run to run with the same seed; float32 never did (benchmarks/RESULTS.md, "CPU ceiling,
  part 3"). ``DRASCLR_CPU_BF16=1`` still turns it on, at that risk.
- Other CPUs: float32.

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


#: Environment variable that sets bf16 autocast on a CPU with native bfloat16 for every
#: workload: "1" on, "0" off; unset, each workload's measured default.
CPU_BF16_VARIABLE = "DRASCLR_CPU_BF16"


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX tiles) and oneDNN is
    there to use it; asked once per process."""
    return bool(torch.backends.mkldnn.is_available()
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def use_bf16(device: torch.device | str, amp: bool = True, cpu_default: bool = False) -> bool:
    """Whether encoder passes on ``device`` run under bfloat16 autocast: ``amp`` and the
    device computes bfloat16 natively, and on a CPU ``DRASCLR_CPU_BF16`` or, unset, the
    workload's ``cpu_default`` says so (see the module docstring).

    Raises:
        ValueError: ``DRASCLR_CPU_BF16`` is set to something other than "0" or "1".
    """
    device = torch.device(device)
    if not amp:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    choice = os.environ.get(CPU_BF16_VARIABLE)
    if choice not in (None, "0", "1"):
        raise ValueError(f"environment variable {CPU_BF16_VARIABLE}={choice!r}: expected 1 "
                         "(bfloat16 autocast on the CPU) or 0 (float32), or unset")
    wanted = cpu_default if choice is None else choice == "1"
    return wanted and cpu_has_native_bf16()


def autocast(device: torch.device | str, bf16: bool) -> AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``bf16``, else float32 (autocast disabled)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

