"""The clinical model: demographics, latent severity, disease plan and outcomes of one subject.

Everything here is drawn without rendering a volume (the 200-subject checks of GOLD stages and
survival concordance run on it alone); the generating model is written out in the package
docstring (``drasclr.data.synthetic``). Codes: sex 1 male / 0 female; race 0 non-Hispanic
white / 1 African American; smoking_status 0 never / 1 former / 2 current; gold 0-4 or -1 for
PRISm (preserved ratio, impaired spirometry).
"""
from __future__ import annotations

import numpy as np

#: CLE visual score (Fleischner: none, trace, mild, moderate, confluent, advanced destructive)
#: cut points on the centrilobular share of the lung, in percent, as read by a radiologist.
CLE_CUTS_PERCENT = (0.5, 1.5, 4.0, 8.0, 14.0)
#: Paraseptal score (none, mild, substantial) cut points on the paraseptal share, percent.
PARASEPTAL_CUTS_PERCENT = (0.5, 2.5)
#: Reader variability: multiplicative log-normal error on the extent a reader perceives.
READER_LOG_SD = 0.25
#: COVID grade bands of the involved lung fraction (MosMed CT-0..CT-4).
COVID_GRADE_CUTS = (0.0, 0.25, 0.5, 0.75)
COVID_GRADE_PROBABILITIES = (0.2, 0.3, 0.25, 0.15, 0.1)
COVID_INVOLVEMENT_RANGES = ((0.0, 0.0), (0.05, 0.2), (0.3, 0.45), (0.55, 0.7), (0.8, 0.9))


def _sigmoid(value: float) -> float:
    return float(1.0 / (1.0 + np.exp(-value)))


def gold_stage(fev1pp: float, fev1_fvc: float) -> int:
    """GOLD stage by the spirometric rules; -1 for PRISm (ratio >= 0.7 and FEV1pp < 80)."""
    if fev1_fvc >= 0.7:
        return -1 if fev1pp < 80 else 0
    return 1 if fev1pp >= 80 else 2 if fev1pp >= 50 else 3 if fev1pp >= 30 else 4


def covid_grade(involved_fraction: float) -> int:
    """0: none, 1: under 25 %, 2: 25-50 %, 3: 50-75 %, 4: over 75 % of the lung involved."""
    if involved_fraction <= 0:
        return 0
    return int(np.searchsorted(COVID_GRADE_CUTS, involved_fraction, side="right"))


def sample_copd_subject(rng: np.random.Generator) -> dict:
    """One COPD-cohort subject: clinical row (minus image truths) and the emphysema plan."""
    age = rng.uniform(45, 80)
    sex = int(rng.random() < 0.5)
    race = int(rng.random() < 0.33)
    smoking = int(rng.choice(3, p=(0.1, 0.5, 0.4)))
    pack_years = 0.0 if smoking == 0 else 10 + rng.gamma(2.0, 15.0)
    severity = _sigmoid(-2.3 + 1.9 * pack_years / 40 + 0.03 * (age - 60) + rng.normal(0, 1.1))

    # Emphysema appears above a severity threshold; subtypes mix differently in every subject.
    emphysema = 0.30 * (max(severity - 0.25, 0.0) / 0.75) ** 1.3
    proportions = rng.dirichlet((2.0, 1.0, 0.7))
    shares = dict(zip(("centrilobular", "paraseptal", "panlobular"), emphysema * proportions))

    restriction = rng.uniform(0.5, 1.0) if rng.random() < 0.15 else 0.0
    fev1_fvc = float(np.clip(0.83 - 0.40 * severity - 0.4 * emphysema + rng.normal(0, 0.04),
                             0.25, 0.95))
    fev1pp = float(np.clip(108 - 75 * severity - 60 * emphysema - 25 * restriction
                           + rng.normal(0, 8), 12, 140))
    gold = gold_stage(fev1pp, fev1_fvc)
    perceived = lambda share: 100 * share * np.exp(rng.normal(0, READER_LOG_SD))  # noqa: E731
    cle_score = int(np.searchsorted(CLE_CUTS_PERCENT, perceived(shares["centrilobular"]),
                                    side="right"))
    paraseptal_score = int(np.searchsorted(PARASEPTAL_CUTS_PERCENT,
                                           perceived(shares["paraseptal"]), side="right"))
    exacerbation = int(rng.random() < _sigmoid(-2.2 + 3.0 * severity + 0.4 * (smoking == 2)))

    # Proportional hazards (per year) in severity and the confounders; uniform censoring.
    hazard = 0.02 * np.exp(3.0 * severity + 0.05 * (age - 60) + 0.3 * sex + 0.2 * race
                           + 0.005 * pack_years)
    event_time = rng.exponential(1.0 / hazard)
    censor_time = rng.uniform(3.0, 10.0)
    row = {
        "age": round(age, 1), "sex": sex, "race": race, "smoking_status": smoking,
        "pack_years": round(pack_years, 1), "fev1pp": round(fev1pp, 2),
        "fev1_fvc": round(fev1_fvc, 4), "gold": gold, "prism": int(gold == -1),
        "cle_score": cle_score, "paraseptal_score": paraseptal_score,
        "exacerbation": exacerbation, "survival_time": round(min(event_time, censor_time), 3),
        "death": int(event_time <= censor_time), "severity": round(severity, 6),
    }
    return {"clinical": row, "emphysema_shares": shares}


def sample_covid_subject(rng: np.random.Generator) -> dict:
    """One COVID-cohort subject: demographics and the planned involved lung fraction."""
    grade = int(rng.choice(5, p=COVID_GRADE_PROBABILITIES))
    row = {"age": round(rng.uniform(20, 85), 1), "sex": int(rng.random() < 0.5)}
    return {"clinical": row, "involvement": float(rng.uniform(*COVID_INVOLVEMENT_RANGES[grade]))}
