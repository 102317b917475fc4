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
   rate of the variant / rate of ``fp32`` in the same round, median and min-max). One timed
   call is ``--steps`` training steps, one feature extraction, one dense map. Every variant's
   first call is timed on its own before the rounds (``first call``: for a compiled variant
   that is its compilation) and excluded from the rates; a variant whose first call raises
   (e.g. ``torch.compile`` without a working C++ compiler) is dropped and its error printed.
   - training step of the demo's configuration (batch 16 = 4 landmarks x 4 subjects, k = 2
     neighbours, K = 64): augmentation, query, neighbour and key encoders, losses, enqueue,
     backward, SGD. ``fp32`` is the library's CPU default (``amp=False`` numerics), ``bf16``
     bfloat16 autocast (only on a CPU with native bf16); part ``channels-last`` adds both
     with channels-last activations (``+cl``, ``Encoder.channels_last``); part ``compile``
     adds both with ``Encoder._features`` compiled by ``torch.compile`` (``+compile``,
     inductor, static shapes); part ``threads`` adds fp32 at every torch thread count below
     the run's (``fp32 1t``: ``torch.set_num_threads`` around each call; interop threads
     cannot change once a process has run parallel work, and eager mode does not use them);
   - feature extraction (``extract_features`` of a synthetic store): fp32, bf16, and with
     part ``compile`` fp32+compile and bf16+compile;
   - dense maps (``exact_probabilities`` on a lung cube of one synthetic subject; a
     one-subject cohort is built in a temporary folder unless ``--densemap-root`` names one
     made by bench_densemap.build_cohort): the same variants as feature extraction.
   The training step's achieved FLOP/s is also given as a fraction of the convolution ceiling.
   Part ``compile`` also prints ``torch._dynamo.explain`` of the encoder (graphs, graph
   breaks and their reasons). A compact table of every comparison closes the run.
