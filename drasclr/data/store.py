"""The landmark patch store: one memory-mappable int16 file per subject plus a manifest.

Layout of a store folder ``root/``:

- ``store.json``: format version, patch size, number of landmarks, the atlas path and a
  checksum of the atlas corners (a store belongs to exactly one atlas);
- ``manifest.csv``: one row per subject: ``subject_id, source, status`` (``done`` or
  ``failed``), ``error``, ``seconds``, ``checksum`` (CRC-32 of the patch file's bytes, written
  with it), ``warning`` (a quality concern for a person to review, e.g. a header that likely
  contradicts the anatomy) and quality columns (e.g. ``dice``, ``lung_volume_ml``);
- ``patches/<subject_id>.npy``: (L, P, P, P) int16 HU in ``np.save`` format, so that
  ``np.load(mmap_mode="r")`` maps it without reading it (docs/method.md#patches: patches are stored
  as int16 HU and normalised on the fly);
- ``masks/<subject_id>_lung_mask.nii.gz``: the subject's lung segmentation (0 outside, 1 right,
  2 left) on the grid it was made on, with its RAS affine: opens over the scan in any NIfTI
  viewer, for quality control.

Every file is written atomically (temp file in the same folder, then ``os.replace``); the
patch file lands before its manifest row, so a row saying ``done`` always has its patches.
Manifest updates hold a lock file, so shards of one run may share a store folder.

Integrity: a patch file whose bytes changed after it was written (bit rot, a partial copy, a
stray write) no longer matches its manifest checksum. ``drasclr preprocess`` checks it before
skipping a done subject (and redoes a damaged one); :class:`PatchStore` checks each subject once,
when it first opens the file, and refuses a damaged one (ValueError naming subject and file), so
training and feature extraction never read damaged patches and the per-read path stays free of
the check. Stores written before the column existed still open; their files are not checked,
which :class:`PatchStore` says once.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import mmap
import warnings
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from drasclr.atomic import atomic_path, atomic_write_bytes
from drasclr.data.atlas import Atlas
from drasclr.file_format import check_header
from drasclr.intensity import HU_WINDOW

STORE_FORMAT = "drasclr-patch-store"
STORE_VERSION = 1
DONE, FAILED = "done", "failed"
#: Manifest columns always present, in this order; quality columns follow.
BASE_COLUMNS = ("subject_id", "source", "status", "error", "seconds")
#: Text columns written with every row since the checksum was introduced (older stores lack them).
CHECKSUM, WARNING = "checksum", "warning"
_TEXT_COLUMNS = ("subject_id", "source", "status", "error", CHECKSUM, WARNING)


def atlas_checksum(atlas: Atlas) -> str:
    """SHA-256 of the atlas corners (int64, little endian) and patch size."""
    digest = hashlib.sha256(np.ascontiguousarray(atlas.corners, dtype="<i8").tobytes())
    digest.update(str(atlas.patch_size).encode())
    return digest.hexdigest()


def create_store(root: str | Path, atlas: Atlas, atlas_path: str | Path) -> None:
    """Create the store folder for ``atlas``; a no-op when it already exists for that atlas.

    Raises:
        ValueError: ``root`` holds a store made for a different atlas, or a foreign store.json.
    """
    root = Path(root)
    config = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "patch_size": atlas.patch_size,
        "num_landmarks": atlas.num_landmarks,
        "atlas": str(Path(atlas_path).resolve()),
        "atlas_checksum": atlas_checksum(atlas),
    }
    if (root / "store.json").exists():
        existing = read_store_config(root)
        if existing["atlas_checksum"] != config["atlas_checksum"]:
            raise ValueError(
                f"{root}: this store was made for another atlas ({existing['atlas']}, "
                f"{existing['num_landmarks']} landmarks); use a new --out folder"
            )
    (root / "patches").mkdir(parents=True, exist_ok=True)
    if not (root / "store.json").exists():
        atomic_write_bytes(root / "store.json", json.dumps(config, indent=2).encode())
    with _manifest_lock(root):
        if not (root / "manifest.csv").exists():
            _write_manifest_rows(root, [])


def read_store_config(root: str | Path) -> dict:
    """The contents of ``root/store.json``, checked; clear errors when missing or foreign."""
    root = Path(root)
    path = root / "store.json"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such patch store folder")
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a patch store (no store.json; run `drasclr preprocess`)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: garbled store.json ({error})") from error
    check_header(path, config, STORE_FORMAT, STORE_VERSION, "patch store file")
    return config


def write_subject(
    root: str | Path,
    subject_id: str,
    source: str,
    patches: np.ndarray | None = None,
    quality: Mapping[str, float] | None = None,
    error: str | None = None,
    seconds: float | None = None,
    warning: str = "",
) -> None:
    """Record one subject: its patch file (atomic) first, then its manifest row (atomic) with
    the file's checksum.

    With ``patches`` the row is ``done``; with ``patches=None`` and an ``error`` it is
    ``failed`` (a stale patch file and lung mask of an earlier run are removed so they cannot
    be mistaken for this run's). Writing a subject again replaces its row. ``warning``: a quality concern that
    does not fail the subject (one line in the ``warning`` column).

    Raises:
        ValueError: patches of the wrong shape or dtype, or with values outside the stored HU
            window (a patch cut from an unclipped image would train on out-of-range input).
    """
    root = Path(root)
    config = read_store_config(root)
    check_subject_id(subject_id)
    if (patches is None) == (error is None):
        raise ValueError(
            f"{subject_id}: give either patches (done) or error (failed), not both or neither"
        )
    clashing = set(quality or ()) & set(BASE_COLUMNS)
    if clashing:
        raise ValueError(f"{subject_id}: quality names {sorted(clashing)} clash with manifest columns")
    path = patch_path(root, subject_id)
    if patches is not None:
        expected = (config["num_landmarks"],) + (config["patch_size"],) * 3
        if patches.shape != expected or patches.dtype != np.int16:
            raise ValueError(
                f"{subject_id}: patches must be int16 of shape {expected}, got "
                f"{patches.dtype} {patches.shape}"
            )
        low, high = int(patches.min(initial=0)), int(patches.max(initial=0))
        if low < HU_WINDOW[0] or high > HU_WINDOW[1]:
            raise ValueError(
                f"{subject_id}: patch values span [{low}, {high}] HU, outside the stored window "
                f"[{HU_WINDOW[0]:g}, {HU_WINDOW[1]:g}]"
            )
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(patches))
        data = buffer.getvalue()
        atomic_write_bytes(path, data)
    row = {
        "subject_id": subject_id,
        "source": str(source),
        "status": DONE if patches is not None else FAILED,
        "error": "" if error is None else " ".join(str(error).split()),  # one line per row
        "seconds": "" if seconds is None else f"{seconds:.2f}",
        CHECKSUM: file_checksum(data) if patches is not None else "",
        WARNING: " ".join(str(warning).split()),
    }
    row.update(_quality_columns(quality or {}))
    with _manifest_lock(root):
        rows = {r["subject_id"]: r for r in _read_manifest_rows(root)}
        rows[subject_id] = row
        _write_manifest_rows(root, list(rows.values()))
    if patches is None:
        path.unlink(missing_ok=True)
        lung_mask_path(root, subject_id).unlink(missing_ok=True)


def update_subject(root: str | Path, subject_id: str, quality: Mapping[str, float],
                   error: str = "") -> None:
    """Set quality columns and the error text of a subject's existing manifest row (one atomic
    manifest write); its status, patch file and other columns stay as they are.

    Used to add measures to a store made before they existed, without redoing the subject.

    Raises:
        ValueError: the subject has no row, or a quality name is a base column.
    """
    root = Path(root)
    clashing = set(quality) & set(BASE_COLUMNS)
    if clashing:
        raise ValueError(f"{subject_id}: quality names {sorted(clashing)} clash with manifest columns")
    with _manifest_lock(root):
        rows = _read_manifest_rows(root)
        row = next((r for r in rows if r["subject_id"] == subject_id), None)
        if row is None:
            raise ValueError(f"{root / 'manifest.csv'}: no row for subject {subject_id!r}")
        row.update(_quality_columns(quality), error=" ".join(str(error).split()))
        _write_manifest_rows(root, rows)


def _quality_columns(quality: Mapping[str, float]) -> dict[str, str]:
    return {name: f"{float(value):.6g}" for name, value in quality.items()}


def sort_manifest(root: str | Path) -> None:
    """Order the manifest's rows by subject id, so that subject indices do not depend on the
    order in which parallel workers finished."""
    root = Path(root)
    with _manifest_lock(root):
        rows = _read_manifest_rows(root)
        _write_manifest_rows(root, sorted(rows, key=lambda row: row["subject_id"]))


def file_checksum(data) -> str:
    """CRC-32 of a file's bytes as 8 hex digits: catches changed bytes (not tampering) at
    memory speed (benchmarks/bench_integrity.py)."""
    return f"{zlib.crc32(data):08x}"


def verify_patch_file(path: Path, subject_id: str, expected: str) -> None:
    """Raise ValueError naming the subject and file when the file's bytes no longer match the
    checksum recorded when it was written."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            actual = file_checksum(data)  # mapped, not copied: one pass over the page cache
    except (OSError, ValueError) as error:  # ValueError: an empty file cannot be mapped
        reason = getattr(error, "strerror", None) or error
        raise ValueError(f"{path}: subject {subject_id!r}: patch file unreadable ({reason})"
                         ) from error
    if actual != expected:
        raise ValueError(
            f"{path}: subject {subject_id!r}: patch file damaged (its bytes changed after it was "
            f"written: checksum {actual}, manifest says {expected}); run `drasclr preprocess` "
            "on the store again to redo it"
        )


