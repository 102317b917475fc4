"""``drasclr atlas``: the landmark atlas from an atlas lung mask, a thin layer over
:func:`drasclr.data.atlas.build_atlas`.

    drasclr atlas --mask template/lung_mask.nii.gz --out atlas.npz
"""
from __future__ import annotations

import argparse
import inspect

from drasclr.data.atlas import build_atlas

# flag -> (build_atlas argument, type, help); the defaults are build_atlas's own
_OPTIONS = {
    "--patch-size": ("patch_size", int, "edge of the cubic patches in atlas voxels"),
    "--step": ("step", int, "spacing of the landmark grid in atlas voxels"),
    "--min-lung-fraction": ("min_lung_fraction", float,
                            "keep a landmark when more than this fraction of its patch is lung"),
    "--max-landmarks": ("max_landmarks", int,
                        "raise the lung fraction by 0.1 until fewer landmarks than this remain"),
    "--k-max": ("k_max", int, "nearest neighbours stored per landmark"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask", required=True, help="atlas lung mask (NIfTI); voxels > 0 are lung")
    parser.add_argument("--image", help="atlas CT image on the same grid (recorded in the atlas)")
    parser.add_argument("--out", required=True, help="atlas file to write (.npz)")
    defaults = inspect.signature(build_atlas).parameters
    for flag, (name, kind, help_text) in _OPTIONS.items():
        default = defaults[name].default
        parser.add_argument(flag, dest=name, type=kind, default=default,
                            help=f"{help_text} (default {default})")


def run(args: argparse.Namespace) -> int:
    atlas = build_atlas(args.mask, image_path=args.image,
                        **{name: getattr(args, name) for name, _, _ in _OPTIONS.values()})
    atlas.save(args.out)
    print(
        f"{args.out}: {atlas.num_landmarks} landmarks ({atlas.patch_size}^3 patches, step "
        f"{atlas.step}, lung fraction > {atlas.min_lung_fraction:g})"
    )
    return 0
