"""``drasclr atlas``: the landmark atlas from an atlas lung mask, a thin layer over
:func:`drasclr.data.atlas.build_atlas`, or over :func:`drasclr.data.atlas.atlas_from_landmarks`
for the authors' landmark file (the atlas for their weights):

    drasclr atlas --mask template/lung_mask.nii.gz --out atlas.npz
    drasclr atlas --mask atlas_lung_mask.nii.gz --landmarks atlas_patch_loc.npy --out atlas.npz
"""
from __future__ import annotations

import argparse
import inspect

from drasclr.data.atlas import NEIGHBOUR_TIES, atlas_from_landmarks, build_atlas

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
#: build_atlas's grid-rule options, which imported landmarks do not use.
_GRID_OPTIONS = ("step", "min_lung_fraction", "max_landmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask", required=True, help="atlas lung mask (NIfTI); voxels > 0 are lung")
    parser.add_argument("--image", help="atlas CT image on the same grid (recorded in the atlas)")
    parser.add_argument("--out", required=True, help="atlas file to write (.npz)")
    parser.add_argument("--landmarks", help="the authors' landmark file (atlas_patch_loc.npy): "
                        "take its patch corners instead of scanning the mask")
    parser.add_argument("--neighbour-ties", choices=NEIGHBOUR_TIES,
                        help="order of equidistant neighbours (default: index; authors with "
                             "--landmarks)")
    defaults = inspect.signature(build_atlas).parameters
    for flag, (name, kind, help_text) in _OPTIONS.items():
        default = defaults[name].default
        parser.add_argument(flag, dest=name, type=kind, default=default,
                            help=f"{help_text} (default {default})")


def run(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name, _, _ in _OPTIONS.values()}
    if args.landmarks:
        defaults = inspect.signature(build_atlas).parameters
        changed = [f"--{name.replace('_', '-')}" for name in _GRID_OPTIONS
                   if options.pop(name) != defaults[name].default]
        if changed:
            raise ValueError(f"{', '.join(changed)}: grid-rule options have no effect with "
                             "--landmarks")
        atlas = atlas_from_landmarks(args.mask, args.landmarks, image_path=args.image,
                                     neighbour_ties=args.neighbour_ties or "authors", **options)
        print(f"{args.out}: {atlas.num_landmarks} landmarks from {args.landmarks} "
              f"({atlas.patch_size}^3 patches, smallest lung fraction "
              f"{atlas.min_lung_fraction:.3f}, neighbour ties: {atlas.neighbour_ties})")
    else:
        atlas = build_atlas(args.mask, image_path=args.image,
                            neighbour_ties=args.neighbour_ties or "index", **options)
        print(
            f"{args.out}: {atlas.num_landmarks} landmarks ({atlas.patch_size}^3 patches, step "
            f"{atlas.step}, lung fraction > {atlas.min_lung_fraction:g})"
        )
    atlas.save(args.out)
    return 0
