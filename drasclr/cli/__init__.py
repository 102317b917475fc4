"""The `drasclr` command line, a layer of its own over the public API.

Each command is one module, ``drasclr/cli/<command>.py``, defining ``add_arguments(parser)`` and
``run(args) -> int``; library modules hold no command-line code. Only the module of the command
being run is imported, so ``drasclr synth`` does not pay for torch. Bad input, bad flags
included, surfaces as a one-line error naming the problem, never a deep traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import NoReturn

from drasclr import __version__

DESCRIPTION = """\
DrasCLR: anatomy-aware self-supervised learning for 3D lung CT (Yu et al., Medical Image
Analysis 2023). The usual journey, one command per step:

  drasclr atlas --mask atlas_lung_mask.nii.gz --out atlas.npz
  drasclr preprocess --images scans/ --atlas atlas.npz --out store/
  drasclr train --store store/ --atlas atlas.npz --out-dir runs/a
  drasclr features --checkpoint runs/a/checkpoint_last.pt --store store/ --out features.npz
  drasclr evaluate --features features.npz --clinical clinical.csv --store store/ --out report/

`drasclr demo` runs all of it on a built-in synthetic cohort."""

COMMANDS = {
    "demo": ("drasclr.cli.demo", "run the whole journey on a built-in synthetic cohort"),
    "synth": ("drasclr.cli.synth", "generate a synthetic chest-CT cohort"),
    "atlas": ("drasclr.cli.atlas", "build the landmark atlas from an atlas lung mask"),
    "preprocess": ("drasclr.cli.preprocess", "turn CT files into a landmark patch store"),
    "train": ("drasclr.cli.train", "MoCo pretraining of the DrasCLR encoder"),
    "features": ("drasclr.cli.features", "patch and subject features of an encoder on a patch store"),
    "evaluate": ("drasclr.cli.evaluate",
                 "the paper's subject-level evaluation: readout, survival, COVID severity, report"),
    "detect": ("drasclr.cli.detect", "emphysema subtype detection: linear probe and fine-tuning"),
    "densemap": ("drasclr.cli.densemap", "voxel-wise probability map of an emphysema subtype"),
    "ablate": ("drasclr.cli.ablate", "pretrain and evaluate variants that differ in one thing"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``drasclr train: error: argument
    --backend: invalid choice: ...``), exit code 2, like every other error of the command."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        # no abbreviations: a typo such as --epoch must fail, not set --epochs
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="drasclr", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    """Run one command and return its exit code: 0 done (or help shown), 1 failed (or some
    subjects failed, as the command reports), 2 bad usage or input, 130 interrupted. Every
    error is one line naming the command; ``--debug`` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args, unknown = build_parser(command if command in COMMANDS else None).parse_known_args(argv)
    except SystemExit as exit_:  # --help, --version (0) or a bad flag (2, one line printed)
        return int(exit_.code or 0)
    if unknown:  # after the command is known, so the line can name it
        print(f"drasclr {args.command}: error: unrecognized arguments: {' '.join(unknown)}",
              file=sys.stderr)
        return 2
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
