"""The `drasclr` command line: one sub-command per module.

New commands live in this package (``drasclr/cli/<command>.py``), thin layers over the public
API; the older ones still sit beside their library modules. Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; only the
module of the command being run is imported, so ``drasclr synth`` does not pay for torch.
Bad input surfaces as a one-line error naming the problem, never a deep traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("drasclr.demo", "run the main job end to end on the built-in synthetic cohort"),
    "synth": ("drasclr.data.synthetic", "generate a synthetic chest-CT cohort"),
    "atlas": ("drasclr.data.atlas", "build the landmark atlas from an atlas lung mask"),
    "preprocess": ("drasclr.data.preprocess", "turn CT files into a landmark patch store"),
    "train": ("drasclr.pretrain.trainer", "MoCo pretraining of the DrasCLR encoder"),
    "features": ("drasclr.cli.features", "patch and subject features of an encoder on a patch store"),
    "evaluate": ("drasclr.cli.evaluate",
                 "the paper's subject-level evaluation: readout, survival, COVID severity, report"),
    "detect": ("drasclr.cli.detect", "emphysema subtype detection: linear probe and fine-tuning"),
    "densemap": ("drasclr.cli.densemap", "voxel-wise probability map of an emphysema subtype"),
    "ablate": ("drasclr.cli.ablate", "pretrain and evaluate variants that differ in one thing"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drasclr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as error:
        print(f"drasclr {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drasclr {args.command}: interrupted; finished work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
