"""The main job, end to end on the built-in synthetic cohort (``drasclr demo``).

synthetic cohort -> atlas landmarks from the template lung mask -> patch store (segmentation,
registration, patch cutting) -> MoCo pretraining with the per-landmark memory bank -> subject
features from the trained encoder. Every stage keeps its outputs under ``--out`` and is
skipped (or resumed) when they are already there, so an interrupted demo picks up where it was.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    parser.add_argument("--subjects", type=int, default=12, help="synthetic subjects")
    parser.add_argument("--seed", type=int, default=0, help="seed of cohort and training")
    parser.add_argument("--steps", type=int, default=30, help="pretraining steps")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes for cohort generation and preprocessing")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")


def run(args: argparse.Namespace) -> int:
    from drasclr import extract_features, train
    from drasclr.data.atlas import Atlas, build_atlas
    from drasclr.data.preprocess import preprocess
    from drasclr.data.store import PatchStore
    from drasclr.data.synthetic import generate_cohort

    if args.subjects < 2:
        raise ValueError(f"--subjects: need at least 2 subjects, got {args.subjects}")
    out: Path = args.out
    cohort, atlas_path, store_path = out / "cohort", out / "atlas.npz", out / "store"
    timings: dict[str, float] = {}

    def stage(name: str) -> float:
        print(f"\n== {name}", flush=True)
        return time.perf_counter()

    start = stage(f"synthetic cohort: {args.subjects} small COPD subjects -> {cohort}")
    if not (cohort / "cohort.json").exists():
        generate_cohort(cohort, args.subjects, seed=args.seed, kind="copd", size="small",
                        workers=args.workers)
    timings["cohort"] = time.perf_counter() - start

    start = stage(f"atlas landmarks from the template lung mask -> {atlas_path}")
    if not atlas_path.exists():
        build_atlas(cohort / "template" / "lung_mask.nii.gz").save(atlas_path)
    atlas = Atlas.load(atlas_path)
    print(f"{atlas.num_landmarks} landmarks")
    timings["atlas"] = time.perf_counter() - start

    start = stage(f"preprocessing: segment, register, cut patches -> {store_path}")
    preprocess(cohort / "images", atlas_path, store_path, workers=args.workers)
    store = PatchStore(store_path)
    failed = [row for row in store.manifest if row["status"] != "done"]
    print(f"{store.num_subjects} subjects in the store, {len(failed)} failed")
    timings["preprocess"] = time.perf_counter() - start

    start = stage(f"MoCo pretraining, {args.steps} steps -> {out / 'train'}")
    landmarks_per_batch, queue_size = min(4, atlas.num_landmarks), 64
    subjects_per_batch = min(4, store.num_subjects)
    result = train(
        store=str(store_path), atlas=str(atlas_path), out_dir=str(out / "train"),
        max_steps=args.steps, landmarks_per_batch=landmarks_per_batch,
        batch_size=landmarks_per_batch * subjects_per_batch, queue_size=queue_size,
        seed=args.seed, device=args.device,
    )
    first, last = result.history[0], result.history[-1]
    chance_loss, chance_top1 = 2 * math.log(1 + queue_size), 1 / (1 + queue_size)
    print(f"loss {first['loss']:.3f} -> {last['loss']:.3f} over {len(result.history)} steps "
          f"(chance level about {chance_loss:.2f})")
    print("  the per-landmark queues start as random unit vectors (easy negatives); the loss "
          "rises while they fill with other subjects' keys at the same landmark (hard negatives)")
    print(f"top-1 in the last step: local {last['local_top1']:.2f}, neighbour "
          f"{last['neighbour_top1']:.2f} (chance {chance_top1:.3f})")
    print(f"checkpoint: {result.checkpoint}")
    timings["pretrain"] = time.perf_counter() - start

    start = stage("subject features: mean patch representation over all landmarks")
    features = extract_features(result.checkpoint, store_path, out=out / "features.npz",
                                device=args.device)
    print(f"features {features.features.shape} -> {out / 'features.npz'}")
    timings["features"] = time.perf_counter() - start

    print("\n== timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return 0