4. ``--profile``: the per-operator breakdown of one training step under each precision
   (torch.profiler, self CPU time).

    cd benchmarks && ../.venv/bin/python cpu_ceiling.py --rounds 9 [--densemap-root DIR] [--profile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from drasclr.conv_common import as_partition
from drasclr.features import extract_features
from drasclr.nn import Encoder, grouped_conv
from drasclr.precision import CPU_BF16_VARIABLE, autocast, cpu_has_native_bf16
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


@dataclass(frozen=True)
class Variant:
    """How one compared variant runs the encoder."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None  # torch threads during its calls (None: the run's)


#: ``Encoder._features`` (every layer after the landmark grouping) under torch.compile; built
#: lazily by torch on the first call, then reused by every compiled variant and encoder.
COMPILED_FEATURES = torch.compile(Encoder._features, dynamic=False)
# one compiled function serves every variant, encoder, batch shape, grad and autocast mode,
# each a recompilation: above dynamo's default limit it would silently run eagerly
torch._dynamo.config.recompile_limit = 64


@contextmanager
def encoder_as(variant: Variant):
    """The encoder compiled (or not), the torch thread count of ``variant`` and, for a bf16
    variant, the CPU's bf16 opt-in (``amp=True`` then means bf16 autocast) while open.

    Compiled, every grouped layer runs as a grouped convolution: inductor's code for the
    backward of the small layers' unfold + batched-matmul path (``grouped_conv._bucket_gemm``)
    corrupted the heap (glibc abort) with torch 2.13 on the CPU."""
    eager, threads, gemm = Encoder._features, torch.get_num_threads(), grouped_conv.GEMM_MAX_COLUMNS
    if variant.compile:
        Encoder._features, grouped_conv.GEMM_MAX_COLUMNS = COMPILED_FEATURES, 0
    if variant.threads is not None:
        torch.set_num_threads(variant.threads)
    opt_in = os.environ.pop(CPU_BF16_VARIABLE, None)
    if variant.bf16:
        os.environ[CPU_BF16_VARIABLE] = "1"
    try:
        yield
    finally:
        Encoder._features, grouped_conv.GEMM_MAX_COLUMNS = eager, gemm
        torch.set_num_threads(threads)
        os.environ.pop(CPU_BF16_VARIABLE, None)
        if opt_in is not None:
            os.environ[CPU_BF16_VARIABLE] = opt_in


def run_as(variant: Variant, run: Callable[[], object]) -> Callable[[], object]:
    def call():
        with encoder_as(variant):
            return run()

    return call


def train_step(variant: Variant, conditioning: str = "loc_condconv", steps: int = 1):
    """``steps`` demo-configuration training steps as a callable (its own model and data)."""
    torch.manual_seed(0)
    model = DrasCLR(Encoder(conditioning=conditioning, backend="grouped"), NUM_LANDMARKS,
                    queue_size=QUEUE)
    for encoder in (model.encoder_q, model.encoder_k):
        encoder.channels_last = variant.channels_last
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9)
    augment, generator = PatchAugment(), torch.Generator().manual_seed(0)
    coords = torch.rand(NUM_LANDMARKS, 3) * 2 - 1
    landmark = torch.arange(LANDMARKS_PER_BATCH).repeat_interleave(BATCH // LANDMARKS_PER_BATCH)
    neighbour = (landmark[:, None] + torch.arange(1, K_NEIGHBOURS + 1)) % NUM_LANDMARKS
    hu = (torch.randn(BATCH * (2 + K_NEIGHBOURS), 32, 32, 32) * 300 - 600).to(torch.int16)

    def step():
        for _ in range(steps):
            views = augment(hu, generator)
            with autocast(DEVICE, variant.bf16):
                out = model(views[:BATCH], views[BATCH:2 * BATCH],
                            views[2 * BATCH:].view(BATCH, K_NEIGHBOURS, 1, 32, 32, 32),
                            coords[landmark], coords[neighbour], landmark)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()

    return run_as(variant, step)


def step_flops() -> float:
    """FLOPs of one training step (plain encoder, see the module docstring)."""
    with FlopCounterMode(display=False) as counter:
        train_step(Variant(), conditioning="none")()
    return counter.get_total_flops()


@dataclass
class Comparison:
    """One part's interleaved rounds, for the closing table."""

    title: str
    unit: str
    per_call: float  # units (patches, voxels) per timed call
    first_call: dict[str, float]
    rounds: object  # interleave.Rounds

    def rates(self, name: str) -> list[float]:
        return [self.per_call / s for s in self.rounds.seconds[name]]


COMPARISONS: list[Comparison] = []
FAILURES: list[str] = []


def compare(title: str, unit: str, per_call: float, variants: dict[str, Callable[[], object]],
            rounds_count: int) -> Comparison:
    """Time each variant's first call alone (compilation), drop those that fail, then
    interleave the rest; ``fp32`` (the reference) must not fail."""
    first_call, working = {}, {}
    for name, run in variants.items():
        print(f"  {title}: first call of {name} ...", flush=True)
        start = time.perf_counter()
        try:
            run()
        except Exception as error:  # noqa: BLE001 - recorded, the variant is left out
            if name == "fp32":
                raise
            reason = str(error).strip().splitlines()
            FAILURES.append(f"{title} / {name}: {type(error).__name__}: "
                            f"{reason[0][:300] if reason else ''}")
            print(f"  {name} failed on its first call and is left out: {FAILURES[-1]}")
            continue
        first_call[name] = time.perf_counter() - start
        working[name] = run
    comparison = Comparison(title, unit, per_call, first_call, interleave(working, rounds_count))
    COMPARISONS.append(comparison)
    report(comparison)
    return comparison


def report(comparison: Comparison) -> None:
    rounds = comparison.rounds
    print(f"\n{comparison.title}")
    print(f"| variant | first call s | {comparison.unit} per round | median | "
          "ratio to fp32: median (min-max) |")
    print("|---|---|---|---|---|")
    for name in rounds.seconds:
        rates = comparison.rates(name)
        print(f"| {name} | {comparison.first_call[name]:.1f} | "
              f"{', '.join(f'{r:.1f}' for r in rates)} | {statistics.median(rates):.1f} | "
              f"{rounds.describe('fp32', name)} |")


def summary() -> None:
    """Every comparison of the run in one table, and the variants that failed."""
    print("\nSummary (ratio = variant rate / fp32 rate in the same round)")
    print("| part | variant | median rate | ratio to fp32: median (min-max) | first call s |")
    print("|---|---|---|---|---|")
    for comparison in COMPARISONS:
        for name in comparison.rounds.seconds:
            print(f"| {comparison.title.split(' (')[0]} | {name} | "
                  f"{statistics.median(comparison.rates(name)):.1f} {comparison.unit} | "
                  f"{comparison.rounds.describe('fp32', name)} | "
                  f"{comparison.first_call[name]:.1f} |")
    for failure in FAILURES:
        print(f"failed: {failure}")


def synthetic_store(folder: Path, subjects: int):
    from bench_features import synthetic_store as make

    return make(folder, subjects)


def profile_steps(bf16: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, variant in (("fp32", Variant()), ("bf16", Variant(bf16=True)))[:1 + bf16]:
        step = train_step(variant)
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


def encoder_variants(parts: set[str], bf16: bool) -> dict[str, Variant]:
    """The inference variants (features, dense maps) the parts ask for."""
    variants = {"fp32": Variant()}
    if bf16:
        variants["bf16"] = Variant(bf16=True)
    if "compile" in parts:
        variants["fp32+compile"] = Variant(compile=True)
        if bf16:
            variants["bf16+compile"] = Variant(bf16=True, compile=True)
    return variants


def training_variants(parts: set[str], bf16: bool) -> dict[str, Variant]:
    variants = encoder_variants(parts, bf16)
    if "channels-last" in parts:
        variants["fp32+cl"] = Variant(channels_last=True)
        if bf16:
            variants["bf16+cl"] = Variant(bf16=True, channels_last=True)
    if "threads" in parts:
        for threads in range(1, torch.get_num_threads()):
            variants[f"fp32 {threads}t"] = Variant(threads=threads)
            if bf16:
                variants[f"bf16 {threads}t"] = Variant(bf16=True, threads=threads)
    return variants


def explain_graph_breaks() -> None:
    """torch._dynamo.explain of what the compiled variants compile: ``Encoder._features`` of
    the Loc-CondConv encoder on a training batch (4 landmarks x 4 patches)."""
    torch.manual_seed(0)
    encoder = Encoder(backend="grouped")
    x = torch.randn(BATCH, 1, 32, 32, 32)
    loc = (torch.rand(LANDMARKS_PER_BATCH, 3) * 2 - 1).repeat_interleave(
        BATCH // LANDMARKS_PER_BATCH, dim=0)
    perm, partition = grouped_conv.interleave(as_partition(loc, BATCH))
    eager = Encoder._features
    try:
        with encoder_as(Variant(compile=True)):  # as the compiled variants run (no GEMM path)
            explanation = torch._dynamo.explain(eager)(encoder, x[perm], partition)
    except Exception as error:  # noqa: BLE001 - reported, the run goes on
        print(f"\ntorch._dynamo.explain failed: {type(error).__name__}: {error}")
        return
    finally:
        torch._dynamo.reset()
    print(f"\ntorch._dynamo.explain(Encoder._features): {explanation.graph_count} graph(s), "
          f"{explanation.graph_break_count} graph break(s)")
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
        print(f"  break{where}: {reason.reason.splitlines()[0]}")


def compare_training(parts: set[str], rounds_count: int, steps: int, bf16: bool,
                     ceiling: dict[str, float] | None) -> None:
    per_step = step_flops()
    variants = training_variants(parts, bf16)
    comparison = compare(f"Training step (demo configuration, batch {BATCH}, {steps} step(s) "
                         "per call)", "patches/s", BATCH * steps,
                         {name: train_step(v, steps=steps) for name, v in variants.items()},
                         rounds_count)
    for name in comparison.rounds.seconds:
        achieved = per_step * steps / statistics.median(comparison.rounds.seconds[name])
        key = "conv3d bf16 channels-last" if variants[name].bf16 else "conv3d fp32"
        share = f" = {achieved / ceiling[key]:.0%} of {key}" if ceiling else ""
        print(f"  {name}: {achieved / 1e9:.1f} GFLOP/s{share}")


def largest_difference(comparison: Comparison, outputs: dict[str, Callable[[], np.ndarray]],
                       what: str) -> None:
    reference = outputs["fp32"]()
    for name in comparison.rounds.seconds:
        if name != "fp32":
            print(f"  largest {what} difference {name} - fp32: "
                  f"{np.abs(outputs[name]() - reference).max():.2e}")


def compare_features(parts: set[str], rounds_count: int, subjects: int, bf16: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = synthetic_store(Path(folder), subjects)
        torch.manual_seed(0)
        encoder = Encoder().eval()
        patches = store.num_subjects * store.num_landmarks
        variants = {name: run_as(v, lambda bf16=v.bf16: extract_features(
            encoder, store, device="cpu", progress=False, amp=bf16).features)
            for name, v in encoder_variants(parts, bf16).items()}
        comparison = compare(f"Feature extraction ({patches} patches)", "patches/s", patches,
                             variants, rounds_count)
        largest_difference(comparison, variants, "feature")


def compare_densemap(parts: set[str], rounds_count: int, root: Path | None, edge: int,
                     bf16: bool) -> None:
    from bench_densemap import build_cohort, interior_cube, load_scan, paper_encoder
    from drasclr.evaluation import densemap as dm
    from drasclr.evaluation.head import SubtypeHead

    with tempfile.TemporaryDirectory() as folder:
        if root is None:
            print("\nbuilding a one-subject cohort for the dense map ...")
            root = build_cohort(Path(folder), 1)
        scan = load_scan(root, "sub0000")
        encoder, head = paper_encoder(), SubtypeHead(128)
        with torch.no_grad():
            head.weight.normal_(0, 0.3)
        cube = interior_cube(scan, edge)
        variants = {name: run_as(v, lambda bf16=v.bf16: dm.exact_probabilities(
            encoder, head, scan, cube, device="cpu", amp=bf16, progress=False))
            for name, v in encoder_variants(parts, bf16).items()}
        comparison = compare(f"Dense map, exact ({len(cube)} voxels)", "voxels/s", len(cube),
                             variants, rounds_count)
        largest_difference(comparison, variants, "probability")


PARTS = ("ceiling", "train", "channels-last", "compile", "threads", "features", "densemap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed call")
    parser.add_argument("--subjects", type=int, default=8, help="feature store subjects")
    parser.add_argument("--densemap-root", type=Path,
                        help="a cohort made by bench_densemap.build_cohort (default: build one)")
    parser.add_argument("--densemap-edge", type=int, default=4, help="lung cube edge, voxels")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)}; channels-last, compile "
                             "and threads add variants to train, features and densemap")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {PARTS}")
    bf16 = cpu_has_native_bf16()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.get_num_interop_threads()} interop threads, native bf16: {bf16}")

    ceiling = print_ceiling() if "ceiling" in parts else None
    if "compile" in parts:
        explain_graph_breaks()
    if "train" in parts:
        compare_training(parts, args.rounds, args.steps, bf16, ceiling)
    if "features" in parts:
        compare_features(parts, args.rounds, args.subjects, bf16)
    if "densemap" in parts:
        compare_densemap(parts, args.rounds, args.densemap_root, args.densemap_edge, bf16)
    if args.profile:
        profile_steps(bf16)
    summary()


if __name__ == "__main__":
    main()
