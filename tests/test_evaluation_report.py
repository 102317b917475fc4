"""The subject-level evaluation end to end (``drasclr.evaluate``, ``drasclr evaluate``): the
report's files and contents, the results round trip, and every input error before any fit."""
import html as html_text
import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import drasclr
from drasclr.cli import main
from drasclr.data.atlas import build_atlas
from drasclr.data.store import create_store, write_subject
from drasclr.data.synthetic import sample_clinical
from drasclr.evaluation.data import load_cohort
from drasclr.evaluation.paired import paired_difference
from drasclr.evaluation.report import (
    Estimate, Figure, Score, Section, Table, format_cell, read_results, write_report,
)
from drasclr.features import FeatureSet

SUBJECTS = 40


def _density(clinical_row: dict, shares: dict, rng) -> dict:
    emphysema = 100 * sum(shares.values())
    regional = {f"laa950_{zone}_percent": 100 * shares[subtype] + rng.normal(0, 1)
                for zone, subtype in (("upper", "centrilobular"), ("middle", "centrilobular"),
                                      ("lower", "panlobular"), ("rind", "paraseptal"),
                                      ("core", "centrilobular"))}
    return {**regional, "laa950_percent": emphysema + rng.normal(0, 1),
            "perc15_hu": -900 - 3 * emphysema + rng.normal(0, 10),
            "mean_lung_density_hu": -850 - emphysema + rng.normal(0, 10),
            "lung_volume_ml": 5000 + rng.normal(0, 400),
            "haa_700_300_percent": 2 + rng.normal(0, 0.5)}


def _cohort(root, kind="copd", subjects=SUBJECTS, density=True):
    """A small cohort as the pipeline leaves it: clinical.csv drawn from the synthetic model
    (with a kernel column for COPD), a store whose manifest holds the density
    measures, three seeds of a planted feature set and a random one that carries the kernel."""
    root.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[4:36, 4:36, 4:36] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "mask.nii.gz")
    atlas = build_atlas(root / "mask.nii.gz")
    atlas.save(root / "atlas.npz")
    create_store(root / "store", atlas, root / "atlas.npz")
    patches = np.zeros((atlas.num_landmarks, 32, 32, 32), np.int16)
    rng = np.random.default_rng(0)
    rows, latent = [], []
    for i in range(subjects):
        sample = sample_clinical(0, i, kind)
        row = {"subject_id": f"s{i:03d}", **sample["clinical"]}
        if kind == "copd":
            quality = _density(row, sample["emphysema_shares"], rng)
            row.update({f"{k}_true": 100 * v for k, v in sample["emphysema_shares"].items()})
            latent.append(row["severity"])
        else:
            involvement = 100 * sample["involvement"]
            row["covid_grade"] = int(np.ceil(involvement / 25))
            quality = {"haa_700_300_percent": involvement + rng.normal(0, 3),
                       "mean_lung_density_hu": -850 + 3 * involvement}
            latent.append(involvement / 30)
        rows.append(row)
        write_subject(root / "store", row["subject_id"], "scan.nii.gz", patches=patches,
                      quality=quality if density else None)
    kernel = rng.permutation(np.arange(subjects) % 2)
    if kind == "copd":
        for row, k in zip(rows, kernel):  # a kernel the test plants; no site readout
            row.pop("site", None)
            row["kernel"] = int(k)
    pd.DataFrame(rows).to_csv(root / "clinical.csv", index=False)
    ids = [r["subject_id"] for r in rows]
    latent = np.array(latent)[:, None]
    loading = rng.normal(size=(1, 16))
    for seed in range(3):
        planted = latent @ loading + 0.3 * rng.normal(size=(subjects, 16))
        FeatureSet(ids, planted, {"name": "planted"}).save(
            root / ("planted.npz" if seed == 0 else f"planted_{seed}.npz"))
    random = rng.normal(size=(subjects, 16))
    random[:, 0] += 3 * kernel
    FeatureSet(ids, random, {"name": "random init"}).save(root / "random_0.npz")
    return root


PLANTED = ["planted.npz", "planted_1.npz", "planted_2.npz"]


@pytest.fixture(scope="module")
def copd(tmp_path_factory):
    return _cohort(tmp_path_factory.mktemp("copd"))


@pytest.fixture(scope="module")
def evaluated(copd):
    # A task of each kind and one repeat (the others run the same code), to keep the fits few.
    features = {"planted": [copd / f for f in PLANTED], "random init": [copd / "random_0.npz"]}
    result = drasclr.evaluate(features, copd / "clinical.csv", copd / "store", copd / "report",
                              repeats=1, tasks=["log_fev1pp", "gold", "survival"])
    return result, copd / "report"


