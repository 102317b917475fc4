"""Hard kills at random moments lose nothing. Not part of CI.

For each trial the command is started, SIGKILLed (the main process only: its workers must die
with it) at a random moment, then run again to completion, and the result is compared with the
uninterrupted run's. The moment is drawn as a random amount of progress (k of the run's steps
or subjects recorded, k from 0) plus a random delay of up to 2 s after it, so every trial kills
the run at a random point of its work however loaded the machine is:

- ``preprocess`` (2 workers, 3 small synthetic subjects): every patch and transform file
  byte-identical, the manifest identical apart from its timing columns, no temporary file
  left behind;
- ``train`` (CPU, a tiny model checkpointing every step): ``checkpoint_last.pt`` bit-identical
  in every tensor (model with its memory bank, optimiser, scheduler, RNG state, position),
  every per-epoch encoder file too, and ``metrics.csv`` identical apart from patches/s.

    .venv/bin/python benchmarks/kill_test.py [--trials 20] [--only preprocess|train] [--seed 0]

Prints one line per trial and ``preprocess: k/n, train: k/n``; exits 1 when a trial lost
something. tests/test_kill_trials.py runs a few trials of each with the same functions.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
def timing(column: str) -> bool:
    """Columns that differ between any two runs: wall and CPU times, throughput."""
    return "seconds" in column or column == "patches_per_s"


# -- running and killing ----------------------------------------------------------------------

def run_to_end(command: list[str]) -> float:
    """Run ``command`` to completion; its wall time. Exit 1 (some subjects failed) is fine."""
    started = time.perf_counter()
    finished = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if finished.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed ({finished.returncode}): "
                           f"{finished.stderr[-2000:]}")
    return time.perf_counter() - started


def run_and_kill(command: list[str], progress, done: int, delay: float) -> bool:
    """Start ``command``; once ``progress()`` reaches ``done``, wait ``delay`` seconds and
    SIGKILL its main process. True when the kill came before it finished."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    while process.poll() is None and progress() < done:
        time.sleep(0.005)
    deadline = time.monotonic() + delay
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def rows(path: Path) -> int:
    """Lines of a CSV file past its header; 0 while it is missing."""
    try:
        return max(len(path.read_text().splitlines()) - 1, 0)
    except OSError:
        return 0


# -- preprocessing ----------------------------------------------------------------------------

def make_cohort(folder: Path, subjects: int = 3) -> tuple[Path, Path]:
    """(images folder, atlas file) of a small synthetic cohort."""
    from drasclr.data.atlas import build_atlas
    from drasclr.data.synthetic import generate_cohort

    generate_cohort(folder / "cohort", subjects, seed=0, kind="copd", size="small",
                    workers=1, progress=False)
    atlas = folder / "atlas.npz"
    build_atlas(folder / "cohort" / "template" / "lung_mask.nii.gz").save(atlas)
    return folder / "cohort" / "images", atlas


def preprocess_command(images: Path, atlas: Path, out: Path, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "drasclr.cli", "preprocess", "--images", str(images),
            "--atlas", str(atlas), "--out", str(out), "--workers", str(workers), "--no-progress"]


def store_state(root: Path) -> dict:
    """Everything a store holds, timing columns of the manifest aside."""
    state = {str(path.relative_to(root)): path.read_bytes()
             for folder in ("patches", "transforms") for path in sorted((root / folder).rglob("*"))
             if path.is_file()}
    with open(root / "manifest.csv", newline="") as file:
        state["manifest.csv"] = [{k: v for k, v in row.items() if not timing(k)}
                                 for row in csv.DictReader(file)]
    state["store.json"] = (root / "store.json").read_bytes()
    return state


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob(".*~*~*~*") if path.is_file()]


def differences(reference: dict, other: dict) -> list[str]:
    keys = sorted(set(reference) | set(other))
    return [key for key in keys if key not in reference or key not in other
            or not _equal(reference[key], other[key])]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def kill_and_resume(command: list[str], log: Path, state_of, reference: dict, done: int,
                    delay: float, unit: str) -> tuple[bool, str]:
    """One trial: kill ``command`` once ``log`` (a CSV it appends to) has ``done`` rows and
    ``delay`` seconds more, run it to the end, compare ``state_of(out)`` with ``reference``.
    (ok, what happened)."""
    killed = run_and_kill(command, lambda: rows(log), done, delay)
    run_to_end(command)
    lost = differences(reference, state_of(log.parent))
    left = temporaries(log.parent)
    ok = not lost and not left
    moment = f"{done} {unit}(s) recorded + {delay:.2f} s"
    return ok, (f"killed at {moment}" if killed else f"finished before {moment}") + (
        "" if ok else f": differs in {lost[:5]}, temporary files left {left[:5]}")


