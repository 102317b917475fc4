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


# -- version 2: several partly independent disease processes ---------------------------------
# Every coefficient below is listed, with its source, in docs/synthetic_cohort.md.

#: Correlations of the latent liabilities (emphysema, airway wall, small airways, vessel loss).
LATENT_CORRELATION = np.array([[1.0, 0.2, 0.5, 0.4],
                               [0.2, 1.0, 0.4, 0.0],
                               [0.5, 0.4, 1.0, 0.2],
                               [0.4, 0.0, 0.2, 1.0]])
#: Sites (index) with their share of the cohort; their protocols are in ``scanner.SITES``.
SITE_PROBABILITIES = (0.35, 0.25, 0.25, 0.15)
#: Reader error on a visual score: extra log-normal error and the chance of a one-grade slip.
READER_LOG_SD_V2 = 0.35
READER_SLIP = 0.1
#: Chance that a reported exacerbation history is wrong (recall).
EXACERBATION_RECALL_ERROR = 0.05
#: Celli et al. (NEJM 2004): hazard ratio of death per BODE point.
BODE_HAZARD_RATIO = 1.34


def bode_index(bmi: float, fev1pp: float, mmrc: int, walk_m: float) -> int:
    """BODE index (Celli et al., NEJM 2004): BMI, obstruction, dyspnoea, exercise capacity."""
    points = int(bmi <= 21)
    points += 0 if fev1pp >= 65 else 1 if fev1pp >= 50 else 2 if fev1pp >= 36 else 3
    points += 0 if mmrc <= 1 else mmrc - 1
    points += 0 if walk_m >= 350 else 1 if walk_m >= 250 else 2 if walk_m >= 150 else 3
    return points


def _reader_score(share: float, cuts: tuple[float, ...], rng: np.random.Generator) -> int:
    """A radiologist's grade of a subtype share: log-normal misjudgement, sometimes one off."""
    score = int(np.searchsorted(cuts, 100 * share * np.exp(rng.normal(0, READER_LOG_SD_V2)),
                                side="right"))
    if rng.random() < READER_SLIP:
        score += int(rng.choice((-1, 1)))
    return int(np.clip(score, 0, len(cuts)))


