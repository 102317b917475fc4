"""The `drasclr` command line: one sub-command per module.

New commands live in this package (``drasclr/cli/<command>.py``), thin layers over the public
API; the older ones still sit beside their library modules. Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; only the
module of the command being run is imported, so ``drasclr synth`` does not pay for torch.
Bad input surfaces as a one-line error naming the problem, never a deep traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from drasclr import __version__

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
    parser = argparse.ArgumentParser(
        prog="drasclr", description=__doc__.splitlines()[0],
        epilog="`drasclr COMMAND --help` describes a command's options.")
    parser.add_argument("--version", action="version", version=f"drasclr {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 1 failed (or some subjects failed, as the command
    reports), 2 bad usage or input, 130 interrupted. Every error is one line naming the command;
    ``--debug`` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"drasclr {args.command}: interrupted; finished work is kept", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        bad_input = isinstance(error, (ValueError, OSError)) and not _is_system_error(error)
        print(f"drasclr {args.command}: error: {_one_line(error)}"
              + ("" if bad_input else " (run with --debug for the traceback)"), file=sys.stderr)
        return 2 if bad_input else 1


def _is_system_error(error: BaseException) -> bool:
    """A full disk, exhausted memory or descriptors: the machine's problem, not the input's."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.ENOMEM, errno.EMFILE,
                                                          errno.EDQUOT)


def _one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError's text names its file); exceptions that are
    not plain bad input are named by type."""
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, OSError)):
        message = f"{type(error).__name__}: {message}"
    return message


if __name__ == "__main__":
    sys.exit(main())
