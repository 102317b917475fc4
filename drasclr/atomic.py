"""Atomic file writes: a temporary file beside the destination, then ``os.replace``.

An interrupted job never leaves a truncated file under a final name, so anything found under
its final name is complete (the resumable jobs rely on that). A hard kill can leave the
temporary file itself; its name carries the writer's host and pid
(``.<name>~<host>~<pid>~<random><suffix>``), so the next run removes those of writers that
are gone (:func:`remove_stale_temporaries`) and never those of a live writer, such as another
shard writing into the same store.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` when the block succeeds.

    ``suffix`` lets writers that choose the format by file name (nibabel, ITK) see the right
    one. On any failure, interruption included, the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=suffix,
                                         prefix=f".{path.name}~{_HOST}~{os.getpid()}~")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; outputs are shared read-only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


_HOST = socket.gethostname().replace("~", "-")
_TEMPORARY = re.compile(r"^\..*~(?P<host>[^~/]+)~(?P<pid>\d+)~[^~]*$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files under ``folder`` (recursively) that writers on this host left
    when they were killed: their pid no longer runs. Returns the removed paths."""
    removed = []
    for path in Path(folder).rglob(".*~*~*~*"):
        match = _TEMPORARY.match(path.name)
        if not match or match["host"] != _HOST or not path.is_file():
            continue
        if _running(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
