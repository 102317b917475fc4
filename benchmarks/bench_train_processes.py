"""Two cores, two ways: one training process with two torch threads, or two processes (DDP,
Gloo) with one thread each, at the same global batch; each in float32 and in bfloat16
autocast (``DRASCLR_CPU_BF16=1``, on a CPU with native bf16).

    python benchmarks/bench_train_processes.py --store STORE --atlas ATLAS [--steps 40] [--rounds 5]

Each call is a real ``drasclr train`` of the demo's configuration (batch 16 = 4 landmarks x 4
subjects over all processes, queue 64; ``drasclr.demo``) into a fresh folder, launched as
the user would: ``drasclr train`` alone, or ``torchrun --standalone --nproc-per-node 2 -m
drasclr.cli train``. Variants run interleaved round by round (benchmarks/interleave.py).
Two figures per variant: the whole command's wall time (start-up, store opening and the
process group included) and the training rate, the median of ``patches_per_s`` in the
first process's metrics.csv after ``--warmup-steps`` (global batch / step time; with two
processes a step ends at the gradient all-reduce, so that is the group's rate). A run that
fails (e.g. a non-finite loss) is reported with its message and left out of the ratios. Ratios are to
``1 process x 2 threads``, the library's default on this machine, per round.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from drasclr.precision import CPU_BF16_VARIABLE
from interleave import interleave

BIN = Path(sys.executable).parent
DEMO_TRAINING = ["--landmarks-per-batch", "4", "--batch-size", "16", "--queue-size", "64",
                 "--seed", "0", "--no-tensorboard", "--device", "cpu"]
#: name -> (processes, torch threads per process, bf16 autocast on the CPU)
VARIANTS = {"1 process x 2 threads": (1, 2, False), "2 processes x 1 thread": (2, 1, False),
            "1 process x 1 thread": (1, 1, False), "1 process x 2 threads bf16": (1, 2, True),
            "2 processes x 1 thread bf16": (2, 1, True)}
REFERENCE = "1 process x 2 threads"


def command(processes: int, arguments: list[str]) -> list[str]:
    if processes == 1:
        return [str(BIN / "drasclr"), "train", *arguments]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={processes}",
            "-m", "drasclr.cli", "train", *arguments]


def median_rate(metrics: Path, warmup_steps: int) -> float:
    with metrics.open() as file:
        rates = [float(row["patches_per_s"]) for row in csv.DictReader(file)
                 if int(row["step"]) > warmup_steps]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a patch store (e.g. a demo's copd/store)")
    parser.add_argument("--atlas", required=True, help="the store's atlas (.npz)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per call")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="first steps of each call left out of its rate")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps {args.steps} must exceed --warmup-steps {args.warmup_steps}")

    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        def run(name: str):
            processes, threads, bf16 = VARIANTS[name]
            out_dir = Path(tempfile.mkdtemp(dir=scratch))  # fresh: train resumes a folder's run
            env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                   CPU_BF16_VARIABLE: "1" if bf16 else "0"}
            arguments = ["--store", args.store, "--atlas", args.atlas, "--out-dir", str(out_dir),
                         "--max-steps", str(args.steps), *DEMO_TRAINING]
            done = subprocess.run(command(processes, arguments), env=env, capture_output=True,
                                  text=True)
            if done.returncode:  # reported, and left out of the ratios; the other runs go on
                print(f"{name}: exit status {done.returncode}: {done.stdout.strip()[-500:]}")
                rates[name].append(float("nan"))
            else:
                rates[name].append(median_rate(out_dir / "metrics.csv", args.warmup_steps))

        rounds = interleave({name: (lambda name=name: run(name)) for name in VARIANTS},
                            rounds=args.rounds, warmup=False, report=print)

    print(f"\n{args.steps} steps per call, rate = median patches/s after step "
          f"{args.warmup_steps}; ratios per round to '{REFERENCE}', median (min-max)")
    print(f"{'variant':<24} {'wall s (median)':>16} {'wall speed-up':>22} "
          f"{'patches/s (median)':>19} {'rate ratio':>22}")
    for name in VARIANTS:
        rate_ratios = [a / b for a, b in zip(rates[name], rates[REFERENCE])
                       if math.isfinite(a / b)]
        if not rate_ratios:
            print(f"{name:<24} failed in every round")
            continue
        finite = [rate for rate in rates[name] if math.isfinite(rate)]
        print(f"{name:<24} {rounds.median(name):>16.1f} "
              f"{rounds.describe(REFERENCE, name):>22} {statistics.median(finite):>19.1f} "
              f"{statistics.median(rate_ratios):>8.2f}x ({min(rate_ratios):.2f}-"
              f"{max(rate_ratios):.2f}x)")


if __name__ == "__main__":
    main()
