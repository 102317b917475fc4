"""Per-stage time of one real full-resolution chest CT through drasclr's preprocessing, against
the ANTs and MONAI equivalents where they exist.

The scan is LUNG1-001 (512 x 512 x 134 at 0.98 x 0.98 x 3 mm; ../shared/data/real_ct), the
atlas the authors' real atlas lung mask. Stages and their counterparts:

- read: ``drasclr.data.io.read_ct`` / ``ants.image_read`` / MONAI ``LoadImage``;
- resample to 1 mm, cubic B-spline: ``resample_isotropic`` / ``ants.resample_image(interp_type=4)``
  / MONAI ``Spacing(pixdim=1, mode=3)``;
- segment: ``segment_lungs`` (no library counterpart without model weights);
- register: ``register_to_atlas`` with the fast schedule / ``ants.registration`` of the same
  label images with the reference schedule at a tenth of its iterations (50x25x10; the full
  500x250x100 takes minutes) / drasclr's reference schedule itself is left out for time;
- cut: ``cut_patches`` of every landmark (no library counterpart).

Variants of a stage run interleaved round by round (benchmarks/interleave.py); ratios are the
median of the per-round ratios to drasclr's, with min-max (one round: no warm-up call). ITK
gets one thread, as each preprocessing worker does.

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 OMP_NUM_THREADS=1 \
        .venv/bin/python benchmarks/bench_real_ct.py [--rounds 3] [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleave  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import ants
    from monai.transforms import LoadImage, Spacing

    from drasclr.data.atlas import build_atlas
    from drasclr.data.io import read_ct, to_ants
    from drasclr.data.lung_segmentation import LungMask, segment_lungs
    from drasclr.data.patches import cut_patches
    from drasclr.data.registration import SCHEDULES, _registration_image, register_to_atlas
    from drasclr.data.resample import resample_isotropic

    scan = args.data / "real_ct" / "lung1-001_ct.nii.gz"
    atlas = build_atlas(args.data / "atlas_lung_mask.nii.gz")
    atlas_lungs = LungMask(atlas.mask, atlas.affine)
    print(f"{scan.name}, atlas {atlas.num_landmarks} landmarks; {args.rounds} rounds")
    rows = []

    def stage(name, variants, reference="drasclr"):
        rounds = interleave(variants, args.rounds, warmup=args.rounds > 1)
        for variant in variants:
            ratio = "" if variant == reference else rounds.describe(variant, reference)
            rows.append((name, variant, statistics.median(rounds.seconds[variant]),
                         min(rounds.seconds[variant]), max(rounds.seconds[variant]), ratio))
            print(f"{name:9s} {variant:28s} {rows[-1][2]:7.2f} s  {ratio}", flush=True)

    loader = LoadImage(image_only=True, ensure_channel_first=True)
    stage("read", {"drasclr": lambda: read_ct(scan), "ants.image_read": lambda: ants.image_read(str(scan)),
                   "monai LoadImage": lambda: loader(str(scan))})

    volume = read_ct(scan)
    ants_image = to_ants(volume.array, volume.affine)
    monai_image = loader(str(scan))
    spacing = Spacing(pixdim=(1.0, 1.0, 1.0), mode=3, padding_mode="mirror")
    stage("resample", {
        "drasclr": lambda: resample_isotropic(volume, 1.0),
        "ants.resample_image": lambda: ants.resample_image(ants_image, (1, 1, 1), interp_type=4),
        "monai Spacing": lambda: spacing(monai_image),
    })

    iso = resample_isotropic(volume, 1.0)
    stage("segment", {"drasclr": lambda: segment_lungs(iso)})

    lungs = segment_lungs(iso)
    reference = SCHEDULES["reference"]
    folder = tempfile.mkdtemp(prefix="bench-real-ct-")
    fixed = _registration_image(atlas_lungs.labels, atlas_lungs.affine, None)
    moving = _registration_image(lungs.labels, lungs.affine, None)

    def ants_reference_tenth():
        return ants.registration(
            fixed, moving, type_of_transform="Affine", aff_metric="mattes",
            aff_iterations=tuple(i // 10 for i in reference.iterations),
            aff_shrink_factors=reference.shrink_factors,
            aff_smoothing_sigmas=reference.smoothing_sigmas, aff_random_sampling_rate=0.5,
            grad_step=reference.gradient_step, outprefix=f"{folder}/ants_")

    registration = register_to_atlas(lungs, atlas_lungs, "fast")
    stage("register", {"drasclr": lambda: register_to_atlas(lungs, atlas_lungs, "fast"),
                       "ants.registration (reference/10)": ants_reference_tenth})

    world = registration.map_points(atlas.centres_world())
    to_voxel = np.linalg.inv(iso.affine)
    centres = world @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    stage("cut", {"drasclr": lambda: cut_patches(iso.array, centres, atlas.patch_size)})

    print("\n| stage | variant | median s (min-max) | time / drasclr |\n|---|---|---|---|")
    for name, variant, median, low, high, ratio in rows:
        print(f"| {name} | {variant} | {median:.2f} ({low:.2f}-{high:.2f}) | {ratio} |")


if __name__ == "__main__":
    main()