def patch_path(root: str | Path, subject_id: str) -> Path:
    return Path(root) / "patches" / f"{subject_id}.npy"


def lung_mask_path(root: str | Path, subject_id: str) -> Path:
    """Where the store keeps a subject's lung segmentation (a NIfTI label image)."""
    return Path(root) / "masks" / f"{subject_id}_lung_mask.nii.gz"


def write_lung_mask(root: str | Path, subject_id: str, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write a subject's lung labels (uint8, RAS affine) to :func:`lung_mask_path`, atomically."""
    import nibabel as nib

    check_subject_id(subject_id)
    path = lung_mask_path(root, subject_id)
    with atomic_path(path, ".nii.gz") as temporary:
        nib.save(nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), np.asarray(affine, float)),
                 str(temporary))
    return path


def check_patch_file(path: Path, num_landmarks: int, patch_size: int) -> np.ndarray:
    """Memory-map a subject's patch file, checking its shape and dtype.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not an .npy file of int16 (L, P, P, P) or is shorter than its header says.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: patch file missing")
    try:
        patches = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # a truncated file fails when mapped
        raise ValueError(f"{path}: unreadable or truncated patch file ({error})") from error
    expected = (num_landmarks,) + (patch_size,) * 3
    if patches.shape != expected or patches.dtype != np.int16:
        raise ValueError(
            f"{path}: expected int16 patches of shape {expected}, got {patches.dtype} {patches.shape}"
        )
    return patches


class PatchStore:
    """Read access to a patch store: the manifest and (subject, landmark) patches.

    Subjects are the manifest's ``done`` rows, in manifest order; subject index ``i`` refers
    to ``subject_ids[i]``. Patch files are memory-mapped on first use and kept open, the
    ``max_open`` most recently used of them: each map holds a file descriptor, and a cohort
    of thousands of subjects would exhaust the process's limit. With ``verify`` (the default)
    a subject's file is checked against its manifest checksum the first time it is opened
    (once per subject and ``PatchStore`` object, not per read).
    """

    def __init__(self, root: str | Path, max_open: int = 512, verify: bool = True) -> None:
        if int(max_open) != max_open or max_open < 1:
            raise ValueError(f"max_open: expected a positive integer, got {max_open!r}")
        self.root = Path(root)
        self.config = read_store_config(self.root)
        rows = _read_manifest_rows(self.root)
        self.manifest: list[dict] = _parse_rows(self.root / "manifest.csv", rows)
        self.subject_ids: list[str] = [r["subject_id"] for r in self.manifest if r["status"] == DONE]
        self.max_open = int(max_open)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()  # least recently used first
        self.verify = verify
        self._verified: set[int] = set()
        done = [r for r in self.manifest if r["status"] == DONE]
        self._checksums = [r.get(CHECKSUM) or "" for r in done]
        if verify and any(not c for c in self._checksums):
            warnings.warn(f"{self.root / 'manifest.csv'}: written before patch checksums; its "
                          "patch files cannot be checked for damage (re-run `drasclr preprocess` "
                          "into a new folder to add them)", stacklevel=2)

    @property
    def num_subjects(self) -> int:
        return len(self.subject_ids)

    @property
    def num_landmarks(self) -> int:
        return int(self.config["num_landmarks"])

    @property
    def patch_size(self) -> int:
        return int(self.config["patch_size"])

    def atlas(self) -> Atlas:
        """The atlas this store was cut with, found from its ``store.json`` record.

        Raises:
            FileNotFoundError: the atlas file recorded there is gone.
            ValueError: the file there now is another atlas (landmarks differ).
        """
        path = Path(self.config["atlas"])
        record = self.root / "store.json"
        if not path.is_file():
            raise FileNotFoundError(f"{record}: the store's atlas {path} is gone; put the atlas "
                                    "the store was cut with back there")
        atlas = Atlas.load(path)
        if (atlas.num_landmarks != self.num_landmarks
                or atlas_checksum(atlas) != self.config["atlas_checksum"]):
            raise ValueError(f"{record}: the atlas at {path} ({atlas.num_landmarks} landmarks) is "
                             f"not the one the store was cut with ({self.num_landmarks} landmarks)")
        return atlas

    def verify_all(self) -> None:
        """Check every subject not yet checked against its manifest checksum (ValueError naming
        the first damaged subject and file). A job that reads every subject (training) calls
        this before its first step, so a damaged file stops it before any work, in the main
        process, and its DataLoader workers inherit the subjects as checked."""
        for index, subject_id in enumerate(self.subject_ids):
            if self.verify and index not in self._verified and self._checksums[index]:
                verify_patch_file(patch_path(self.root, subject_id), subject_id,
                                  self._checksums[index])
                self._verified.add(index)

    def subject_patches(self, index: int) -> np.ndarray:
        """(L, P, P, P) int16 read-only memory map of subject ``index``'s patches."""
        if not 0 <= index < self.num_subjects:
            raise IndexError(f"subject index {index} out of range for {self.num_subjects} subjects")
        if index in self._open:
            self._open.move_to_end(index)
        else:
            path = patch_path(self.root, self.subject_ids[index])
            if self.verify and index not in self._verified and self._checksums[index]:
                verify_patch_file(path, self.subject_ids[index], self._checksums[index])
                self._verified.add(index)
            self._open[index] = check_patch_file(path, self.num_landmarks, self.patch_size)
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return self._open[index]

    def gather(self, subject_index, landmark_index) -> np.ndarray:
        """(N, P, P, P) int16 patches for N (subject, landmark) index pairs.

        One fancy-indexed read per distinct subject, not one per patch.
        """
        subjects, landmarks = np.broadcast_arrays(
            np.asarray(subject_index, dtype=np.int64), np.asarray(landmark_index, dtype=np.int64)
        )
        subjects, landmarks = subjects.ravel(), landmarks.ravel()
        if landmarks.size and (landmarks.min() < 0 or landmarks.max() >= self.num_landmarks):
            raise IndexError(f"landmark index out of range 0..{self.num_landmarks - 1}")
        out = np.empty((subjects.size,) + (self.patch_size,) * 3, dtype=np.int16)
        order = np.argsort(subjects, kind="stable")
        unique, starts = np.unique(subjects[order], return_index=True)
        for subject, rows in zip(unique, np.split(order, starts[1:])):
            out[rows] = self.subject_patches(int(subject))[landmarks[rows]]
        return out


