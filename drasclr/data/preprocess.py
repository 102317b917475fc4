"""The preprocessing pipeline: a cohort of CT files -> a landmark patch store, in parallel.

For every subject, ``drasclr.data.subject.process_subject`` reads, resamples, segments, registers
to the atlas and cuts one patch per landmark (Yu et al. 2023, Sections 2.1, 3, 4.1); this module
runs it over a cohort and records the results with ``drasclr.data.store``:

- ``workers`` fresh (spawned) processes, each loading the atlas once and giving ITK one
  thread, which makes the registration repeatable: a store does not depend on the number of
  workers or on where a run was interrupted. Each worker writes its own subject's patch file
  and manifest row (the manifest is locked), so no patch array travels between processes;
- ``shard=(i, n)`` keeps every n-th subject (0-based i) of the cohort sorted by subject id, so
  n machines or job-array tasks split one cohort without talking to each other;
- a re-run skips subjects whose row is ``done`` and whose patch file is intact; failed
  subjects are tried again; a done subject whose row lacks the density measures (a store made
  before they existed) gets only those: read, resample, segment and measure, its patches and
  transforms left as they are (``drasclr.data.subject.measure_density``);
- any exception of one subject becomes a ``failed`` row with its reason; the others go on;
- every file is written atomically, so an interrupted run (Ctrl-C, a killed job) leaves only
  complete files and resumes where it stopped.

``drasclr preprocess --images DIR|CSV --atlas ATLAS --out STORE [--workers N] [--shard i/n]``.
"""
from __future__ import annotations

import csv
import functools
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from drasclr.atomic import remove_stale_temporaries
from drasclr.data.atlas import Atlas
from drasclr.data.density import DENSITY_MEASURES
from drasclr.data.laterality import RIGHT_TO_LEFT, laterality_warning
from drasclr.data.lung_segmentation import SEGMENTATION_METHODS
from drasclr.data.registration import SCHEDULES
from drasclr.data.store import (
    DONE,
    FAILED,
    PatchStore,
    check_subject_id,
    create_store,
    sort_manifest,
    update_subject,
    write_lung_mask,
    write_subject,
)
from drasclr.ranges import AT_LEAST_ONE, COUNT, check_number
from drasclr.worker_exit import die_with_parent

#: Image files found in an ``images`` folder; every other (non-hidden) subfolder is a DICOM series.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: Outcomes of a density-only task: the measures added, or not (the subject stays done).
DENSITY_ADDED, DENSITY_FAILED = "density added", "density failed"


@dataclass(frozen=True)
class SubjectSource:
    """One subject of a cohort: its id (the patch file's name) and the file or folder to read."""

    subject_id: str
    source: str


@dataclass(frozen=True)
class Task:
    """One subject's work: full processing, or (``density_only``) only the density measures of
    a done subject of a store made before they existed."""

    subject: SubjectSource
    density_only: bool = False
    damaged: str = ""  # why a done subject is redone: its patch file changed or went missing


@dataclass(frozen=True)
class PreprocessSummary:
    """What one run did. ``skipped`` were already done; ``total`` is the shard's size;
    ``density_added`` / ``density_failed``: done subjects given (or not) the density measures
    they lacked; ``damaged``: done subjects whose patch file failed its check and were redone
    (counted in ``done`` or ``failed`` as well)."""

    store: Path
    total: int
    skipped: int
    done: int
    failed: int
    seconds: float
    density_added: int = 0
    density_failed: int = 0
    damaged: tuple[str, ...] = ()


def preprocess(
    images: str | Path,
    atlas_path: str | Path,
    out: str | Path,
    workers: int = 1,
    shard: str | tuple[int, int] | None = None,
    schedule: str = "fast",
    segmentation: str = "classical",
    progress: bool = True,
) -> PreprocessSummary:
    """Turn a cohort of CT files into a patch store at ``out`` (created or resumed).

    Args:
        images: a folder (every .nii/.nii.gz/.nrrd/.mha/.mhd file, every subfolder a DICOM
            series) or a CSV file with columns ``subject_id, path`` (relative paths are taken
            from the CSV's folder).
        atlas_path: an atlas file written by ``drasclr atlas`` / :meth:`Atlas.save`.
        out: the store folder.
        workers: worker processes, each with one ITK thread (one core).
        shard: ``"i/n"`` or ``(i, n)``: process only shard i (0-based) of n.
        schedule: the registration schedule, ``"fast"`` or ``"reference"``
            (docs/method.md#registration).
        segmentation: ``"classical"`` or ``"lungmask"``.
        progress: show a tqdm bar with done, failed and time left.

    Raises:
        ValueError / OSError: bad arguments, an unreadable cohort list or atlas, or a store made
            for another atlas. Problems of single subjects never raise: they become failed rows.
    """
    check_number("workers", workers, AT_LEAST_ONE)
    if shard is not None:
        parse_shard(shard)  # before the atlas and the cohort are read
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
    if segmentation not in SEGMENTATION_METHODS:
        raise ValueError(f"segmentation: expected one of {list(SEGMENTATION_METHODS)}, got {segmentation!r}")
    atlas = Atlas.load(atlas_path)
    subjects = select_shard(find_subjects(images), shard)
    root = Path(out)
    create_store(root, atlas, atlas_path)
    remove_stale_temporaries(root)  # of writers killed in an earlier run
    tasks = plan_tasks(root, subjects)
    skipped = len(subjects) - len(tasks)

    start = time.perf_counter()
    counts = {DONE: 0, FAILED: 0, DENSITY_ADDED: 0, DENSITY_FAILED: 0}
    run_one = functools.partial(
        run_task, root, str(Path(atlas_path).resolve()), schedule=schedule,
        segmentation=segmentation,
    )
    with tqdm(total=len(tasks), unit="subject", disable=not progress, dynamic_ncols=True) as bar:

        def show() -> None:
            density = counts[DENSITY_ADDED] + counts[DENSITY_FAILED]
            bar.set_postfix(done=counts[DONE], failed=counts[FAILED], skipped=skipped,
                            **({"density": density} if density else {}))

        def record(status: str) -> None:
            counts[status] += 1
            show()
            bar.update()

        show()
        _run_in_pool(run_one, tasks, root, workers, record)
    sort_manifest(root)
    return PreprocessSummary(
        store=root, total=len(subjects), skipped=skipped, done=counts[DONE],
        failed=counts[FAILED], seconds=time.perf_counter() - start,
        density_added=counts[DENSITY_ADDED], density_failed=counts[DENSITY_FAILED],
        damaged=tuple(task.subject.subject_id for task in tasks if task.damaged),
    )


