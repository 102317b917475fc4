"""Pretraining settings where drasclr and the authors' code differ, measured on one small
synthetic COPD cohort (docs/method.md#where-we-differ-from-the-authors-code).

Each variant pretrains like the demo (batch 16 of 4 landmarks x 4 subjects, seed 0) for 50
steps with one setting changed, and is scored by its contrastive top-1 over the last steps and
by the ablation tables' linear readout of its subject features (5-fold CV). The queue holds 16
keys per landmark, so that it is full of real keys after about 4 visits of each landmark and
top-1 measures something within so short a run (with the demo's 64 it is still mostly the
random initial keys):

- ``baseline``: keys in one BatchNorm batch, neighbour ties by index, queue 16;
- ``key_bn_splits=4``: keys shuffled and encoded in 4 sub-batches (one-process shuffled BN);
- ``authors_ties``: neighbours with the authors' tie order (same corners, same store);
- ``queue_size=64``: a queue four times as long, so four times staler;
- ``landmarks_per_batch=1``: one landmark x 16 subjects per batch (the authors' batches);
- ``random init``: no pretraining (the randomly initialised encoder, seed 0), the readout's floor.

    .venv/bin/python benchmarks/bench_authors_settings.py --out /tmp/authors_bench
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from drasclr import extract_features, train
from drasclr.data.atlas import Atlas, build_atlas, nearest_neighbours
from drasclr.data.preprocess import preprocess
from drasclr.data.synthetic import generate_cohort
from drasclr.evaluation.ablation import ABLATION_TASKS
from drasclr.evaluation.data import load_clinical
from drasclr.evaluation.readout import readout_scores

BASE = dict(batch_size=16, landmarks_per_batch=4, queue_size=16)
VARIANTS = {
    "baseline": {},
    "key_bn_splits=4": dict(key_bn_splits=4),
    "authors_ties": dict(atlas="authors"),
    "queue_size=64": dict(queue_size=64),
    "landmarks_per_batch=1": dict(landmarks_per_batch=1),
    "random init": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/authors_bench"))
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--last", type=int, default=20, help="steps the top-1 is averaged over")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cohort, store = args.out / "cohort", args.out / "store"
    atlases = {"index": args.out / "atlas.npz", "authors": args.out / "atlas_authors_ties.npz"}
    if not (cohort / "cohort.json").exists():
        generate_cohort(cohort, args.subjects, seed=0, kind="copd", size="small", workers=2)
    if not atlases["index"].exists():
        atlas = build_atlas(cohort / "template" / "lung_mask.nii.gz")
        atlas.save(atlases["index"])
        atlas.neighbours = nearest_neighbours(atlas.corners, atlas.neighbours.shape[1], "authors")
        atlas.neighbour_ties = "authors"
        atlas.save(atlases["authors"])
    print(f"{Atlas.load(atlases['index']).num_landmarks} landmarks")
    preprocess(cohort / "images", atlases["index"], store, workers=2)
    clinical = load_clinical(cohort / "clinical.csv")
    results_path = args.out / f"results_{'_'.join(args.variants)}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.variants:
        if name in results:
            continue
        if VARIANTS[name] is None:
            features = extract_features(None, store, random_init=0, progress=False, device="cpu")
            seconds, last = 0.0, [dict(local_top1=np.nan, neighbour_top1=np.nan)]
        else:
            settings = {**BASE, **VARIANTS[name]}
            atlas = atlases[settings.pop("atlas", "index")]
            started = time.perf_counter()
            run = train(store=str(store), atlas=str(atlas), out_dir=str(args.out / name),
                        max_steps=args.steps, seed=0, device="cpu", tensorboard=False,
                        progress=False, **settings)
            seconds = time.perf_counter() - started
            last = run.history[-args.last:]
            features = extract_features(run.checkpoint, store, progress=False, device="cpu")
        scores = readout_scores(features, clinical, ABLATION_TASKS, folds=5, seed=0)
        results[name] = dict(
            seconds=seconds,
            local_top1=float(np.mean([row["local_top1"] for row in last])),
            neighbour_top1=float(np.mean([row["neighbour_top1"] for row in last])),
            readout={task: [float(scores[task].mean), float(scores[task].sd)]
                     for task in ABLATION_TASKS},
        )
        results_path.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(results[name]), flush=True)
    print("| variant | local top-1 | neighbour top-1 | " + " | ".join(ABLATION_TASKS) + " |")
    for name, row in results.items():
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in row["readout"].values()]
        print(f"| {name} | {row['local_top1']:.3f} | {row['neighbour_top1']:.3f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