def test_report_files_exist_and_hold_every_table(evaluated):
    result, out = evaluated
    for name in ("report.html", "report.md", "results.json", "figures/readout_scores.png",
                 "figures/log_fev1pp_predicted.png", "figures/confusion_gold.png",
                 "figures/kaplan_meier.png"):
        assert (out / name).is_file(), name
    assert result.report == out / "report.html"
    html = (out / "report.html").read_text()
    text = html_text.unescape(re.sub(r"<[^>]+>", "", html))  # as a reader sees it
    markdown = (out / "report.md").read_text()
    titles = [t.title for s in result.sections for t in s.tables]
    assert titles == ["Representations", "Lung function, emphysema scores and exacerbations",
                      "Paired comparisons, readout",
                      "Scanner readout: kernel",
                      "Survival: time-dependent concordance index",
                      "Paired comparisons, survival C-index"]
    assert result.sections[1].title == "Reading" and result.reading in text
    readout_table, survival_table = result.sections[2].tables[0], result.sections[4].tables[0]
    for table in (readout_table, survival_table):
        assert table.title in text and f"**{table.title}**" in markdown
        for column in table.columns:
            assert column in text
        for row in table.rows:
            assert row[0] in text
            assert format_cell(row[1]) in text and format_cell(row[-1]) in markdown
    assert [r[:2] for r in readout_table.rows] == [
        ["planted", 3], ["random init", 1], ["density measures", 1], ["regional LAA-950", 1],
        ["true lesion shares (ceiling)", 1], ["density + planted", 3],
        ["density + random init", 1]]
    assert "PRISm subjects left out of GOLD" in readout_table.note
    assert "1 × 5-fold" in readout_table.note and "(seed, split)" in readout_table.note
    assert [r[0] for r in survival_table.rows] == [
        "confounders", "confounders + planted", "confounders + random init",
        "confounders + density measures", "confounders + regional LAA-950",
        "confounders + true lesion shares (ceiling)", "confounders + spirometry",
        "confounders + spirometry + planted", "confounders + spirometry + random init"]
    # The planted features carry the severity that drives lung function; random ones do not.
    scores = result.readout
    assert scores["planted"]["log_fev1pp"].scores["R²"].mean > 0.3
    assert scores["random init"]["log_fev1pp"].scores["R²"].mean < 0.1
    # Every (seed, split) is in a method's score; its per-split values are the seed means.
    planted = scores["planted"]["log_fev1pp"]
    assert len(planted.scores["R²"].values) == 3 * 5
    np.testing.assert_allclose(planted.per_split["R²"],
                               np.reshape(planted.scores["R²"].values, (3, 5)).mean(0))


def test_paired_comparisons_and_the_reading_follow_the_numbers(evaluated):
    result, _ = evaluated
    comparisons = {row[0]: row[1:] for row in result.sections[2].tables[1].rows}
    # The planted features carry the latent severity; the random ones do not. (Whether one
    # 5-fold cross-validation makes that significant is the test's power, tested on planted
    # signals in test_evaluation_readout; here: the cells and the reading agree.)
    scores = result.readout
    fev1 = comparisons["planted − random init"][0]
    assert fev1.difference > 0.3
    assert fev1 == paired_difference(scores["planted"]["log_fev1pp"].per_split["R²"],
                                     scores["random init"]["log_fev1pp"].per_split["R²"], 5)
    assert "planted − density measures" in comparisons
    assert "density measures − density measures" not in comparisons
    sentence = next(s for s in result.reading.split("Against ")[1:] if s.startswith("random"))
    verdict = "scores higher on" if fev1.p < 0.05 else "no difference at p < 0.05 is found on"
    assert sentence.startswith("random init, planted")
    assert f"log FEV1pp R² ({fev1.format(2)})" in sentence.split(verdict)[1]
    # Scanner control: the random features carry the kernel, the planted ones do not.
    scanner = {row[0]: row[1:] for row in result.sections[3].tables[0].rows}
    columns = result.sections[3].tables[0].columns[1:]
    kernel = columns.index("Kernel accuracy − chance")
    assert scanner["random init"][kernel].difference > 0.3
    assert scanner["random init"][kernel].p < 0.05
    assert scanner["planted"][kernel].p > 0.05
    assert "Scanner readout of planted: Kernel" in result.reading
    assert any("No site readout" in note for note in result.notes)
    # Survival: every fold's C-index is there, and missing folds are named in the note.
    survival_table = result.sections[4].tables[0]
    assert "left out of the mean: 25th pct:" in survival_table.note
    assert len(survival_table.rows[1][1].values) == 3 * 5