def check_subject_id(subject_id: str) -> None:
    """Subject ids name patch files: no path separators, no CSV-breaking characters."""
    if not subject_id or subject_id.startswith(".") or any(c in subject_id for c in '/\\\n,"'):
        raise ValueError(
            f"subject id {subject_id!r}: must be a non-empty file name without / \\ , \" or newline"
        )


@contextmanager
def _manifest_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on the manifest across processes (and machines sharing the folder)."""
    with open(root / ".manifest.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest_rows(root: Path) -> list[dict]:
    path = root / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: manifest missing (was the store made by `drasclr preprocess`?)"
        )
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            if reader.fieldnames is None or tuple(reader.fieldnames[:3]) != BASE_COLUMNS[:3]:
                raise ValueError(f"header {reader.fieldnames} does not start with {BASE_COLUMNS[:3]}")
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: garbled manifest ({error})") from error
    for number, row in enumerate(rows, start=2):
        if None in row or row["status"] not in (DONE, FAILED):
            raise ValueError(f"{path}: garbled manifest at line {number}")
    return rows


def _write_manifest_rows(root: Path, rows: list[dict]) -> None:
    columns = list(BASE_COLUMNS)
    for row in rows:
        columns += [name for name in row if name not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(root / "manifest.csv", buffer.getvalue().encode())


def _parse_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Text columns stay strings; the others become floats (None where empty)."""
    try:
        return [
            {name: value if name in _TEXT_COLUMNS else (float(value) if value else None)
             for name, value in row.items()}
            for row in rows
        ]
    except ValueError as error:
        raise ValueError(f"{path}: garbled manifest, a numeric column holds text ({error})") from error
