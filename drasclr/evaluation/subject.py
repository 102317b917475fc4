"""The subject-level evaluation of Yu et al. 2023 (Tables 2 to 4), end to end: readout of
lung function, emphysema scores and exacerbations, survival, or COVID-19 severity, for one or
more feature sets beside the density measures, written as a report."""
from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from drasclr.evaluation import plots
from drasclr.evaluation.data import COVID, Cohort, density_label, load_cohort
from drasclr.evaluation.readout import (
    INNER_FOLDS, LOGISTIC_CS, RIDGE_ALPHAS, ReadoutScore, readout, readout_table,
)
from drasclr.evaluation.report import Figure, Section, Table, write_report
from drasclr.evaluation.survival import (
    BOOTSTRAP, COMPONENTS, COX_ALPHA, SurvivalScore, follow_up_horizons, survival,
    survival_table,
)
from drasclr.features import FeatureSet

FIGURES = Path("figures")
COHORT_SECTION = "Cohort and representations"
_LIBRARIES = ("numpy", "pandas", "scikit-learn", "scikit-survival", "lifelines", "matplotlib")


@dataclass
class EvaluationResult:
    """What :func:`evaluate` computed and wrote.

    Attributes:
        sections: the report's sections (cohort, readout or COVID severity, survival).
        readout: row name -> task key -> scores and out-of-fold predictions.
        survival: row name -> C-index per horizon percentile (empty for a COVID cohort).
        settings: everything that produced the numbers (also in ``results.json``).
        notes: what was left out and why.
        report: the path of ``report.html``.
    """

    sections: list[Section]
    readout: dict[str, dict[str, ReadoutScore]]
    survival: dict[str, SurvivalScore]
    settings: dict
    notes: list[str]
    report: Path


def evaluate(features: Sequence[str | Path | FeatureSet] | str | Path | FeatureSet,
             clinical: str | Path, store: str | Path, out: str | Path, *, folds: int = 5,
             repeats: int = 5, seed: int = 0, tasks: Sequence[str] | None = None,
             bootstrap: int = BOOTSTRAP) -> EvaluationResult:
    """Run every subject-level task the clinical table supports and write the report.

    Args:
        features: features files (``drasclr features``) or FeatureSets, one or more.
        clinical: clinical table CSV with ``subject_id`` and the label columns.
        store: the patch store the features came from (its manifest holds the density measures).
        out: report folder: ``report.html``, ``report.md``, ``results.json``, ``figures/``.
        folds: cross-validation folds; repeats: repeated cross-validations for survival.
        seed: seed of every split and of the bootstrap.
        tasks: keys of ``drasclr.evaluation.data.TASKS``; default every supported task.
        bootstrap: bootstrap resamples for the survival standard errors.
    Raises:
        ValueError: a problem with the inputs, named with its file, before any fitting.
    """
    cohort = load_cohort(features, clinical, store, folds=folds, tasks=tasks)
    out = Path(out)
    readout_results = readout(cohort, folds=folds, seed=seed) if cohort.labels else {}
    survival_results = (survival(cohort, folds=folds, repeats=repeats, seed=seed,
                                 bootstrap=bootstrap) if cohort.survival is not None else {})
    sections = [_cohort_section(cohort)]
    if readout_results:
        sections.append(_readout_section(readout_results, cohort, out, folds))
    if survival_results:
        sections.append(_survival_section(survival_results, cohort, out, folds, repeats,
                                          bootstrap))
    settings = _settings(cohort, folds=folds, repeats=repeats, seed=seed, bootstrap=bootstrap)
    report = write_report(sections, out, settings)
    return EvaluationResult(sections, readout_results, survival_results, settings,
                            cohort.notes, report)


def _cohort_section(cohort: Cohort) -> Section:
    rows = [[name, cohort.feature_files[name], f.shape[1]] for name, f in cohort.features.items()]
    measures = ", ".join(density_label(c) for c in cohort.density_columns)
    rows.append(["density measures", f"{cohort.store_path / 'manifest.csv'} ({measures})",
                 len(cohort.density_columns)])
    intro = (f"{len(cohort.subject_ids)} subjects of a {cohort.kind.upper()} cohort; labels from "
             f"{cohort.clinical_path}. " + " ".join(cohort.notes)).strip()
    return Section(COHORT_SECTION, intro,
                   [Table("Representations", ["Name", "Source", "Dimension"], rows)])


def _readout_section(results: dict[str, dict[str, ReadoutScore]], cohort: Cohort, out: Path,
                     folds: int) -> Section:
    table = readout_table(results, cohort, folds)
    stem = "covid" if cohort.kind == COVID else "readout"
    scores = {column: {row[0]: row[i] for row in table.rows}
              for i, column in enumerate(table.columns) if i}
    figures = [_figure(out, f"{stem}_scores.png", "Scores per fold",
                       "Bars: mean over folds, whiskers: SD, dots: the folds.",
                       plots.score_bars, scores, table.title)]
    labels = cohort.labels
    if "log_fev1pp" in labels:
        predictions = {row: by_task["log_fev1pp"].predictions for row, by_task in results.items()}
        figures.append(_figure(
            out, "log_fev1pp_predicted.png", "Predicted against true log FEV1pp",
            "Out-of-fold predictions: each subject predicted by the model that did not see it.",
            plots.predicted_vs_true, labels["log_fev1pp"].y, predictions, "log FEV1pp"))
    for key in ("gold", "cle", "covid_grade"):
        if key in labels:
            task = labels[key].task
            predictions = {row: by_task[key].predictions for row, by_task in results.items()}
            figures.append(_figure(
                out, f"confusion_{key}.png", f"Confusion matrices, {task.title}",
                "Out-of-fold predictions (rows: true grade, columns: predicted).",
                plots.confusion_matrices, labels[key].y, predictions, task.grades, task.title))
    if cohort.kind == COVID:
        title, intro = ("COVID-19 severity",
                        "Five-grade severity from a multinomial linear classifier on each "
                        "representation (Yu et al. 2023, Table 4).")
    else:
        title, intro = ("Lung function, emphysema and exacerbations",
                        "Linear readout of each representation (Yu et al. 2023, Table 2).")
    return Section(title, intro, [table], figures)


def _survival_section(results: dict[str, SurvivalScore], cohort: Cohort, out: Path, folds: int,
                      repeats: int, bootstrap: int) -> Section:
    data = cohort.survival
    groups = {row: score.risk_group for row, score in results.items()}
    figure = _figure(
        out, "kaplan_meier.png", "Kaplan-Meier curves by predicted risk",
        "Held-out subjects of the first cross-validation, in tertiles of the risk predicted by "
        "the model that did not see them (cut at its training fold's tertiles).",
        plots.kaplan_meier, data.time, data.event, groups)
    table = survival_table(results, cohort, folds=folds, repeats=repeats, bootstrap=bootstrap)
    return Section("Survival", "Cox proportional hazards on confounders and each representation "
                   "(Yu et al. 2023, Table 3).", [table], [figure])


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
        "readout": {"ridge alphas": RIDGE_ALPHAS.tolist(), "logistic Cs": LOGISTIC_CS.tolist(),
                    "inner folds": INNER_FOLDS},
        "versions": versions,
    }
    if cohort.survival is not None:
        settings["survival"] = {"horizons": follow_up_horizons(cohort.survival.time),
                                "principal components": COMPONENTS, "cox ridge": COX_ALPHA}
    return settings