def sample_copd_subject_v2(rng: np.random.Generator) -> dict:
    """One version-2 COPD subject: clinical row (minus image truths), disease and scan plan.

    Emphysema, airway wall thickening, small-airway disease and vessel pruning follow
    correlated latents of their own; lung function depends on all of them, so that no image
    density measure is an oracle of it.
    """
    from drasclr.data.synthetic.scanner import SITES

    age = rng.uniform(45, 80)
    sex = int(rng.random() < 0.5)
    race = int(rng.random() < 0.33)
    smoking = int(rng.choice(3, p=(0.1, 0.5, 0.4)))
    pack_years = 0.0 if smoking == 0 else 10 + rng.gamma(2.0, 15.0)
    dose = pack_years / 40
    z_emph, z_airway, z_sad, z_vessel = rng.multivariate_normal(np.zeros(4), LATENT_CORRELATION)
    emph_liability = z_emph + 1.0 * dose + 0.03 * (age - 60) - 1.8
    airway_liability = z_airway + 0.5 * dose + 0.3 * (smoking == 2)
    sad_liability = z_sad + 0.8 * dose + 0.3 * (smoking == 2) - 0.5

    emphysema = 0.32 * (max(_sigmoid(1.5 * emph_liability) - 0.3, 0.0) / 0.7) ** 1.5
    proportions = rng.dirichlet((2.0, 1.0, 0.7))
    shares = dict(zip(("centrilobular", "paraseptal", "panlobular"), emphysema * proportions))
    wall_area = float(np.clip(0.60 + 0.04 * airway_liability, 0.50, 0.78))
    lumen_scale = float(np.clip(1.0 - 0.05 * max(airway_liability, 0.0), 0.8, 1.0))
    small_airway = 0.40 * _sigmoid(1.6 * (sad_liability - 0.6))
    pruning = float(np.clip(0.1 + 1.5 * emphysema + 0.08 * z_vessel, 0.0, 0.7))
    restriction = rng.uniform(0.5, 1.0) if rng.random() < 0.08 else 0.0

    # Log FEV1 % predicted falls with each process; severity is its noise-free loss.
    airway_score = (wall_area - 0.60) / 0.04
    loss = 2.4 * emphysema + 0.12 * airway_score + 1.2 * small_airway + 0.35 * restriction
    severity = float(np.clip(1.0 - np.exp(-loss), 0.0, 1.0))
    fev1pp = float(np.clip(105 * np.exp(-loss + rng.normal(0, 0.10)), 12, 140))
    fev1_fvc = float(np.clip(0.80 - 1.0 * emphysema - 0.035 * airway_score - 0.40 * small_airway
                             + rng.normal(0, 0.04), 0.25, 0.95))
    gold = gold_stage(round(fev1pp, 2), round(fev1_fvc, 4))
    cle_score = _reader_score(shares["centrilobular"], CLE_CUTS_PERCENT, rng)
    paraseptal_score = _reader_score(shares["paraseptal"], PARASEPTAL_CUTS_PERCENT, rng)
    exacerbation = int(rng.random() < _sigmoid(-1.9 + 0.8 * airway_score + 2.0 * emphysema
                                               + 0.3 * (smoking == 2)))
    if rng.random() < EXACERBATION_RECALL_ERROR:
        exacerbation = 1 - exacerbation

    # BODE-like survival: body mass, obstruction, dyspnoea and walk distance, then emphysema.
    # Rounded as reported, so that the BODE index is the one of the table's values.
    fev1pp, fev1_fvc = round(fev1pp, 2), round(fev1_fvc, 4)
    bmi = round(float(np.clip(27.5 - 15 * emphysema + 0.8 * sex + rng.normal(0, 4.0), 15, 45)), 1)
    mmrc = int(np.clip(np.rint(0.3 + 2.5 * (1 - fev1pp / 100) + 0.25 * airway_score
                               + 2.0 * small_airway + rng.normal(0, 0.7)), 0, 4))
    walk_m = round(float(np.clip(520 - 3.0 * (age - 60) - 2.0 * (100 - fev1pp) - 35 * mmrc
                                 + rng.normal(0, 70), 50, 750)))
    bode = bode_index(bmi, fev1pp, mmrc, walk_m)
    hazard = 0.018 * BODE_HAZARD_RATIO**bode * np.exp(
        0.05 * (age - 60) + 0.25 * sex + 0.15 * race + 3.0 * emphysema)
    event_time = rng.exponential(1.0 / hazard)
    censor_time = rng.uniform(3.0, 10.0)

    site = int(rng.choice(len(SITE_PROBABILITIES), p=SITE_PROBABILITIES))
    kernel = int(rng.random() < SITES[site].sharp_probability)
    row = {
        "age": round(age, 1), "sex": sex, "race": race, "smoking_status": smoking,
        "pack_years": round(pack_years, 1), "fev1pp": round(fev1pp, 2),
        "fev1_fvc": round(fev1_fvc, 4), "gold": gold, "prism": int(gold == -1),
        "cle_score": cle_score, "paraseptal_score": paraseptal_score,
        "exacerbation": exacerbation, "survival_time": round(min(event_time, censor_time), 3),
        "death": int(event_time <= censor_time), "severity": round(severity, 6),
        "site": site, "kernel": kernel, "bmi": bmi, "mmrc": mmrc, "walk_m": walk_m, "bode": bode,
        "airway_true": round(100 * wall_area, 3), "small_airway_true": round(100 * small_airway, 3),
        "pruning_true": round(100 * pruning, 3),
    }
    disease = {"emphysema_shares": shares, "wall_area": wall_area, "lumen_scale": lumen_scale,
               "small_airway": small_airway, "pruning": pruning, "restriction": restriction,
               "latents": {"emphysema": float(z_emph), "airway": float(z_airway),
                           "small_airway": float(z_sad), "vessel": float(z_vessel)}}
    return {"clinical": row, **disease}


def sample_covid_subject_v2(rng: np.random.Generator) -> dict:
    """A version-2 COVID-19 subject: as version 1, plus the site and kernel of the scan."""
    from drasclr.data.synthetic.scanner import SITES

    sample = sample_covid_subject(rng)
    site = int(rng.choice(len(SITE_PROBABILITIES), p=SITE_PROBABILITIES))
    sample["clinical"].update(site=site, kernel=int(rng.random() < SITES[site].sharp_probability))
    return sample