def test_html_is_self_contained(evaluated):
    _, out = evaluated
    html = (out / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert html.count("<img") == 4
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_results_json_round_trips(evaluated):
    result, out = evaluated
    sections, settings = read_results(out / "results.json")
    assert sections[2] == result.sections[2]  # readout: every Score with its fold values
    assert settings["folds"] == 5 and settings["repeats"] == 1 and settings["seed"] == 0
    assert settings["feature files"]["planted"][0].endswith("planted.npz")
    assert {"scikit-learn", "scikit-survival", "lifelines"} <= set(settings["versions"])
    first = json.loads((out / "results.json").read_text())
    write_report(sections, out, settings)
    assert json.loads((out / "results.json").read_text()) == first
    cell = first["sections"][2]["tables"][0]["rows"][0][2]
    assert cell["type"] == "score" and len(cell["values"]) == 15
    cell = first["sections"][2]["tables"][1]["rows"][0][1]
    assert cell["type"] == "paired difference" and 0 <= cell["p"] <= 1


def test_covid_cohort_gets_the_severity_table(tmp_path):
    root = _cohort(tmp_path / "covid", kind="covid", subjects=30)
    result = drasclr.evaluate(root / "planted.npz", root / "clinical.csv", root / "store",
                              root / "report", repeats=1)
    table = result.sections[2].tables[0]
    assert result.sections[2].title == "COVID-19 severity"
    assert table.columns == ["Representation", "Seeds", "COVID-19 severity accuracy",
                             "COVID-19 severity 1-off"]
    assert [r[0] for r in table.rows] == ["planted", "density measures", "density + planted"]
    assert "Scanner readout of planted: Site" in result.reading  # version 2 rows have a site
    assert result.survival == {}
    assert (root / "report" / "figures" / "confusion_covid_grade.png").is_file()


def test_write_report_renders_any_sections(tmp_path):
    from matplotlib.figure import Figure as MatplotlibFigure

    from drasclr.evaluation.report import save_figure

    figure = MatplotlibFigure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [0, 1])
    save_figure(figure, tmp_path / "elsewhere" / "line.png")
    section = Section("Detection", "Other engineers' sections render the same way.", [
        Table("Probe", ["method", "F1", "C-index", "n", "comment"],
              [["probe", Score.of([0.5, 0.7]), Estimate(0.61, 0.02, (0.6, 0.62)), 12, "a | b"]],
              note="a note")],
        [Figure("A line", tmp_path / "elsewhere" / "line.png", "absolute path")])
    html_path = write_report([section], tmp_path / "report", {"seed": 1})
    html = html_path.read_text()
    text = re.sub(r"<[^>]+>", "", html)
    assert "0.600 ± 0.141" in text and "0.610 ± 0.020" in text and "a note" in text
    assert "data:image/png;base64," in html
    assert "| probe | 0.600 ± 0.141 | 0.610 ± 0.020 | 12 | a \\| b |" in (
        tmp_path / "report" / "report.md").read_text()
    sections, settings = read_results(tmp_path / "report" / "results.json")
    assert sections == [section] and settings == {"seed": 1}


