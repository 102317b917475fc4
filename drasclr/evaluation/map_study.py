"""Dense maps of held-out subjects, scored against their true lesions (Yu et al. 2023,
Section 4.3.1, Fig. 3).

The paper shows probability maps of its fine-tuned subtype classifiers; on a synthetic cohort
the true lesion of every voxel is known, so the maps can be scored. For each subtype,
``subjects`` subjects with boxes of it and as many with only healthy boxes are drawn at random
(seeded by ``config.seed``; not the most diseased ones, which would flatter the maps), so that
healthy boxes are scored too and false positives count. The classifier is fine-tuned from the
encoder on the labelled boxes of every other subject
(:func:`drasclr.evaluation.detection.save_detection_heads`, whose head file records them), then
each held-out scan is mapped with :func:`drasclr.evaluation.densemap.densemap` and scored with
:func:`~drasclr.evaluation.densemap.evaluate_map` (voxel AUC and Dice against the lesion mask,
box-level detection by the paper's rule, which refuses boxes the head was trained on).

The cohort folder is the synthetic generator's (``drasclr synth``): ``images/<id>.nii.gz`` and
``lesions/<id>.nii.gz``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from drasclr.evaluation.densemap import MapEvaluation, densemap, evaluate_map
from drasclr.evaluation.detection import (
    HEALTHY, SUBTYPES, DetectionConfig, save_detection_heads, task_subset)
from drasclr.evaluation.detection_patches import DetectionPatches


def held_out_subjects(data: DetectionPatches, subtype: str, count: int,
                      seed: int = 0) -> tuple[list[str], list[str]]:
    """(diseased, healthy): ``count`` subjects drawn at random among those with ``subtype``
    boxes and ``count`` among those whose boxes are all healthy, seeded; each group keeps at
    least one subject for training.

    Raises:
        ValueError: ``count`` below 1, or not below the number of subjects of either group.
    """
    _, y, groups = task_subset(data, subtype)
    diseased = np.unique(groups[y == 1])
    healthy = np.setdiff1d(np.unique(data.subject_ids[data.labels == HEALTHY]),
                           np.unique(data.subject_ids[data.labels != HEALTHY]))
    if not isinstance(count, (int, np.integer)) or not 1 <= count < min(len(diseased),
                                                                        len(healthy)):
        raise ValueError(f"subjects: expected 1 to {min(len(diseased), len(healthy)) - 1} held "
                         f"out of the {len(diseased)} subjects with {subtype} boxes and of the "
                         f"{len(healthy)} with only healthy boxes, got {count!r}")
    rng = np.random.default_rng(seed)
    return ([str(s) for s in rng.choice(diseased, count, replace=False)],
            [str(s) for s in rng.choice(healthy, count, replace=False)])


def held_out_maps(data: DetectionPatches, encoder: nn.Module, cohort: str | Path,
                  store: str | Path, out: str | Path, annotations: str | Path | None = None,
                  config: DetectionConfig = DetectionConfig(),
                  subtypes: Sequence[str] = SUBTYPES, subjects: int = 2, step: int = 4,
                  source: str = "encoder", progress: bool = False) -> list[MapEvaluation]:
    """Per subtype, hold out ``subjects`` diseased and ``subjects`` healthy subjects
    (:func:`held_out_subjects`), fine-tune on the boxes of all others, map the held-out ones
    at ``step`` and score each map (boxes of ``annotations`` by the paper's rule, when given);
    maps and heads are written under ``out``."""
    cohort, out = Path(cohort), Path(out)
    evaluations = []
    for subtype in subtypes:
        diseased, healthy = held_out_subjects(data, subtype, subjects, config.seed)
        held_out = diseased + healthy
        training = data.subset(~np.isin(data.subject_ids, held_out))
        head_dir = out / f"heads_without_{'_'.join(sorted(held_out))}"
        head_path = head_dir / f"head_{subtype}_finetune.pt"
        if not head_path.exists():  # a re-run reuses the fitted head
            save_detection_heads(training, encoder, head_dir, source, config, [subtype],
                                 ("finetune",))
        for subject in held_out:
            result = densemap(cohort / "images" / f"{subject}.nii.gz", store,
                              out / f"{subject}_{subtype}.nii.gz", head_path, subject_id=subject,
                              step=step, device=config.torch_device, progress=progress)
            evaluations.append(evaluate_map(result, cohort / "lesions" / f"{subject}.nii.gz",
                                            annotations))
    return evaluations
