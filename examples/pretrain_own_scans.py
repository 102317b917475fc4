"""Pretraining DrasCLR on your own folder of CT scans, end to end, atlas included.

    python examples/pretrain_own_scans.py --scans my_scans/ --atlas-scan my_scans/healthy.nii.gz \
        --out my_run/ [--epochs 20] [--workers 8] [--device auto]
    python examples/pretrain_own_scans.py --scans my_scans/ --atlas-mask atlas_lung_mask.nii.gz \
        --out my_run/

1. Atlas (docs/method.md#atlas-and-landmarks): from a lung mask you have (``--atlas-mask``,
   1 mm voxels, lungs > 0), or made here by segmenting one healthy subject's scan
   (``--atlas-scan``: resampled to 1 mm and segmented like every scan), then the landmarks.
2. Patch store: every scan of ``--scans`` (NIfTI, NRRD, MHA or DICOM series folders) resampled,
   segmented, registered to the atlas and cut into one 32^3 patch per landmark.
3. MoCo pretraining with the per-landmark memory bank.
4. Subject features of the trained encoder: ``<out>/features.npz``.

Every stage keeps its output under ``--out``; a re-run skips or resumes what is done. The
defaults are the paper's training settings (Yu et al. 2023, Section 3); ``--max-steps``,
``--batch-size``, ``--landmarks-per-batch`` and ``--queue-size`` make a small trial run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import drasclr


def make_atlas(out: Path, mask: Path | None, scan: Path | None) -> Path:
    """``out/atlas.npz`` from a lung mask, or from the lungs segmented in a scan."""
    from drasclr.data.atlas import build_atlas

    atlas_path = out / "atlas.npz"
    if atlas_path.exists():
        return atlas_path
    if mask is None:
        mask = out / "atlas_lung_mask.nii.gz"
        segment_atlas_scan(scan, mask)
    atlas = build_atlas(mask)
    atlas.save(atlas_path)
    print(f"atlas: {atlas.num_landmarks} landmarks from {mask}")
    return atlas_path


def segment_atlas_scan(scan: Path, mask_path: Path) -> None:
    """Write the lungs of ``scan`` on its 1 mm grid as a NIfTI label mask."""
    import nibabel as nib
    import numpy as np

    from drasclr.atomic import atomic_path
    from drasclr.data.io import read_ct
    from drasclr.data.lung_segmentation import segment_lungs
    from drasclr.data.resample import resample_isotropic

    volume = resample_isotropic(read_ct(scan), 1.0)  # landmarks are 32^3 patches of 1 mm
    lungs = segment_lungs(volume)
    labels = lungs.on_grid(volume.array.shape, volume.affine).astype(np.uint8)
    if not labels.any():
        raise ValueError(f"{scan}: no lungs found; give --atlas-mask or another --atlas-scan")
    with atomic_path(mask_path, suffix=".nii.gz") as temporary:
        nib.save(nib.Nifti1Image(labels, volume.affine), temporary)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=Path, required=True,
                        help="folder of CT scans (or a CSV of subject_id,path)")
    atlas = parser.add_mutually_exclusive_group(required=True)
    atlas.add_argument("--atlas-mask", type=Path, help="atlas lung mask, 1 mm voxels")
    atlas.add_argument("--atlas-scan", type=Path, help="a healthy subject's scan to make it from")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=1, help="preprocessing processes")
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    parser.add_argument("--max-steps", type=int, help="stop pretraining after this many steps")
    parser.add_argument("--batch-size", type=int, default=128, help="patches per step")
    parser.add_argument("--landmarks-per-batch", type=int, default=16,
                        help="landmarks per batch (batch-size must be a multiple)")
    parser.add_argument("--queue-size", type=int, default=4096, help="negatives per landmark")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of training")
    args = parser.parse_args(argv)
    if not args.scans.exists():
        parser.error(f"--scans {args.scans}: no such folder or file")

    atlas_path = make_atlas(args.out, args.atlas_mask, args.atlas_scan)

    from drasclr.data.preprocess import preprocess

    store = args.out / "store"
    summary = preprocess(args.scans, atlas_path, store, workers=args.workers)
    print(f"store: {summary.done + summary.skipped} subjects, {summary.failed} failed "
          f"(reasons in {store / 'manifest.csv'})")

    result = drasclr.train(
        store=str(store), atlas=str(atlas_path), out_dir=str(args.out / "train"),
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        landmarks_per_batch=args.landmarks_per_batch, queue_size=args.queue_size,
        device=args.device, seed=args.seed, tensorboard=False)
    if result.history:  # empty when an earlier run had already finished
        first, last = result.history[0], result.history[-1]
        print(f"pretraining: loss {first['loss']:.3f} -> {last['loss']:.3f} "
              f"over {len(result.history)} steps")
    print(f"checkpoint: {result.checkpoint}")

    features = drasclr.extract_features(result.checkpoint, store, out=args.out / "features.npz",
                                        device=args.device)
    print(f"features: {features.features.shape} -> {args.out / 'features.npz'}")
    return {"atlas": atlas_path, "store": store, "checkpoint": result.checkpoint,
            "features": features, "history": result.history}


if __name__ == "__main__":
    main()
