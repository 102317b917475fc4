"""How close the CPU path comes to the machine's ceiling, and what bfloat16 buys.

1. FLOPs per patch of the encoder (paper size: 8 experts, rep_dim 128), forward and forward +
   backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` for the plain encoder
   (``conditioning="none"``) and the Loc-CondConv encoder on the grouped backend (a batch of
   4 landmarks x 4 subjects), and per training step of the demo's configuration. The counter
   counts a grouped convolution's backward as if it were not grouped (G times too many), so
   backward and step FLOPs are those of the plain encoder, whose convolutions are the same
   (Loc-CondConv adds only the per-landmark kernel mixture).
2. The machine's measured ceiling: matmul (1024^3) and a representative 3D convolution
   (16 -> 16 channels, 3^3 kernel, 16^3 voxels, 16 patches), float32 and bfloat16, best of
   several calls, as many torch threads as the run has.
3. Throughput before and after, interleaved round by round (benchmarks/interleave.py; ratio =
   rate of the variant / rate of ``fp32`` in the same round, median and min-max):
   - training step of the demo's configuration (batch 16 = 4 landmarks x 4 subjects, k = 2
     neighbours, K = 64): augmentation, query, neighbour and key encoders, losses, enqueue,
     backward, SGD; ``fp32`` is the main branch's path (``amp=False``), ``auto`` what
     ``drasclr.precision`` picks here (bfloat16 autocast on a CPU with AVX512_BF16 or AMX),
     ``auto+cl`` the same with channels-last activations (``Encoder.channels_last``, part
     ``channels-last``);
   - feature extraction (``extract_features`` of a synthetic store, ``amp=False`` / ``True``);
   - dense maps (``exact_probabilities`` on a lung cube of one synthetic subject, when
     ``--densemap-root`` names a folder made by bench_densemap.build_cohort).
   The training step's achieved FLOP/s is also given as a fraction of the convolution ceiling.
4. ``--profile``: the per-operator breakdown of one training step under each precision
   (torch.profiler, self CPU time).

    .venv/bin/python benchmarks/cpu_ceiling.py --rounds 9 [--densemap-root DIR] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from drasclr.features import extract_features
from drasclr.nn import Encoder
from drasclr.precision import autocast, cpu_has_native_bf16, use_bf16
from drasclr.pretrain.augment import PatchAugment
from drasclr.pretrain.moco import DrasCLR
from interleave import interleave

BATCH, K_NEIGHBOURS, LANDMARKS_PER_BATCH, NUM_LANDMARKS, QUEUE = 16, 2, 4, 8, 64
DEVICE = torch.device("cpu")


def encoder_flops(conditioning: str, backward: bool) -> float:
    """FLOPs per patch of one encoder pass (+ backward) on a 4 landmarks x 4 subjects batch."""
    torch.manual_seed(0)
    encoder = Encoder(conditioning=conditioning, backend="grouped")
    x = torch.randn(BATCH, 1, 32, 32, 32)
    loc = (torch.rand(LANDMARKS_PER_BATCH, 3) * 2 - 1).repeat_interleave(
        BATCH // LANDMARKS_PER_BATCH, dim=0)
    with FlopCounterMode(display=False) as counter:
        h = encoder.head(encoder(x, loc))
        if backward:
            h.square().sum().backward()
    return counter.get_total_flops() / BATCH


def best_rate(flops: float, run, calls: int = 5) -> float:
    """FLOP/s of the fastest of ``calls`` timed calls (after one warm-up)."""
    run()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best


def ceilings() -> dict[str, float]:
    """Measured matmul and conv3d FLOP/s, float32 and bfloat16."""
    rates = {}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, w = torch.randn(16, 16, 16, 16, 16), torch.randn(16, 16, 3, 3, 3)
    conv_flops = 2 * 16 * 16 * 16 * 27 * 16 ** 3
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        A, B = a.to(dtype), b.to(dtype)
        rates[f"matmul {name}"] = best_rate(2 * 1024 ** 3, lambda: A @ B)
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            X = x.to(dtype).contiguous(memory_format=layout)
            W = w.to(dtype)
            suffix = "" if layout == torch.contiguous_format else " channels-last"
            rates[f"conv3d {name}{suffix}"] = best_rate(
                conv_flops, lambda: F.conv3d(X, W, padding=1))
    return rates


def train_step(bf16: bool, channels_last: bool, conditioning: str = "loc_condconv"):
    """One demo-configuration training step as a callable (its own model and data)."""
    torch.manual_seed(0)
    model = DrasCLR(Encoder(conditioning=conditioning, backend="grouped"), NUM_LANDMARKS,
                    queue_size=QUEUE)
    for encoder in (model.encoder_q, model.encoder_k):
        encoder.channels_last = channels_last
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9)
    augment, generator = PatchAugment(), torch.Generator().manual_seed(0)
    coords = torch.rand(NUM_LANDMARKS, 3) * 2 - 1
    landmark = torch.arange(LANDMARKS_PER_BATCH).repeat_interleave(BATCH // LANDMARKS_PER_BATCH)
    neighbour = (landmark[:, None] + torch.arange(1, K_NEIGHBOURS + 1)) % NUM_LANDMARKS
    hu = (torch.randn(BATCH * (2 + K_NEIGHBOURS), 32, 32, 32) * 300 - 600).to(torch.int16)

    def step():
        views = augment(hu, generator)
        with autocast(DEVICE, bf16):
            out = model(views[:BATCH], views[BATCH:2 * BATCH],
                        views[2 * BATCH:].view(BATCH, K_NEIGHBOURS, 1, 32, 32, 32),
                        coords[landmark], coords[neighbour], landmark)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def step_flops() -> float:
    """FLOPs of one training step (plain encoder, see the module docstring)."""
    with FlopCounterMode(display=False) as counter:
        train_step(False, False, conditioning="none")()
    return counter.get_total_flops()


def report(title: str, rounds, units: dict[str, float], unit: str) -> None:
    print(f"\n{title}")
    print(f"| variant | {unit} per round | median | ratio to fp32: median (min-max) |")
    print("|---|---|---|---|")
    for name, seconds in rounds.seconds.items():
        rates = [units[name] / s for s in seconds]
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | "
              f"{statistics.median(rates):.1f} | {rounds.describe('fp32', name)} |")


def synthetic_store(folder: Path, subjects: int):
    from bench_features import synthetic_store as make

    return make(folder, subjects)


def profile_steps() -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, bf16 in (("fp32", False), ("auto", use_bf16(DEVICE))):
        step = train_step(bf16, False)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        total = prof.key_averages().self_cpu_time_total / 3e3
        print(f"\nprofile {name}: {total:.0f} ms of self CPU time per step (3 steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def print_ceiling() -> dict[str, float]:
    flops = {"plain fwd": encoder_flops("none", False),
             "plain fwd+bwd": encoder_flops("none", True),
             "loc_condconv fwd": encoder_flops("loc_condconv", False)}
    print("\nFLOPs per patch: " + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in flops.items()))
    print(f"FLOPs per training step (batch {BATCH}): {step_flops() / 1e9:.2f} G")
    ceiling = ceilings()
    print("measured ceiling: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in ceiling.items()))
    return ceiling


def compare_training(rounds_count: int, bf16: bool, ceiling: dict[str, float] | None,
                     channels_last: bool) -> None:
    per_step = step_flops()
    steps = {"fp32": train_step(False, False), "auto": train_step(bf16, False)}
    if channels_last:
        steps["auto+cl"] = train_step(bf16, True)
    rounds = interleave(steps, rounds_count)
    report(f"Training step (demo configuration, batch {BATCH})", rounds,
           dict.fromkeys(steps, BATCH), "patches/s")
    for name in steps:
        achieved = per_step / statistics.median(rounds.seconds[name])
        key = "conv3d bf16 channels-last" if name != "fp32" and bf16 else "conv3d fp32"
        share = f" = {achieved / ceiling[key]:.0%} of {key}" if ceiling else ""
        print(f"  {name}: {achieved / 1e9:.1f} GFLOP/s{share}")


def compare_features(rounds_count: int, subjects: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = synthetic_store(Path(folder), subjects)
        torch.manual_seed(0)
        encoder = Encoder().eval()
        patches = store.num_subjects * store.num_landmarks
        variants = {name: (lambda amp=amp: extract_features(encoder, store, device="cpu",
                                                           progress=False, amp=amp))
                    for name, amp in (("fp32", False), ("auto", True))}
        difference = np.abs(variants["auto"]().features - variants["fp32"]().features).max()
        rounds = interleave(variants, rounds_count)
        report(f"Feature extraction ({patches} patches)", rounds, dict.fromkeys(variants, patches),
               "patches/s")
        print(f"  largest feature difference auto - fp32: {difference:.2e}")


def compare_densemap(rounds_count: int, root: Path, edge: int) -> None:
    from bench_densemap import interior_cube, load_scan, paper_encoder
    from drasclr.evaluation import densemap as dm
    from drasclr.evaluation.head import SubtypeHead

    scan = load_scan(root, "sub0000")
    encoder, head = paper_encoder(), SubtypeHead(128)
    with torch.no_grad():
        head.weight.normal_(0, 0.3)
    cube = interior_cube(scan, edge)
    variants = {name: (lambda amp=amp: dm.exact_probabilities(
        encoder, head, scan, cube, device="cpu", amp=amp, progress=False))
        for name, amp in (("fp32", False), ("auto", True))}
    difference = np.abs(variants["auto"]() - variants["fp32"]()).max()
    rounds = interleave(variants, rounds_count)
    report(f"Dense map, exact ({len(cube)} voxels)", rounds, dict.fromkeys(variants, len(cube)),
           "voxels/s")
    print(f"  largest probability difference auto - fp32: {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--subjects", type=int, default=8, help="feature store subjects")
    parser.add_argument("--densemap-root", type=Path)
    parser.add_argument("--densemap-edge", type=int, default=4, help="lung cube edge, voxels")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--parts", default="ceiling,train,channels-last,features,densemap",
                        help="comma-separated parts to run (channels-last: a third training "
                             "variant)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    bf16 = use_bf16(DEVICE)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}, auto picks {'bf16' if bf16 else 'fp32'}")

    ceiling = print_ceiling() if "ceiling" in parts else None
    if "train" in parts:
        compare_training(args.rounds, bf16, ceiling, "channels-last" in parts)
    if "features" in parts:
        compare_features(args.rounds, args.subjects)
    if args.densemap_root is not None and "densemap" in parts:
        compare_densemap(args.rounds, args.densemap_root, args.densemap_edge)
    if args.profile:
        profile_steps()


if __name__ == "__main__":
    main()