def test_cli_prints_the_table_and_the_report_path(copd, tmp_path, capsys):
    code = main(["evaluate", "--features", str(copd / "planted.npz"), "--clinical",
                 str(copd / "clinical.csv"), "--store", str(copd / "store"), "--out",
                 str(tmp_path / "cli"), "--tasks", "log_fev1pp", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Lung function, emphysema scores and exacerbations" in printed
    assert "log FEV1pp R²" in printed and "density + planted" in printed
    assert f"report: {tmp_path / 'cli' / 'report.html'}" in printed

    code = main(["evaluate", "--features", str(copd / "planted.npz"), "--clinical",
                 str(copd / "clinical.csv"), "--store", str(copd / "store"), "--out",
                 str(tmp_path / "bad"), "--folds", "50"])
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1 and "fewer than the 50 folds" in error


# --- input errors, all raised before any model is fitted --------------------------------------

def _edit_clinical(root, tmp_path, edit):
    table = pd.read_csv(root / "clinical.csv", dtype={"subject_id": str})
    path = tmp_path / "clinical.csv"
    edit(table).to_csv(path, index=False)
    return path


def _set(column, value, rows=slice(None)):
    def edit(table):
        table.loc[rows, column] = value
        return table
    return edit


@pytest.mark.parametrize("edit, tasks, message", [
    (lambda t: t.iloc[3:], None, r"clinical.csv: no rows for 3 of the 40 subjects of .*planted"),
    (lambda t: t.drop(columns="cle_score"), ["cle"],
     r"clinical.csv: task cle needs column cle_score, absent from the table"),
    (_set("exacerbation", 1), None,
     r"clinical.csv: column exacerbation is constant \(1\) over its 40 subjects"),
    (_set("fev1pp", np.nan, [4]), None,
     r"clinical.csv: column fev1pp has missing, non-numeric or non-finite values for 1 "
     r"subjects \(s004\)"),
    (_set("death", 0), None, r"clinical.csv: column death has 0 deaths, fewer than the 5 folds"),
    (_set("cle_score", 7, [0]), None, r"clinical.csv: column cle_score holds values outside 0-5"),
    (lambda t: pd.concat([t, t.iloc[:1]]), None, r"clinical.csv: subject ids occur more than once"),
    (lambda t: t, ["tumour"], r"tasks: unknown tumour"),
])
def test_clinical_table_errors(copd, tmp_path, edit, tasks, message):
    clinical = _edit_clinical(copd, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        drasclr.evaluate(copd / "planted.npz", clinical, copd / "store", tmp_path / "out",
                         tasks=tasks)
    assert not (tmp_path / "out").exists()  # nothing fitted, nothing written


def test_clinical_rows_without_features_and_absent_tasks_are_notes(copd, tmp_path):
    features = FeatureSet.load(copd / "planted.npz")
    fewer = FeatureSet(features.subject_ids[:30], features.features[:30], {"name": "planted"})
    clinical = _edit_clinical(copd, tmp_path, lambda t: t.drop(columns="exacerbation"))
    cohort = load_cohort(fewer, clinical, copd / "store")
    assert len(cohort.subject_ids) == 30 and "exacerbation" not in cohort.labels
    assert any("10 subjects of clinical.csv have no features" in n for n in cohort.notes)
    assert any("Exacerbation not evaluated" in n for n in cohort.notes)


def test_fewer_subjects_than_folds(copd):
    with pytest.raises(ValueError, match=r"has 40 subjects, fewer than the 41 folds"):
        load_cohort(copd / "planted.npz", copd / "clinical.csv", copd / "store", folds=41)


def test_non_finite_features(copd):
    features = FeatureSet.load(copd / "planted.npz")
    features.features[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"feature set 'planted': non-finite features for 1 "
                                         r"subject\(s\): s002"):
        load_cohort(features, copd / "clinical.csv", copd / "store")


def test_feature_sets_of_different_subjects_or_one_name(copd, tmp_path):
    features = FeatureSet.load(copd / "planted.npz")
    FeatureSet(features.subject_ids[1:], features.features[1:], {"name": "other"}).save(
        tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"other.npz: not the subjects of .*planted.npz \(1 in "
                                         r"only one of them: s000\)"):
        load_cohort([copd / "planted.npz", tmp_path / "other.npz"], copd / "clinical.csv",
                    copd / "store")
    with pytest.raises(ValueError, match=r"planted.npz: given twice for 'planted'"):
        load_cohort([copd / "planted.npz", copd / "planted.npz"], copd / "clinical.csv",
                    copd / "store")
    features.save(tmp_path / "copy.npz")
    with pytest.raises(ValueError, match=r"copy.npz: the same features as .*planted.npz \(one "
                                         r"pretraining seed given twice for 'planted'\?\)"):
        load_cohort([copd / "planted.npz", tmp_path / "copy.npz"], copd / "clinical.csv",
                    copd / "store")


def test_store_without_density_measures(tmp_path):
    root = _cohort(tmp_path / "old", subjects=6, density=False)
    with pytest.raises(ValueError) as error:
        load_cohort(root / "planted.npz", root / "clinical.csv", root / "store")
    assert str(error.value) == (
        f"{root / 'store' / 'manifest.csv'} has no density measures (LAA-950, Perc15, mean lung "
        f"density, lung volume, HAA, LAA-950 upper, LAA-950 middle, LAA-950 lower, LAA-950 rind, "
        f"LAA-950 core): run `drasclr preprocess` again with the same arguments to add them; "
        f"patches are kept")
