"""The header every drasclr file carries: a format name and a version, checked on load."""
from __future__ import annotations

from pathlib import Path


def check_header(path: str | Path, header: object, file_format: str, version: int,
                 what: str) -> None:
    """Raise a ValueError naming ``path`` unless ``header`` is ``what`` in this format and version."""
    if not isinstance(header, dict) or header.get("format") != file_format:
        raise ValueError(f"{path}: not a drasclr {what}")
    if header.get("version") != version:
        raise ValueError(f"{path}: {what} version {header.get('version')!r}, expected {version}")
