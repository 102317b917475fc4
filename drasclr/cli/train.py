"""``drasclr train``: MoCo pretraining of the DrasCLR encoder, a thin layer over
:func:`drasclr.train`.

    drasclr train --store STORE --atlas atlas.npz --out-dir runs/a --lr 0.01
    drasclr train --config run.yaml --max-steps 100          # flags override the file
    torchrun --nproc_per_node=4 -m drasclr.cli train --config run.yaml   # DDP

Every `TrainConfig` field is a typed flag generated from the dataclass
(:mod:`drasclr.cli.dataclass_flags`).
"""
from __future__ import annotations

import argparse

from drasclr.cli.dataclass_flags import add_dataclass_flags, flag_overrides, merge
from drasclr.pretrain.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of TrainConfig fields (TrainConfig.save writes "
                             "one); the flags given beside it override its values")
    add_dataclass_flags(parser.add_argument_group("training options (TrainConfig fields)"),
                        TrainConfig)


def run(args: argparse.Namespace) -> int:
    from drasclr.pretrain import train

    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    source = f"config {args.config} with flags" if args.config else "flags"
    config = TrainConfig.from_dict(merge(base.to_dict(), flag_overrides(args)), source=source)
    try:
        result = train(config)
    except FloatingPointError as error:
        print(f"drasclr train: error: {error}", flush=True)
        return 1
    print(f"final checkpoint: {result.checkpoint}")
    return 0
