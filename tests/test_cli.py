"""The command-line layer: one line per failure, exit codes, --debug, --version, python -m."""
import errno
import subprocess
import sys

import pytest

from drasclr import __version__
from drasclr import cli


def fail_with(error):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize("error,code,expected", [
    (ValueError("store: bad\nthing"), 2, "drasclr atlas: error: store: bad thing"),
    (FileNotFoundError(errno.ENOENT, "No such file", "/data/x.nii"), 2,
     "drasclr atlas: error: [Errno 2] No such file: '/data/x.nii'"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/checkpoint_last.pt"), 1,
     "drasclr atlas: error: [Errno 28] No space left on device: '/runs/checkpoint_last.pt' "
     "(run with --debug for the traceback)"),
    (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), 1,
     "drasclr atlas: error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB "
     "(run with --debug for the traceback)"),
])
def test_every_failure_is_one_line_with_its_exit_code(monkeypatch, capsys, error, code, expected):
    from drasclr.data import atlas

    monkeypatch.setattr(atlas, "run", fail_with(error))
    assert cli.main(["atlas", "--mask", "m.nii.gz", "--out", "a.npz"]) == code
    err = capsys.readouterr().err
    assert err == expected + "\n"
    monkeypatch.setattr(atlas, "run", fail_with(error))
    with pytest.raises(type(error)):
        cli.main(["--debug", "atlas", "--mask", "m.nii.gz", "--out", "a.npz"])


def test_version_and_python_m(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"drasclr {__version__}"
    result = subprocess.run([sys.executable, "-m", "drasclr", "--help"], capture_output=True,
                            text=True, check=True)
    assert "evaluate" in result.stdout and "--debug" in result.stdout
