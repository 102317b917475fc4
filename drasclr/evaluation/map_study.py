"""Dense maps of held-out subjects, scored against their true lesions (Yu et al. 2023,
Section 4.3.1, Fig. 3).

The paper shows probability maps of its fine-tuned subtype classifiers; on a synthetic cohort
the true lesion of every voxel is known, so the maps can be scored. For each subtype, the
``subjects`` subjects with the largest true share of it are held out; the classifier is
fine-tuned from the encoder on the labelled boxes of every other subject
(:func:`drasclr.evaluation.detection.save_detection_heads`), then each held-out scan is mapped
with :func:`drasclr.evaluation.densemap.densemap` and scored with
:func:`~drasclr.evaluation.densemap.evaluate_map` (voxel AUC and Dice against the lesion mask,
box-level detection by the paper's rule). Held out, so no map is scored on boxes its
classifier was trained on.

The cohort folder is the synthetic generator's (``drasclr synth``): ``images/<id>.nii.gz``,
``lesions/<id>.nii.gz`` and ``truth/<id>.json`` with the realised subtype shares.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from drasclr.evaluation.densemap import MapEvaluation, densemap, evaluate_map
from drasclr.evaluation.detection import (
    SUBTYPES, DetectionConfig, save_detection_heads, task_subset)
from drasclr.evaluation.detection_patches import DetectionPatches


def subjects_with_most(cohort: str | Path, subtype: str, count: int,
                       candidates: Sequence[str]) -> list[str]:
    """The ``count`` subjects of ``candidates`` with the largest realised share of ``subtype``
    (the cohort's ``truth/<id>.json``)."""
    shares = {}
    for subject in candidates:
        path = Path(cohort) / "truth" / f"{subject}.json"
        try:
            shares[subject] = json.loads(path.read_text())["disease"]["realised_shares"][subtype]
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no truth record (a synthetic cohort folder is "
                                    "needed for maps scored against true lesions)") from None
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: no realised share of {subtype!r} in the truth record"
                             ) from None
    return sorted(shares, key=lambda s: (-shares[s], s))[:count]


def held_out_maps(data: DetectionPatches, encoder: nn.Module, cohort: str | Path,
                  store: str | Path, out: str | Path, annotations: str | Path | None = None,
                  config: DetectionConfig = DetectionConfig(),
                  subtypes: Sequence[str] = SUBTYPES, subjects: int = 2, step: int = 4,
                  source: str = "encoder", progress: bool = False) -> list[MapEvaluation]:
    """Per subtype, fine-tune on the boxes of all but ``subjects`` held-out subjects, map those
    at ``step`` and score each map (boxes of ``annotations`` by the paper's rule, when given);
    maps and heads are written under ``out``."""
    cohort, out = Path(cohort), Path(out)
    evaluations = []
    for subtype in subtypes:
        rows, _, groups = task_subset(data, subtype)
        candidates = np.unique(groups)
        if not 1 <= subjects < len(candidates):
            raise ValueError(f"subjects: expected 1 to {len(candidates) - 1} held out of the "
                             f"{len(candidates)} subjects with {subtype} or healthy boxes, got "
                             f"{subjects!r}")
        held_out = subjects_with_most(cohort, subtype, subjects, candidates)
        training = data.subset(~np.isin(data.subject_ids, held_out))
        head_dir = out / f"heads_without_{'_'.join(held_out)}"
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
