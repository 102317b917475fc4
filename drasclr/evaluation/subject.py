"""The subject-level evaluation of Yu et al. 2023 (Tables 2 to 4), end to end: readout of
lung function, emphysema scores and exacerbations, survival, or COVID-19 severity, for one or
more methods (each over its pretraining seeds) beside the density measures, with control and
ceiling rows (regional LAA-950, the true lesion shares, the scanner readout), paired tests
between rows on the same splits, and a reading of the numbers, written as a report."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from drasclr.evaluation import plots
from drasclr.evaluation.data import COVID, Cohort, Features, density_label, load_cohort
from drasclr.evaluation.paired import TEST_NAME, paired_difference
from drasclr.evaluation.readout import (
    DENSITY_ROW, INNER_FOLDS, LOGISTIC_CS, RIDGE_ALPHAS, TRUTH_ROW, ReadoutScore, main_metric,
    readout, readout_table, scanner_table,
)
from drasclr.evaluation.report import Figure, PairedDifference, Section, Table, write_report
from drasclr.evaluation.survival import (
    COMPONENTS, CONFOUNDERS_ROW, COX_ALPHA, SurvivalScore, follow_up_horizons, survival,
    survival_table,
)

FIGURES = Path("figures")
COHORT_SECTION = "Cohort and representations"
READING_SECTION = "Reading"
#: The level below which a paired difference counts as one in the reading.
ALPHA = 0.05
_LIBRARIES = ("numpy", "pandas", "scikit-learn", "scikit-survival", "lifelines", "matplotlib",
              "scipy")

@dataclass
class EvaluationResult:
    """What :func:`evaluate` computed and wrote.

    Attributes:
        sections: the report's sections (cohort, reading, readout or COVID severity, scanner,
            survival).
        readout: row name -> task key -> scores and out-of-fold predictions.
        survival: row name -> C-index per horizon percentile (empty for a COVID cohort).
        reading: the generated paragraph that says what the tables show.
        settings: everything that produced the numbers (also in ``results.json``).
        notes: what was left out and why.
        report: the path of ``report.html``.
    """

    sections: list[Section]
    readout: dict[str, dict[str, ReadoutScore]]
    survival: dict[str, SurvivalScore]
    reading: str
    settings: dict
    notes: list[str]
    report: Path


def evaluate(features: Features, clinical: str | Path, store: str | Path, out: str | Path, *,
             folds: int = 5, repeats: int = 5, seed: int = 0,
             tasks: list[str] | None = None, n_jobs: int = 1) -> EvaluationResult:
    """Run every subject-level task the clinical table supports and write the report.

    Args:
        features: features files or FeatureSets: a mapping method name -> one file per
            pretraining seed (``{"DrasCLR": [s0, s1, s2], "random init": [r0, r1, r2]}``), or
            a sequence in which the files of one ``name`` are that method's seeds. The first
            method is the one the reading is about.
        clinical: clinical table CSV with ``subject_id`` and the label columns.
        store: the patch store the features came from (its manifest holds the density measures).
        out: report folder: ``report.html``, ``report.md``, ``results.json``, ``figures/``.
        folds, repeats: repeated K-fold cross-validation of every task, the same splits for
            every row.
        seed: seed of every split.
        tasks: keys of ``drasclr.evaluation.data.TASKS``; default every supported task.
        n_jobs: readout fits run at once (scikit-learn's ``n_jobs``); the numbers do not
            depend on it.
    Raises:
        ValueError: a problem with the inputs, named with its file, before any fitting.
    """
    if repeats < 1:
        raise ValueError(f"repeats: need at least 1 cross-validation, got {repeats}")
    cohort = load_cohort(features, clinical, store, folds=folds, tasks=tasks)
    out = Path(out)
    options = dict(folds=folds, repeats=repeats, seed=seed)
    readout_results = readout(cohort, **options, n_jobs=n_jobs) if cohort.labels else {}
    survival_results = survival(cohort, **options) if cohort.survival is not None else {}
    scanner = scanner_table(cohort, **options, n_jobs=n_jobs) if cohort.scanner else None
    sections = [_cohort_section(cohort)]
    if readout_results:
        sections.append(_readout_section(readout_results, cohort, out, folds, repeats))
    if scanner is not None:
        sections.append(Section("Scanner readout (a control)", "What each representation tells "
                                "about the scanner that made the image.", [scanner]))
    if survival_results:
        sections.append(_survival_section(survival_results, cohort, out, **options))
    reading = _reading(cohort, readout_results, survival_results, scanner, folds)
    sections.insert(1, Section(READING_SECTION, reading))
    settings = _settings(cohort, **options)
    report = write_report(sections, out, settings)
    return EvaluationResult(sections, readout_results, survival_results, reading, settings,
                            cohort.notes, report)


def _cohort_section(cohort: Cohort) -> Section:
    rows = [[name, ", ".join(cohort.feature_files[name]), len(seeds), seeds[0].shape[1]]
            for name, seeds in cohort.features.items()]
    manifest = cohort.store_path / "manifest.csv"
    measures = ", ".join(density_label(c) for c in cohort.density_columns)
    rows.append([DENSITY_ROW, f"{manifest} ({measures})", 1, len(cohort.density_columns)])
    if cohort.regional is not None:
        rows.append(["regional LAA-950", f"{manifest} (upper, middle, lower, rind, core)", 1,
                     cohort.regional.shape[1]])
    if cohort.truth is not None:
        rows.append([TRUTH_ROW, f"{cohort.clinical_path} ({', '.join(cohort.truth_columns)})",
                     1, cohort.truth.shape[1]])
    intro = (f"{len(cohort.subject_ids)} subjects of a {cohort.kind.upper()} cohort; labels from "
             f"{cohort.clinical_path}. " + " ".join(cohort.notes)).strip()
    return Section(COHORT_SECTION, intro,
                   [Table("Representations", ["Name", "Source", "Seeds", "Dimension"], rows)])


def _readout_section(results: dict[str, dict[str, ReadoutScore]], cohort: Cohort, out: Path,
                     folds: int, repeats: int) -> Section:
    table = readout_table(results, cohort, folds, repeats)
    stem = "covid" if cohort.kind == COVID else "readout"
    scores = {column: {row[0]: row[i] for row in table.rows}
              for i, column in enumerate(table.columns) if i > 1}
    figures = [_figure(out, f"{stem}_scores.png", "Scores per fold",
                       "Bars: mean over seeds and splits, whiskers: SD, dots: every (seed, "
                       "split).",
                       plots.score_bars, scores, table.title)]
    labels = cohort.labels
    if "log_fev1pp" in labels:
        predictions = {row: by_task["log_fev1pp"].predictions for row, by_task in results.items()}
        figures.append(_figure(
            out, "log_fev1pp_predicted.png", "Predicted against true log FEV1pp",
            "Out-of-fold predictions of the first seed's first repeat: each subject predicted "
            "by the model that did not see it.",
            plots.predicted_vs_true, labels["log_fev1pp"].y, predictions, "log FEV1pp"))
    for key in ("gold", "cle", "covid_grade"):
        if key in labels:
            task = labels[key].task
            predictions = {row: by_task[key].predictions for row, by_task in results.items()}
            figures.append(_figure(
                out, f"confusion_{key}.png", f"Confusion matrices, {task.title}",
                "Out-of-fold predictions of the first seed's first repeat (rows: true grade, "
                "columns: predicted).",
                plots.confusion_matrices, labels[key].y, predictions, task.grades, task.title))
    if cohort.kind == COVID:
        title, intro = ("COVID-19 severity",
                        "Five-grade severity from a multinomial linear classifier on each "
                        "representation (Yu et al. 2023, Table 4).")
    else:
        title, intro = ("Lung function, emphysema and exacerbations",
                        "Linear readout of each representation (Yu et al. 2023, Table 2).")
    tables = [table, _comparison_table(
        "Paired comparisons, readout",
        {lab.task.title + " " + main_metric(lab.task):
         {row: by_task[key].per_split[main_metric(lab.task)] for row, by_task in results.items()}
         for key, lab in cohort.labels.items()},
        _readout_pairs(cohort, list(results)), folds)]
    return Section(title, intro, tables, figures)


def _readout_pairs(cohort: Cohort, rows: list[str]) -> list[tuple[str, str]]:
    """Every row against the density measures; the first method against the others."""
    methods = list(cohort.features)
    pairs = [(row, DENSITY_ROW) for row in rows if row != DENSITY_ROW]
    return pairs + [(methods[0], other) for other in methods[1:]]


def _survival_pairs(cohort: Cohort, rows: list[str]) -> list[tuple[str, str]]:
    """Every row against confounders + density measures; each method's row against the
    confounders alone; the first method against the others."""
    density = f"confounders + {DENSITY_ROW}"
    methods = [f"confounders + {m}" for m in cohort.features]
    pairs = [(row, density) for row in rows if row != density]
    pairs += [(m, CONFOUNDERS_ROW) for m in methods]
    return pairs + [(methods[0], other) for other in methods[1:]]


def _comparison_table(title: str, per_split: dict[str, dict[str, np.ndarray]],
                      pairs: list[tuple[str, str]], folds: int) -> Table:
    """Rows 'A − B', one column per task or horizon: the mean paired difference and its p."""
    columns = ["Comparison"] + list(per_split)
    rows = [[f"{a} − {b}"] + [paired_difference(values[a], values[b], folds)
                              for values in per_split.values()] for a, b in pairs]
    note = (f"Mean difference over the splits both rows were scored on (every row on the same "
            f"splits; a method's value per split is its mean over its seeds), and the p-value "
            f"of the {TEST_NAME}; positive: the first row scores higher.")
    return Table(title, columns, rows, note)


def _survival_section(results: dict[str, SurvivalScore], cohort: Cohort, out: Path, *,
                      folds: int, repeats: int, seed: int) -> Section:
    data = cohort.survival
    groups = {row: score.risk_group for row, score in results.items()}
    figure = _figure(
        out, "kaplan_meier.png", "Kaplan-Meier curves by predicted risk",
        "Held-out subjects of the first seed's first cross-validation, in tertiles of the risk "
        "predicted by the model that did not see them (cut at its training fold's tertiles).",
        plots.kaplan_meier, data.time, data.event, groups)
    table = survival_table(results, cohort, folds=folds, repeats=repeats, seed=seed)
    horizons = follow_up_horizons(data.time)
    comparisons = _comparison_table(
        "Paired comparisons, survival C-index",
        {f"{q}th pct": {row: score.per_split[q] for row, score in results.items()}
         for q in horizons}, _survival_pairs(cohort, list(results)), folds)
    return Section("Survival", "Cox proportional hazards on confounders and each representation "
                   "(Yu et al. 2023, Table 3).", [table, comparisons], [figure])


def _verdict(difference: PairedDifference) -> int:
    """+1 / -1: the first row higher / lower at p < ALPHA; 0: no difference found."""
    if not np.isfinite(difference.p) or difference.p >= ALPHA:
        return 0
    return 1 if difference.difference > 0 else -1


def _against(first: dict[str, np.ndarray], second: dict[str, np.ndarray], folds: int,
             who: str, whom: str) -> str:
    """'who beats whom on ..., is beaten on ..., and no difference is found on ...'."""
    groups: dict[int, list[str]] = {1: [], -1: [], 0: []}
    for task in first:
        difference = paired_difference(first[task], second[task], folds)
        groups[_verdict(difference)].append(f"{task} ({difference.format(2)})")
    parts = []
    if groups[1]:
        parts.append(f"scores higher on {', '.join(groups[1])}")
    if groups[-1]:
        parts.append(f"lower on {', '.join(groups[-1])}")
    if groups[0]:
        parts.append(f"no difference at p < {ALPHA:g} is found on {', '.join(groups[0])}")
    return f"Against {whom}, {who} " + "; ".join(parts) + "."


def _reading(cohort: Cohort, readout_results: dict[str, dict[str, ReadoutScore]],
             survival_results: dict[str, SurvivalScore], scanner: Table | None,
             folds: int) -> str:
    """What the tables show, in words generated from their numbers: the first method against
    the density measures and the other methods, the ceiling, survival and the scanner."""
    method = next(iter(cohort.features))
    seeds = len(cohort.features[method])
    sentences = [f"About {method} ({seeds} pretraining seed{'s' if seeds > 1 else ''}), from "
                 f"the paired tests (p < {ALPHA:g}) on the main metric of each task."]
    if readout_results:
        main = {row: {lab.task.title + " " + main_metric(lab.task):
                      by_task[key].per_split[main_metric(lab.task)]
                      for key, lab in cohort.labels.items()}
                for row, by_task in readout_results.items()}
        sentences.append(_against(main[method], main[DENSITY_ROW], folds, method,
                                  "the density measures"))
        sentences += [_against(main[method], main[other], folds, method, other)
                      for other in list(cohort.features)[1:]]
        if TRUTH_ROW in main:
            gaps = ", ".join(
                f"{task} {readout_results[TRUTH_ROW][key].scores[main_metric(lab.task)].mean:.2f}"
                for (key, lab), task in zip(cohort.labels.items(), main[TRUTH_ROW]))
            sentences.append(f"The true lesion shares (the ceiling of what the images hold "
                             f"about these labels in this cohort) reach {gaps}.")
    if survival_results:
        q, density = 50, f"confounders + {DENSITY_ROW}"
        rows = {name: score.cindex[q] for name, score in survival_results.items()}
        row = f"confounders + {method}"
        difference = paired_difference(survival_results[row].per_split[q],
                                       survival_results[density].per_split[q], folds)
        sentences.append(
            f"Survival at the median follow-up: C-index {rows[CONFOUNDERS_ROW].format(2)} with "
            f"the confounders alone, {rows[row].format(2)} with {method} added and "
            f"{rows[density].format(2)} with the density measures added (difference "
            f"{difference.format(2)}).")
    if scanner is not None:
        row = next(r for r in scanner.rows if r[0] == method)
        parts = [f"{column.removesuffix(' accuracy')} {row[i].mean:.2f} "
                 f"({row[i + 1].format(2)} against chance)"
                 for i, column in enumerate(scanner.columns) if column.endswith(" accuracy")]
        sentences.append(f"Scanner readout of {method}: " + "; ".join(parts) + ".")
    else:
        sentences.append("No scanner readout: the clinical table has no site or kernel column.")
    return " ".join(sentences)


def _figure(out: Path, name: str, title: str, caption: str, draw, *args) -> Figure:
    """Draw ``draw(*args, path)`` into the report's figures folder."""
    draw(*args, out / FIGURES / name)
    return Figure(title, FIGURES / name, caption)


def _settings(cohort: Cohort, **options) -> dict:
    from drasclr import __version__

    versions = {"drasclr": __version__, "python": platform.python_version()}
    versions.update({name: metadata.version(name) for name in _LIBRARIES})
    settings = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cohort kind": cohort.kind,
        "subjects": len(cohort.subject_ids),
        **options,
        "tasks": [*cohort.labels, *(["survival"] if cohort.survival is not None else [])],
        "feature files": cohort.feature_files,
        "store": str(cohort.store_path.resolve()),
        "clinical table": str(cohort.clinical_path.resolve()),
        "density measures": list(cohort.density_columns),
        "true lesion shares": list(cohort.truth_columns),
        "scanner readout": list(cohort.scanner),
        "paired test": TEST_NAME,
        "readout": {"ridge alphas": RIDGE_ALPHAS.tolist(), "logistic Cs": LOGISTIC_CS.tolist(),
                    "inner folds": INNER_FOLDS},
        "versions": versions,
    }
    if cohort.survival is not None:
        settings["survival"] = {"horizons": follow_up_horizons(cohort.survival.time),
                                "principal components": COMPONENTS, "cox ridge": COX_ALPHA}
    return settings