# -- training ---------------------------------------------------------------------------------

TRAIN_SETTINGS = dict(epochs=3, batch_size=8, landmarks_per_batch=2, queue_size=8, num_experts=2,
                      rep_dim=16, moco_dim=16, k_neighbours=1, checkpoint_every=1,
                      progress=False, tensorboard=False, backend="grouped", device="cpu",
                      num_workers=1, seed=3)


def make_train_inputs(folder: Path, subjects: int = 4, landmarks: int = 6) -> tuple[Path, Path]:
    """(store, atlas) of smooth random HU patches on a grid atlas."""
    from scipy.ndimage import gaussian_filter

    from drasclr.data.atlas import Atlas, nearest_neighbours, normalised_coords
    from drasclr.data.store import create_store, write_subject

    rng = np.random.default_rng(0)
    corners = np.stack(np.unravel_index(np.arange(landmarks), (2, 2, 8)), 1)[:, ::-1] * 26
    corners = np.ascontiguousarray(corners, dtype=np.int64)
    atlas = Atlas(corners, normalised_coords(corners), nearest_neighbours(corners, 3),
                  np.ones((4, 4, 4), np.uint8), np.eye(4), 32, 26, 0.1, "kill test")
    atlas.save(folder / "atlas.npz")
    create_store(folder / "store", atlas, folder / "atlas.npz")
    for s in range(subjects):
        field = gaussian_filter(rng.standard_normal((landmarks, 32, 32, 32)), (0, 3, 3, 3))
        hu = rng.uniform(-850, -300) + 150 * field / field.std()
        write_subject(folder / "store", f"s{s:02d}", "synthetic",
                      patches=hu.clip(-1024, 240).astype(np.int16))
    return folder / "store", folder / "atlas.npz"


def train_command(store: Path, atlas: Path, out: Path) -> list[str]:
    from drasclr.pretrain.config import TrainConfig

    config = TrainConfig(store=str(store), atlas=str(atlas), out_dir=str(out), **TRAIN_SETTINGS)
    path = config.save(out.parent / f"{out.name}.yaml")
    return [sys.executable, "-m", "drasclr.cli", "train", "--config", str(path)]


def run_state(out: Path) -> dict:
    """The final checkpoint (every tensor), each epoch's encoder file, the metrics but for
    their timing column."""
    state = {}
    for path in sorted(out.glob("*.pt")):
        state[path.name] = torch.load(path, map_location="cpu", weights_only=True)
        state[path.name].get("config", {}).pop("out_dir", None)  # where, not what
    with open(out / "metrics.csv", newline="") as file:  # as text: the file, not its numbers
        state["metrics.csv"] = [{k: v for k, v in row.items() if not timing(k)}
                                for row in csv.DictReader(file)]
    return state


# -- the script -------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per command (default 20)")
    parser.add_argument("--only", choices=("preprocess", "train"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    moments = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.workdir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        totals = {}
        for name in ("preprocess", "train"):
            if args.only not in (None, name):
                continue
            if name == "preprocess":
                images, atlas = make_cohort(work)
                seconds = run_to_end(preprocess_command(images, atlas, work / "reference"))
                reference = store_state(work / "reference")
                units = rows(work / "reference" / "manifest.csv")

                def trial(out, done, delay):
                    return kill_and_resume(preprocess_command(images, atlas, out),
                                           out / "manifest.csv", store_state, reference, done,
                                           delay, "subject")
            else:
                store, atlas = make_train_inputs(work)
                seconds = run_to_end(train_command(store, atlas, work / "reference_run"))
                reference = run_state(work / "reference_run")
                units = rows(work / "reference_run" / "metrics.csv")

                def trial(out, done, delay):
                    return kill_and_resume(train_command(store, atlas, out), out / "metrics.csv",
                                           run_state, reference, done, delay, "step")
            print(f"{name}: uninterrupted run {seconds:.1f} s", flush=True)
            passed = 0
            for number in range(args.trials):
                ok, message = trial(work / f"{name}_{number:02d}", moments.randrange(units),
                                    moments.uniform(0, 2.0))
                passed += ok
                print(f"  {name} trial {number + 1}: {'ok' if ok else 'LOST'} ({message})",
                      flush=True)
            totals[name] = (passed, args.trials)
        print(", ".join(f"{name}: {p}/{n}" for name, (p, n) in totals.items()))
    return 0 if all(p == n for p, n in totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
