"""Survival analysis from exported subject features with lifelines' Cox model.

    python examples/survival_lifelines.py --features features.npz --clinical clinical.csv \
        [--time survival_time --event death] [--confounders age,sex,race,smoking_status,pack_years]
        [--components 4] [--folds 5]

As in Yu et al. 2023, Section 4.2.2 and Table 3: a Cox proportional hazards model on the image
features plus the confounders, against the confounders alone. Many features and few events:
the features are standardised and reduced to ``--components`` principal components, and the
Cox fit carries a small ridge penalty; scaler, PCA and Cox model are fitted on the training
folds only and scored by Harrell's concordance index on the held-out fold. (``drasclr
evaluate`` runs the paper's protocol, Uno's time-dependent C-index at three horizons over
pretraining seeds and repeated cross-validation, with paired tests; this script is the short
version to adapt.)

The clinical table needs ``subject_id``, the time and event columns and the confounders; rows
are matched to the features by subject id.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from drasclr.features import FeatureSet

CONFOUNDERS = "age,sex,race,smoking_status,pack_years"


def load_table(features_path: Path, clinical_path: Path, columns: list[str]
               ) -> tuple[np.ndarray, pd.DataFrame]:
    """(features, clinical rows) of the subjects in both files, in the features' order."""
    features = FeatureSet.load(features_path)
    clinical = pd.read_csv(clinical_path, dtype={"subject_id": str})
    missing = [c for c in ["subject_id", *columns] if c not in clinical.columns]
    if missing:
        raise ValueError(f"{clinical_path}: missing column(s) {missing}")
    clinical = clinical.set_index("subject_id")
    common = [s for s in features.subject_ids if s in clinical.index]
    if len(common) < 10:
        raise ValueError(f"{clinical_path}: only {len(common)} of the {len(features.subject_ids)} "
                         f"subjects of {features_path} have a row; need at least 10")
    rows = clinical.loc[common, columns]
    if rows.isna().any().any():
        raise ValueError(f"{clinical_path}: empty values in {rows.columns[rows.isna().any()].tolist()}")
    index = {s: i for i, s in enumerate(features.subject_ids)}
    return features.features[[index[s] for s in common]], rows.astype(float)


def cox_design(rows: pd.DataFrame, features: np.ndarray | None, train: np.ndarray,
               confounders: list[str], components: int) -> pd.DataFrame:
    """Standardised confounders and (optionally) feature components; scaler and PCA fitted
    on the ``train`` rows only."""
    scaled = StandardScaler().fit(rows.iloc[train][confounders]).transform(rows[confounders])
    design = pd.DataFrame(scaled, columns=confounders, index=rows.index)
    if features is not None:
        reduce = make_pipeline(StandardScaler(), PCA(components)).fit(features[train])
        for c, values in enumerate(reduce.transform(features).T):
            design[f"image_pc{c + 1}"] = values
    return design


def cross_validated_cindex(rows: pd.DataFrame, features: np.ndarray | None, time: str, event: str,
                           confounders: list[str], components: int, folds: int, seed: int,
                           penalizer: float) -> np.ndarray:
    """Held-out concordance index of each fold."""
    scores = []
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(rows):
        design = cox_design(rows, features, train, confounders, components)
        design[time], design[event] = rows[time], rows[event]
        model = CoxPHFitter(penalizer=penalizer).fit(design.iloc[train], time, event)
        risk = model.predict_partial_hazard(design.iloc[test])
        # a higher hazard means a shorter survival: the concordance of -risk with the time
        scores.append(concordance_index(rows[time].iloc[test], -risk, rows[event].iloc[test]))
    return np.asarray(scores)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="features file (.npz)")
    parser.add_argument("--clinical", type=Path, required=True, help="clinical table (.csv)")
    parser.add_argument("--time", default="survival_time", help="follow-up time column")
    parser.add_argument("--event", default="death", help="event column (1 event, 0 censored)")
    parser.add_argument("--confounders", default=CONFOUNDERS, help="comma-separated columns")
    parser.add_argument("--components", type=int, default=4, help="principal components kept")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--penalizer", type=float, default=0.1, help="Cox ridge penalty")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold split")
    args = parser.parse_args(argv)
    confounders = [c for c in args.confounders.split(",") if c]

    features, rows = load_table(args.features, args.clinical, [args.time, args.event, *confounders])
    print(f"{len(rows)} subjects, {int(rows[args.event].sum())} events, "
          f"{features.shape[1]} features -> {args.components} components")
    settings = dict(time=args.time, event=args.event, confounders=confounders,
                    components=args.components, folds=args.folds, seed=args.seed,
                    penalizer=args.penalizer)
    cindex = {"confounders": cross_validated_cindex(rows, None, **settings),
              "confounders + image": cross_validated_cindex(rows, features, **settings)}
    for name, scores in cindex.items():
        print(f"C-index, {name}: {scores.mean():.3f} +- {scores.std():.3f} "
              f"({args.folds}-fold cross-validation)")

    everyone = np.arange(len(rows))
    design = cox_design(rows, features, everyone, confounders, args.components)
    design[args.time], design[args.event] = rows[args.time], rows[args.event]
    model = CoxPHFitter(penalizer=args.penalizer).fit(design, args.time, args.event)
    print("\nhazard ratios per standard deviation, all subjects:")
    print(model.summary[["exp(coef)", "exp(coef) lower 95%", "exp(coef) upper 95%", "p"]]
          .round(3).to_string())
    return {"cindex": cindex, "model": model}


if __name__ == "__main__":
    main()
