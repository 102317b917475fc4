"""The subject-level evaluation's inputs, aligned by subject id and checked before any fitting.

Three sources meet here: feature sets (``drasclr features``), several files of one method
being its pretraining seeds; the density measures that preprocessing wrote to the patch store's
manifest (the baselines of every table, whole-lung and regional LAA-950); and the clinical
table (one row per subject; the synthetic cohort's ``clinical.csv`` has every column used
here). Beside the tasks, the clinical table may give two kinds of control: the true lesion
shares (``*_true`` columns of a synthetic cohort: the ceiling of what an image can tell) and the
scanner (``site``, ``kernel``: what a representation should not tell). The tasks are those
of Yu et al. 2023, Tables 2 to 4; which of them a table supports is read from its columns
(``covid_grade`` present: a COVID-19 cohort, else COPD).

Every problem found is a ValueError of one line naming the file and the problem, raised by
:func:`load_cohort` before any model is fitted.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from drasclr.data.density import COPD_DENSITY, COVID_DENSITY, DENSITY_MEASURES, REGIONAL_LAA950
from drasclr.data.store import DONE, PatchStore
from drasclr.features import FeatureSet

COPD, COVID = "copd", "covid"
#: Confounders of the survival model (Yu et al. 2023, Table 3), clinical table columns.
CONFOUNDERS = ("age", "sex", "race", "smoking_status", "pack_years")
#: Clinical columns of the true lesion shares end so (the synthetic cohorts' image truths),
#: except those of the acquisition: the depth of the breath is not a lesion.
TRUTH_SUFFIX = "_true"
ACQUISITION_TRUTHS = ("inspiration_true",)
#: Scanner columns: what a representation of the lungs should not predict.
SCANNER_COLUMNS = ("site", "kernel")


@dataclass(frozen=True)
class Task:
    """One prediction target: a clinical column and how it is read out.

    ``kind`` is ``regression`` (R^2), ``ordinal`` (accuracy and 1-off accuracy over
    ``grades``), ``nominal`` (accuracy), ``binary`` (accuracy and AUC) or ``survival``.
    """

    key: str
    title: str
    column: str
    kind: str
    log: bool = False
    grades: tuple[int, ...] = ()


TASKS = {task.key: task for task in (
    Task("log_fev1pp", "log FEV1pp", "fev1pp", "regression", log=True),
    Task("log_fev1_fvc", "log FEV1/FVC", "fev1_fvc", "regression", log=True),
    Task("gold", "GOLD", "gold", "ordinal", grades=(0, 1, 2, 3, 4)),
    Task("cle", "CLE", "cle_score", "ordinal", grades=(0, 1, 2, 3, 4, 5)),
    Task("paraseptal", "Para-septal", "paraseptal_score", "ordinal", grades=(0, 1, 2)),
    Task("exacerbation", "Exacerbation", "exacerbation", "binary", grades=(0, 1)),
    Task("survival", "Survival", "survival_time", "survival"),
    Task("covid_grade", "COVID-19 severity", "covid_grade", "ordinal", grades=(0, 1, 2, 3, 4)),
)}
KIND_TASKS = {COPD: ("log_fev1pp", "log_fev1_fvc", "gold", "cle", "paraseptal", "exacerbation",
                     "survival"),
              COVID: ("covid_grade",)}
#: Columns a task needs besides its label column.
_EXTRA_COLUMNS = {"survival": ("death", *CONFOUNDERS, "fev1pp", "gold")}


@dataclass
class Labels:
    """A readout task's subjects (``index`` into the cohort's rows) and labels."""

    task: Task
    index: np.ndarray
    y: np.ndarray
    note: str = ""


@dataclass
class SurvivalData:
    """The survival task's outcome, confounders and spirometry, for every subject of the cohort.

    ``confounders``: age, sex, race, former smoker, current smoker, pack-years (smoking status
    as two indicators, never smokers the reference). ``spirometry``: FEV1pp, GOLD stage with
    PRISm as 0, and a PRISm indicator (the paper's clinical comparison).
    """

    time: np.ndarray
    event: np.ndarray
    confounders: np.ndarray
    spirometry: np.ndarray


@dataclass
class Cohort:
    """Everything the evaluation fits on, row i of every array for ``subject_ids[i]``.

    ``features``: method name -> one (N, D) array per pretraining seed (its files in
    ``feature_files``). ``regional``: LAA-950 by zone and depth (COPD; None for COVID-19).
    ``truth``: the clinical table's true lesion shares (None without ``*_true`` columns).
    ``scanner``: labels of the scanner columns present (site, kernel).
    """

    kind: str
    subject_ids: list[str]
    features: dict[str, list[np.ndarray]]
    feature_files: dict[str, list[str]]
    density: np.ndarray
    density_columns: tuple[str, ...]
    labels: dict[str, Labels]
    survival: SurvivalData | None
    clinical_path: Path
    store_path: Path
    notes: list[str] = field(default_factory=list)
    regional: np.ndarray | None = None
    truth: np.ndarray | None = None
    truth_columns: tuple[str, ...] = ()
    scanner: dict[str, Labels] = field(default_factory=dict)


FeatureSource = str | Path | FeatureSet
Features = Mapping[str, Sequence[FeatureSource]] | Sequence[FeatureSource] | FeatureSource


def load_cohort(features: Features, clinical: str | Path, store: str | Path, *, folds: int = 5,
                tasks: Sequence[str] | None = None) -> Cohort:
    """Load and align the three sources and check every task's labels.

    Args:
        features: features files or :class:`FeatureSet` objects, all of the same subjects:
            a mapping method name -> its files (one per pretraining seed), or a sequence in
            which the files of one ``name`` are that method's seeds. Each method is a row of
            the tables.
        clinical: the clinical table (CSV with a ``subject_id`` column).
        store: the patch store whose manifest holds the density measures.
        folds: the cross-validation folds (every task needs at least this many subjects).
        tasks: task keys of :data:`TASKS`; by default every task the table has columns for.
    Raises:
        ValueError: one line naming the file and the problem (see the module docstring).
    """
    if folds < 2:
        raise ValueError(f"folds: need at least 2 cross-validation folds, got {folds}")
    sets, files = _load_feature_sets(features)
    first = files[next(iter(files))][0]
    subject_ids = list(next(iter(sets.values()))[0].subject_ids)
    clinical_path = Path(clinical)
    table = load_clinical(clinical_path)
    kind = COVID if "covid_grade" in table.columns else COPD
    notes: list[str] = []
    table = _rows_of(table, subject_ids, first, notes)

    density_columns = COVID_DENSITY if kind == COVID else COPD_DENSITY
    measures = _read_density(Path(store), subject_ids,
                             density_columns + (REGIONAL_LAA950 if kind == COPD else ()), first)
    density, regional = measures[:, :len(density_columns)], measures[:, len(density_columns):]
    truth_columns = tuple(c for c in table.columns
                          if c.endswith(TRUTH_SUFFIX) and c not in ACQUISITION_TRUTHS)
    truth = (np.column_stack([_numeric(table, c, clinical_path) for c in truth_columns])
             if truth_columns else None)
    if truth is None:
        notes.append(f"No ceiling row: {clinical_path.name} has no true lesion shares "
                     f"(*{TRUTH_SUFFIX} columns).")
    scanner = _scanner_labels(table, clinical_path, folds, notes)

    keys = _choose_tasks(kind, table, clinical_path, tasks, notes)
    labels = {k: _labels(TASKS[k], table, clinical_path, folds)
              for k in keys if TASKS[k].kind != "survival"}
    survival = (_survival_data(table, clinical_path, folds) if "survival" in keys else None)
    return Cohort(kind, subject_ids,
                  {name: [np.asarray(s.features, np.float64) for s in seeds]
                   for name, seeds in sets.items()},
                  files, density, density_columns, labels, survival, clinical_path, Path(store),
                  notes, regional if kind == COPD else None, truth, truth_columns, scanner)


def density_label(column: str) -> str:
    """The short name of a density measure: 'LAA-950' for ``laa950_percent``."""
    return DENSITY_MEASURES[column].split(" (")[0]


def _few(names: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(str(n) for n in list(names)[:count])
    return shown + (", ..." if len(names) > count else "")


def _load_feature_set(item: FeatureSource) -> tuple[FeatureSet, str]:
    """One feature set and the name of its source for messages."""
    if not isinstance(item, FeatureSet):
        return FeatureSet.load(item), str(item)
    source = f"feature set '{item.name}'"
    bad = ~np.isfinite(np.asarray(item.features, dtype=np.float64)).all(axis=1)
    if bad.any():
        raise ValueError(f"{source}: non-finite features for {int(bad.sum())} "
                         f"subject(s): {_few(np.asarray(item.subject_ids)[bad])}")
    return item, source


def _load_feature_sets(features: Features
                       ) -> tuple[dict[str, list[FeatureSet]], dict[str, list[str]]]:
    """Method name -> its feature sets (seeds) and their sources, all aligned to the subject
    order of the first."""
    if isinstance(features, Mapping):
        named = [(str(name), item) for name, items in features.items()
                 for item in ([items] if isinstance(items, (str, Path, FeatureSet)) else items)]
    else:
        items = [features] if isinstance(features, (str, Path, FeatureSet)) else list(features)
        named = [(None, item) for item in items]
    if not named:
        raise ValueError("features: give at least one features file")
    sets: dict[str, list[FeatureSet]] = {}
    files: dict[str, list[str]] = {}
    for name, item in named:
        feature_set, source = _load_feature_set(item)
        name = feature_set.name if name is None else name
        if source in files.get(name, ()):
            raise ValueError(f"{source}: given twice for '{name}'")
        sets.setdefault(name, []).append(feature_set)
        files.setdefault(name, []).append(source)
    first_name = next(iter(sets))
    reference, first = sets[first_name][0].subject_ids, files[first_name][0]
    for name, seeds in sets.items():
        for i, (feature_set, source) in enumerate(zip(seeds, files[name])):
            if set(feature_set.subject_ids) != set(reference):
                only = sorted(set(feature_set.subject_ids) ^ set(reference))
                raise ValueError(f"{source}: not the subjects of {first} ({len(only)} in only "
                                 f"one of them: {_few(only)}); extract both from one store")
            order = {s: j for j, s in enumerate(feature_set.subject_ids)}
            rows = np.array([order[s] for s in reference])
            seeds[i] = FeatureSet(list(reference), np.asarray(feature_set.features)[rows],
                                  feature_set.metadata)
        for i in range(len(seeds)):
            for j in range(i):
                if np.array_equal(seeds[i].features, seeds[j].features):
                    raise ValueError(f"{files[name][i]}: the same features as {files[name][j]} "
                                     f"(one pretraining seed given twice for '{name}'?)")
    return sets, files


def load_clinical(path: str | Path) -> pd.DataFrame:
    """The clinical table indexed by subject id (its path in ``attrs["path"]``), checked for
    a ``subject_id`` column without repeats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such clinical table")
    try:
        table = pd.read_csv(path, dtype={"subject_id": str})
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable CSV table ({error})") from error
    if "subject_id" not in table.columns:
        raise ValueError(f"{path}: no subject_id column (columns: {_few(list(table.columns))})")
    duplicated = table["subject_id"][table["subject_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: subject ids occur more than once ({_few(duplicated)})")
    table = table.set_index("subject_id")
    table.attrs["path"] = str(path)
    return table


def task_labels(clinical: pd.DataFrame, subject_ids: Sequence[str], tasks: Sequence[str], *,
                folds: int = 5, source: str = "the features") -> dict[str, Labels]:
    """Checked labels of readout ``tasks`` for ``subject_ids`` (``Labels.index`` indexes
    ``subject_ids``); ``clinical`` from :func:`load_clinical`, ``source`` names the subjects'
    file in messages."""
    path = Path(clinical.attrs.get("path", "clinical table"))
    table = _rows_of(clinical, list(subject_ids), source, [])
    unknown = [k for k in tasks if k not in TASKS or TASKS[k].kind == "survival"]
    if unknown:
        raise ValueError(f"tasks: {', '.join(unknown)} not readout tasks; choose from "
                         f"{', '.join(k for k, t in TASKS.items() if t.kind != 'survival')}")
    keys = _choose_tasks(COPD, table, path, tasks, [])
    return {k: _labels(TASKS[k], table, path, folds) for k in keys}


def _rows_of(table: pd.DataFrame, subject_ids: list[str], source: str,
             notes: list[str]) -> pd.DataFrame:
    """The rows of ``subject_ids`` in their order; every one must be there."""
    path = table.attrs.get("path", "clinical table")
    missing = [s for s in subject_ids if s not in table.index]
    if missing:
        raise ValueError(f"{path}: no rows for {len(missing)} of the {len(subject_ids)} "
                         f"subjects of {source} ({_few(missing)})")
    known = set(subject_ids)
    extra = [s for s in table.index if s not in known]
    if extra:
        notes.append(f"{len(extra)} subjects of {Path(path).name} have no features and are "
                     f"left out ({_few(extra)}).")
    return table.loc[subject_ids]


def _read_density(store: Path, subject_ids: list[str], columns: Sequence[str],
                  features_file: str) -> np.ndarray:
    """(N, len(columns)) density measures of ``subject_ids`` from the store's manifest."""
    manifest = store / "manifest.csv"
    rows = {r["subject_id"]: r for r in PatchStore(store).manifest if r["status"] == DONE}
    present = set().union(*(r.keys() for r in rows.values())) if rows else set()
    if not set(columns) <= present:
        names = ", ".join(density_label(c) for c in DENSITY_MEASURES)
        raise ValueError(f"{manifest} has no density measures ({names}): run `drasclr "
                         f"preprocess` again with the same arguments to add them; patches are kept")
    absent = [s for s in subject_ids if s not in rows]
    if absent:
        raise ValueError(f"{manifest}: {len(absent)} subjects of {features_file} are not done "
                         f"in this store ({_few(absent)}); is it the store the features came from?")
    values = np.array([[np.nan if rows[s].get(c) is None else rows[s][c] for c in columns]
                       for s in subject_ids], dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ValueError(f"{manifest}: density measures missing for {int(bad.sum())} subjects "
                         f"({_few(np.asarray(subject_ids)[bad])}): run `drasclr preprocess` again "
                         f"with the same arguments to add them; patches are kept")
    return values


def _choose_tasks(kind: str, table: pd.DataFrame, path: Path, tasks: Sequence[str] | None,
                  notes: list[str]) -> list[str]:
    """The requested tasks (each must have its columns) or every task the table supports."""
    def absent(key: str) -> list[str]:
        needed = (TASKS[key].column, *_EXTRA_COLUMNS.get(key, ()))
        return [c for c in needed if c not in table.columns]

    if tasks is None:
        keys = [k for k in KIND_TASKS[kind] if not absent(k)]
        notes += [f"{TASKS[k].title} not evaluated: {path.name} has no column "
                  f"{', '.join(absent(k))}." for k in KIND_TASKS[kind] if absent(k)]
        if not keys:
            raise ValueError(f"{path}: no column of any {kind} task "
                             f"({', '.join(TASKS[k].column for k in KIND_TASKS[kind])})")
        return keys
    unknown = [k for k in tasks if k not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    for key in tasks:
        if absent(key):
            raise ValueError(f"{path}: task {key} needs column {', '.join(absent(key))}, "
                             f"absent from the table")
    return list(dict.fromkeys(tasks))


def _numeric(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """A column as floats; non-numeric, missing or infinite values are an error."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        names = _few(table.index[bad].tolist())
        raise ValueError(f"{path}: column {column} has missing, non-numeric or non-finite "
                         f"values for {int(bad.sum())} subjects ({names})")
    return values


def _scanner_labels(table: pd.DataFrame, path: Path, folds: int,
                    notes: list[str]) -> dict[str, Labels]:
    """Labels of the scanner columns present and usable; a note for each one that is not."""
    labels = {}
    for column in SCANNER_COLUMNS:
        if column not in table.columns:
            notes.append(f"No {column} readout: {path.name} has no {column} column.")
            continue
        values = _numeric(table, column, path)
        grades = tuple(int(v) for v in np.unique(values))
        task = (Task(column, column.capitalize(), column, "binary", grades=grades)
                if len(grades) == 2 else
                Task(column, column.capitalize(), column, "nominal", grades=grades))
        try:
            labels[column] = _labels(task, table, path, folds)
        except ValueError as error:
            notes.append(f"No {column} readout: {error}.")
    return labels


def _check_count(n: int, folds: int, what: str, path: Path) -> None:
    if n < folds:
        raise ValueError(f"{path}: {what} has {n} subjects, fewer than the {folds} folds")


def _labels(task: Task, table: pd.DataFrame, path: Path, folds: int) -> Labels:
    values = _numeric(table, task.column, path)
    keep, note = np.ones(len(values), dtype=bool), ""
    if task.key == "gold":
        # PRISm (preserved ratio, impaired spirometry) has no GOLD stage (Yu et al. 2023, Fig. 4).
        keep = values != -1
        note = f"{int((~keep).sum())} PRISm subjects left out of GOLD."
    values = values[keep]
    _check_count(len(values), folds, f"task {task.key} (column {task.column})", path)
    if np.ptp(values) == 0:
        raise ValueError(f"{path}: column {task.column} is constant ({values[0]:g}) over its "
                         f"{len(values)} subjects; task {task.key} cannot be evaluated")
    if task.log:
        if (values <= 0).any():
            raise ValueError(f"{path}: column {task.column} has values <= 0, no logarithm")
        values = np.log(values)
    if task.grades:
        outside = sorted(set(values) - set(task.grades))
        if outside:
            shown = _few([f"{v:g}" for v in outside])
            raise ValueError(f"{path}: column {task.column} holds values outside "
                             f"{task.grades[0]}-{task.grades[-1]} ({shown})")
        values = values.astype(np.int64)
        counts = np.bincount(values - min(task.grades))
        counts = counts[counts > 0]
        smallest = counts.min() if task.kind == "binary" else counts.max()
        if smallest < folds:
            # Stratified folds need a class in every fold (binary: both, for the AUC).
            which = "its rarer class" if task.kind == "binary" else "its largest grade"
            raise ValueError(f"{path}: column {task.column}: {which} has {smallest} subjects, "
                             f"fewer than the {folds} folds")
    return Labels(task, np.flatnonzero(keep), values, note)


def _survival_data(table: pd.DataFrame, path: Path, folds: int) -> SurvivalData:
    time = _numeric(table, "survival_time", path)
    event = _numeric(table, "death", path)
    _check_count(len(time), folds, "task survival", path)
    if (time <= 0).any():
        raise ValueError(f"{path}: column survival_time has values <= 0")
    if not np.isin(event, (0, 1)).all():
        raise ValueError(f"{path}: column death holds values other than 0 and 1")
    if event.sum() < folds:
        raise ValueError(f"{path}: column death has {int(event.sum())} deaths, fewer than the "
                         f"{folds} folds; survival cannot be evaluated")
    age, sex, race, smoking, pack_years = (_numeric(table, c, path) for c in CONFOUNDERS)
    confounders = np.column_stack([age, sex, race, smoking == 1, smoking == 2, pack_years])
    gold = _numeric(table, "gold", path)
    spirometry = np.column_stack([_numeric(table, "fev1pp", path), np.where(gold == -1, 0, gold),
                                  gold == -1])
    return SurvivalData(time, event.astype(bool),
                        confounders.astype(np.float64), spirometry.astype(np.float64))