def plan_tasks(root: Path, subjects: list[SubjectSource]) -> list[Task]:
    """What a run still has to do: full processing for subjects not finished (never run,
    failed, or with a damaged patch file), the density measures alone for finished subjects
    whose manifest row lacks any of them."""
    finished, damaged = finished_subjects(root)
    rows = {row["subject_id"]: row for row in PatchStore(root, verify=False).manifest}
    tasks = []
    for subject in subjects:
        if subject.subject_id not in finished:
            tasks.append(Task(subject, damaged=damaged.get(subject.subject_id, "")))
        elif any(rows[subject.subject_id].get(name) is None for name in DENSITY_MEASURES):
            tasks.append(Task(subject, density_only=True))
    return tasks


def run_task(root: Path, atlas_path: str, task: Task, *, schedule: str, segmentation: str) -> str:
    """Run one task in a worker process and record its outcome; returns the status."""
    if task.density_only:
        return measure_and_record(root, task.subject, segmentation=segmentation)
    return process_and_record(root, atlas_path, task.subject, schedule=schedule,
                              segmentation=segmentation)


def process_and_record(
    root: Path, atlas_path: str, subject: SubjectSource, *, schedule: str, segmentation: str
) -> str:
    """Process one subject and write its patches and manifest row; returns the status.

    Runs in a worker process. Every ``Exception`` becomes a failed row with its reason;
    ``KeyboardInterrupt`` is let through (nothing half-written is left: writes are atomic).
    """
    from drasclr.data import subject as subject_module  # heavy (ANTs); workers import it once

    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = subject_module.process_subject(
            subject.source, _load_atlas(atlas_path, os.stat(atlas_path).st_mtime_ns),
            schedule=schedule, segmentation=segmentation,
            transforms_dir=root / "transforms" / subject.subject_id,
        )
        # CPU seconds: the cost per core even on a busy machine (the worker has one ITK thread).
        write_lung_mask(root, subject.subject_id, result.lungs.labels, result.lungs.affine)
        quality = {**result.quality, "cpu_seconds": time.process_time() - cpu_start}
        write_subject(root, subject.subject_id, subject.source, result.patches, quality=quality,
                      seconds=time.perf_counter() - start,
                      warning=laterality_warning(quality.get(RIGHT_TO_LEFT)))
        return DONE
    except Exception as error:  # one bad subject must never stop the cohort
        write_subject(root, subject.subject_id, subject.source, error=failure_reason(error),
                      seconds=time.perf_counter() - start)
        return FAILED


def measure_and_record(root: Path, subject: SubjectSource, *, segmentation: str) -> str:
    """Add the density measures to a done subject's manifest row (one atomic manifest write);
    its patch file, transforms and other columns are left as they are.

    A failure leaves the subject done (its patches are good) and notes the reason in its row's
    error column; the measures stay empty, so the next run tries again.
    """
    from drasclr.data import subject as subject_module  # heavy (ANTs); workers import it once

    try:
        measures = subject_module.measure_density(subject.source, segmentation=segmentation)
    except Exception as error:  # one bad subject must never stop the cohort
        _record_density_failure(root, subject, failure_reason(error))
        return DENSITY_FAILED
    update_subject(root, subject.subject_id, measures)
    return DENSITY_ADDED


def _record_density_failure(root: Path, subject: SubjectSource, reason: str) -> None:
    update_subject(root, subject.subject_id, {}, error=f"density measures not added: {reason}")


