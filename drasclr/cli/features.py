"""``drasclr features``: subject (and optionally patch) features of an encoder on a patch store.

    drasclr features --checkpoint CKPT --store STORE --out FEATURES.npz [--patches]
    drasclr features --random-init 0 --store STORE --out random.npz   # the baseline encoder

A thin layer over :func:`drasclr.features.extract_features`.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint",
                        help="encoder to use: checkpoint_last.pt or encoder_epoch_NNNN.pt of "
                             "`drasclr train`, or an authors' checkpoint (detected from the "
                             "contents); optional with --random-init, which then takes only "
                             "its architecture")
    parser.add_argument("--store", required=True,
                        help="patch store folder from `drasclr preprocess` (its atlas is found "
                             "from the store's own record)")
    parser.add_argument("--out", required=True,
                        help="features file to write (.npz: subject ids, features, metadata)")
    parser.add_argument("--patches", action="store_true",
                        help="also write every patch representation (subjects x landmarks x "
                             "rep_dim) as a memory-mappable <out stem>.patches.npy")
    parser.add_argument("--patch-dtype", choices=("float16", "float32"), default="float16",
                        help="element type of the patch representation file (default float16)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, with bfloat16), cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int,
                        help="patches per forward pass (default 256 on CUDA, 16 on the CPU, "
                             "where small batches stay in the cache)")
    parser.add_argument("--random-init", type=int, metavar="SEED",
                        help="use a randomly initialised encoder of the same architecture, "
                             "seeded: the baseline of the evaluation tables")
    parser.add_argument("--name", help="label of this feature set in evaluation tables "
                                       "(default: DrasCLR, DrasCLR (authors) or random init "
                                       "(seed S))")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fp32", action="store_true",
                        help="float32 throughout (default: bf16 autocast where it pays, "
                             "see drasclr.precision)")


def run(args: argparse.Namespace) -> int:
    from drasclr.features import extract_features

    if args.checkpoint is None and args.random_init is None:
        raise ValueError("give --checkpoint, or --random-init SEED for the random-init baseline")
    features = extract_features(
        args.checkpoint, args.store, out=args.out, name=args.name, patches=args.patches,
        patch_dtype=args.patch_dtype, device=args.device, batch_size=args.batch,
        random_init=args.random_init, progress=not args.no_progress, amp=not args.fp32,
    )
    meta = features.metadata
    print(f"{args.out}: features of {len(features.subject_ids)} subjects x {meta['rep_dim']} "
          f"({features.name!r}, {meta['encoder']}, {meta['device']} {meta['dtype']}, "
          f"{meta['seconds']:.1f} s)")
    if "patches" in meta:
        print(f"{meta['patches']}: patch representations {len(features.subject_ids)} x "
              f"{meta['num_landmarks']} x {meta['rep_dim']} {meta['patch_dtype']}")
    return 0
