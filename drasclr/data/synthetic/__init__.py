"""Synthetic chest-CT cohorts: the library's built-in data (docs/architecture.md).

``generate_cohort(out_dir, subjects, seed=0, kind="copd", size="full", version=2)`` or
``drasclr synth --out DIR --subjects N --seed S [--kind copd|covid] [--size full|small]
[--version 2|1]`` writes::

    images/<id>.nii.gz    int16 HU, RAS+ affine in mm, anisotropic voxels
    masks/<id>.nii.gz     uint8 lungs: 0 outside, 1 right lung (larger world x), 2 left lung
    lesions/<id>.nii.gz   uint8 lesions: copd 1 centrilobular, 2 paraseptal, 3 panlobular;
                          covid 1 ground glass, 2 consolidation
    truth/<id>.json       generator_version, template_to_subject_affine, deformation, scanner,
                          (v2) anatomy, disease, clinical
    template/image.nii.gz, template/lung_mask.nii.gz   healthy atlas at 1 mm (v1: the template
                          every subject is drawn from; v2: a subject of the mean shape with its
                          own seed, none of the cohort)
    clinical.csv          one row per subject (columns below)
    annotations.csv       subject_id, label (centrilobular | paraseptal | healthy), x_mm, y_mm,
                          z_mm (subject world), i, j, k (voxel), box_mm (32): v1: boxes centred
                          on emphysema cluster seeds, or on random lung points of
                          emphysema-free subjects; v2: lesion boxes jittered around lobule and
                          row centres, healthy boxes in every subject away from lesions, with
                          the lesion boxes' depth and zone preferences; only boxes wholly
                          inside the image
    cohort.json           generator version, seed, kind, size, subject ids (written last)

``sample_clinical(seed, index, kind)`` draws a subject's clinical row without rendering it;
``plan_subject`` and ``render_subject`` produce one subject in memory.
``map_template_points(truth, points_mm)`` applies a subject's full true mapping (pose and
smooth deformation) to template world points.

Version 2 (the default; every coefficient and its source: docs/synthetic_cohort.md) makes
density measures no oracle and location matter:

- per-subject anatomy: shape (``shape.py``: body size, inspiration, hyperinflation, diaphragm
  and heart modes, a residual of 5.5-8 mm RMS times the size's scale after the best affine
  fit), own vessel and airway trees and texture (``subject_anatomy.py``); the atlas is none
  of the subjects;
- normal lung density depends on location (gravity, apex-base, core-rind);
- disease beyond density: airway wall thickening and narrowing, vessel pruning, small-airway
  disease (faint mosaic), textured centrilobular / paraseptal / panlobular patterns
  (``patterns.py``), each from its own partly correlated latent;
- density confounders: site protocols (kernel, dose, calibration offset) and inspiration;
- outcomes: FEV1pp and FEV1/FVC from emphysema, airway and small-airway disease; GOLD and
  PRISm by definition; reader-noised visual scores; exacerbations mostly from airway
  disease; survival from a BODE-like hazard.

clinical.csv (v2) adds to the v1 columns: site, kernel (0 smooth, 1 sharp), bmi, mmrc,
walk_m, bode, airway_true (segmental wall area %), small_airway_true (% of lung),
pruning_true (% of distal vessels missing), inspiration_true (scan over full-inspiration
volume); COVID: site, kernel, inspiration_true.

Version 1 (``version=1``) below is kept byte-identical. Anatomy, pose and scanner:
``anatomy.py``, ``transform.py``, ``scanner.py``; lesions: ``disease.py``. Its clinical
generating model (``clinical.py``), per subject:

- age ~ U(45, 80); sex male w.p. 0.5; race African American w.p. 0.33; smoking never /
  former / current w.p. 0.1 / 0.5 / 0.4; pack-years 0 for never smokers, else 10 + Gamma(2, 15).
- latent severity s = sigmoid(-2.3 + 1.9 pack_years / 40 + 0.03 (age - 60) + N(0, 1.1^2)).
- emphysema share of the lung E = 0.30 ((s - 0.25)+ / 0.75)^1.3, split into centrilobular,
  paraseptal and panlobular by Dirichlet(2, 1, 0.7) proportions; rendered to these shares.
- FEV1/FVC = 0.83 - 0.40 s - 0.4 E + N(0, 0.04^2) (clipped to [0.25, 0.95]);
  FEV1pp = 108 - 75 s - 60 E - 25 r + N(0, 8^2) (clipped to [12, 140]), where a restrictive
  component r ~ U(0.5, 1) w.p. 0.15 (else 0) produces PRISm.
- GOLD: FEV1/FVC < 0.7 then FEV1pp >= 80 / 50 / 30 -> 1 / 2 / 3, else 4; ratio >= 0.7 with
  FEV1pp < 80 is PRISm (gold -1, prism 1), else 0.
- CLE score 0-5 and paraseptal score 0-2: a reader's view of the true subtype share
  (share x exp(N(0, 0.25^2))) cut at 0.5/1.5/4/8/14 % and 0.5/2.5 %.
- exacerbation ~ Bernoulli(sigmoid(-2.2 + 3 s + 0.4 [current smoker])).
- survival: hazard 0.02 exp(3 s + 0.05 (age - 60) + 0.3 male + 0.2 race + 0.005 pack_years)
  per year (exponential), censored at U(3, 10) years; survival_time = min, death = event.
- image truths: laa950_true (% of lung below -950 HU before scanner effects), emphysema_true
  and <subtype>_true (% of the lung volume in each lesion mask).
- covid: age ~ U(20, 85), sex; grade 0-4 w.p. 0.2/0.3/0.25/0.15/0.1 sets a planned involved
  fraction inside its band; covid_grade is recomputed from the rendered involvement (0 none,
  1 < 25 %, 2 25-50 %, 3 50-75 %, 4 > 75 %).

clinical.csv columns, copd: subject_id, age, sex (1 male), race (1 African American),
smoking_status (0 never, 1 former, 2 current), pack_years, fev1pp, fev1_fvc, gold (-1 PRISm),
prism, cle_score, paraseptal_score, exacerbation, survival_time (years), death, severity,
laa950_true, emphysema_true, centrilobular_true, paraseptal_true, panlobular_true (percent);
covid: subject_id, age, sex, covid_grade, involvement_true, ground_glass_true,
consolidation_true (percent).

LAA-950 measured on an image tracks emphysema_true, but not perfectly: scanner noise and HU
offset move it, small holes blur above -950 HU and panlobular change is only partly below it
(in version 2 also the kernel, dose and inspiration level).
"""
from __future__ import annotations

from drasclr.data.synthetic.cohort import (
    generate_cohort, plan_subject, render_subject, sample_clinical,
)
from drasclr.data.synthetic.transform import map_template_points

__all__ = ["generate_cohort", "map_template_points", "plan_subject", "render_subject",
           "sample_clinical"]