def failure_reason(error: BaseException) -> str:
    """The manifest's error text: ValueErrors (bad input) carry their own message; other
    exceptions (bugs, crashes) are named by type as well."""
    message = str(error).strip()
    if isinstance(error, ValueError) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@functools.lru_cache(maxsize=1)
def _load_atlas(atlas_path: str, modified_ns: int) -> Atlas:
    """The atlas, loaded once per process (again only if the file was rewritten since)."""
    return Atlas.load(atlas_path)


def _init_worker(parent_pid: int) -> None:
    # One ITK thread per worker: the workers already share the cores, and one thread makes the
    # registration repeatable. ITK reads this when it first runs, which is after this point.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    die_with_parent(parent_pid)  # a killed run leaves no worker registering on


def _run_in_pool(run_one, tasks: list[Task], root: Path, workers: int, record) -> None:
    """Run ``run_one`` over ``tasks`` in ``workers`` fresh (spawned) processes.

    Spawned, not forked: a forked child would inherit an ITK already started (with its thread
    count) by the parent, and forking a process that holds threads is unsafe.
    """
    executor = ProcessPoolExecutor(
        max_workers=min(workers, max(len(tasks), 1)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )
    try:
        futures: dict[Future, Task] = {executor.submit(run_one, t): t for t in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                status = future.result()
            except BrokenProcessPool as error:  # a worker died (killed, out of memory)
                status = _record_crash(root, task, f"worker process died ({error}); re-run to retry")
            except Exception as error:  # the task could not even record its failure
                status = _record_crash(root, task, failure_reason(error))
            record(status)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _record_crash(root: Path, task: Task, reason: str) -> str:
    """Record a task whose worker could not record it; a density-only task's subject stays done."""
    if task.density_only:
        _record_density_failure(root, task.subject, reason)
        return DENSITY_FAILED
    write_subject(root, task.subject.subject_id, task.subject.source, error=reason)
    return FAILED


def finished_subjects(root: Path) -> tuple[set[str], dict[str, str]]:
    """(subjects whose manifest row is ``done`` and whose patch file is intact: present, of the
    right shape and matching its checksum; done subject -> why its file is not)."""
    store = PatchStore(root, max_open=1)  # each file is checked once, none kept open
    finished, damaged = set(), {}
    for index, subject_id in enumerate(store.subject_ids):
        try:
            store.subject_patches(index)
        except (OSError, ValueError) as error:
            damaged[subject_id] = str(error)
            continue
        finished.add(subject_id)
    return finished, damaged


def find_subjects(images: str | Path) -> list[SubjectSource]:
    """The cohort, sorted by subject id: a folder of images / DICOM series, or a CSV list.

    Raises:
        FileNotFoundError: ``images`` does not exist.
        ValueError: a CSV without ``subject_id`` and ``path`` columns, an empty cohort, or two
            subjects with the same id.
    """
    images = Path(images).expanduser().absolute()  # the manifest's sources work from any folder
    if not images.exists():
        raise FileNotFoundError(f"{images}: no such folder or CSV file")
    if images.is_dir():
        subjects = [
            SubjectSource(_subject_id_of(path), str(path))
            for path in images.iterdir()
            if not path.name.startswith(".")
            and (path.is_dir() or path.name.lower().endswith(IMAGE_SUFFIXES))
        ]
    else:
        subjects = _read_cohort_csv(images)
    if not subjects:
        raise ValueError(f"{images}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files, "
                         "DICOM series folders, or a CSV with subject_id,path)")
    ids = [s.subject_id for s in subjects]
    for subject_id in ids:
        check_subject_id(subject_id)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{images}: subject ids occur more than once: {', '.join(duplicates[:5])}")
    return sorted(subjects, key=lambda s: s.subject_id)


def _subject_id_of(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_cohort_csv(path: Path) -> list[SubjectSource]:
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            missing = {"subject_id", "path"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: cohort CSV lacks the column(s) {', '.join(sorted(missing))}")
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable cohort CSV ({error})") from error
    subjects = []
    for number, row in enumerate(rows, start=2):
        subject_id, source = (row["subject_id"] or "").strip(), (row["path"] or "").strip()
        if not subject_id or not source:
            raise ValueError(f"{path}: line {number} has an empty subject_id or path")
        subjects.append(SubjectSource(subject_id, str(path.parent / Path(source).expanduser())))
    return subjects


def parse_shard(shard: str | tuple[int, int]) -> tuple[int, int]:
    """``"i/n"`` or ``(i, n)`` -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in shard.split("/")) if isinstance(shard, str) else shard
    except (ValueError, TypeError):
        raise ValueError(f"shard: expected 'i/n' such as '0/4', got {shard!r}") from None
    check_number("shard", index, COUNT)
    check_number("shard", count, AT_LEAST_ONE)
    if not index < count:
        raise ValueError(f"shard: expected 0 <= i < n, got {index}/{count}")
    return index, count


def select_shard(subjects: list[SubjectSource], shard) -> list[SubjectSource]:
    """Every n-th subject, starting at i, of the subjects sorted by id (None: all)."""
    if shard is None:
        return subjects
    index, count = parse_shard(shard)
    return sorted(subjects, key=lambda s: s.subject_id)[index::count]
