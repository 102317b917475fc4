"""Subject features from the authors' pretrained checkpoint.

    python examples/authors_checkpoint_features.py --checkpoint checkpoint_0019.pth.tar \
        --store my_run/store --out authors_features.npz [--patches] [--device auto]

The checkpoint is the file the authors' DrasCLR training script writes (a ``torch.save`` dict
with ``state_dict`` keys ``module.encoder_q.*``; docs/method.md#the-authors-checkpoints).
``drasclr.load_encoder`` tells it from drasclr's own files by its contents, keeps the query
encoder and renames its keys; the
store must be cut with the authors' atlas landmarks for the coordinates to mean what their
weights expect (``drasclr atlas --mask <their atlas lung mask>``, then ``drasclr preprocess``).
The features file is the same as for our own checkpoints: ``subject_ids``, ``features`` (the
mean patch representation h over all landmarks, Yu et al. 2023, eq. 11) and ``metadata``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import drasclr


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the authors' checkpoint")
    parser.add_argument("--store", type=Path, required=True, help="patch store folder")
    parser.add_argument("--out", type=Path, required=True, help="features file (.npz)")
    parser.add_argument("--patches", action="store_true",
                        help="also every patch representation, in <out>.patches.npy")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)

    encoder = drasclr.load_encoder(args.checkpoint)
    experts = encoder.conv1.weight.shape[0]
    print(f"{args.checkpoint}: encoder with {experts} experts per layer, "
          f"representation size {encoder.rep_dim}")
    features = drasclr.extract_features(encoder, args.store, out=args.out, name="DrasCLR (authors)",
                                        patches=args.patches, device=args.device)
    print(f"{len(features.subject_ids)} subjects x {features.features.shape[1]} features "
          f"-> {args.out}")
    return features


if __name__ == "__main__":
    main()
