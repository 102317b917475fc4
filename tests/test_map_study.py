"""Dense maps of held-out subjects (drasclr.evaluation.map_study): which subjects are held out,
and that their boxes never reach the classifier whose maps are scored on them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drasclr.evaluation import map_study
from drasclr.evaluation.detection_patches import DetectionPatches


def write_truth(cohort: Path, shares: dict[str, dict[str, float]]) -> None:
    (cohort / "truth").mkdir(parents=True, exist_ok=True)
    for subject, realised in shares.items():
        record = {"disease": {"realised_shares": realised}}
        (cohort / "truth" / f"{subject}.json").write_text(json.dumps(record))


def random_shares(rng, subjects):
    return {s: {"centrilobular": float(rng.uniform(0, 0.3)), "paraseptal": float(rng.uniform(0, 0.3))}
            for s in subjects}


def test_subjects_with_most_rank_by_the_true_share(tmp_path):
    rng = np.random.default_rng()
    subjects = [f"sub{i:04d}" for i in range(7)]
    shares = random_shares(rng, subjects)
    write_truth(tmp_path, shares)
    for subtype in ("centrilobular", "paraseptal"):
        expected = sorted(subjects, key=lambda s: -shares[s][subtype])[:3]
        assert map_study.subjects_with_most(tmp_path, subtype, 3, subjects) == expected
    assert map_study.subjects_with_most(tmp_path, "paraseptal", 2, subjects[:2]) == \
        sorted(subjects[:2], key=lambda s: -shares[s]["paraseptal"])


def test_subjects_with_most_errors_name_the_file(tmp_path):
    write_truth(tmp_path, {"sub0000": {"centrilobular": 0.1}})
    with pytest.raises(FileNotFoundError, match="sub0001.json: no truth record"):
        map_study.subjects_with_most(tmp_path, "centrilobular", 1, ["sub0000", "sub0001"])
    with pytest.raises(ValueError, match="sub0000.json: no realised share of 'paraseptal'"):
        map_study.subjects_with_most(tmp_path, "paraseptal", 1, ["sub0000"])


def test_held_out_subjects_never_train_the_classifier_that_maps_them(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    subjects = [f"sub{i:04d}" for i in range(6)]
    shares = random_shares(rng, subjects)
    write_truth(tmp_path / "cohort", shares)
    ids = np.repeat(subjects, 6)
    labels = np.tile(["centrilobular", "paraseptal", "healthy"], 12)
    n = len(ids)
    data = DetectionPatches(ids, labels, rng.normal(size=(n, 3)), rng.normal(size=(n, 3)),
                            rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                            rng.integers(-1024, 240, (n, 32, 32, 32)).astype(np.int16))
    trained_on, mapped = {}, []

    def fit_heads(training, encoder, head_dir, source, config, subtypes, kinds):
        assert kinds == ("finetune",) and len(subtypes) == 1
        trained_on[subtypes[0]] = set(training.subject_ids)
        head_dir.mkdir(parents=True, exist_ok=True)
        (head_dir / f"head_{subtypes[0]}_finetune.pt").write_bytes(b"head")

    def fake_densemap(image, store, out, head_path, subject_id, **kwargs):
        mapped.append((subject_id, Path(head_path).name, kwargs["step"]))
        return subject_id

    monkeypatch.setattr(map_study, "save_detection_heads", fit_heads)
    monkeypatch.setattr(map_study, "densemap", fake_densemap)
    monkeypatch.setattr(map_study, "evaluate_map", lambda result, lesions, boxes: (result, lesions))
    evaluations = map_study.held_out_maps(data, None, tmp_path / "cohort", tmp_path / "store",
                                          tmp_path / "maps", subjects=2, step=3)
    for subtype in ("centrilobular", "paraseptal"):
        held_out = set(sorted(subjects, key=lambda s: -shares[s][subtype])[:2])
        assert trained_on[subtype] == set(subjects) - held_out
        assert {s for s, head, _ in mapped if subtype in head} == held_out
    assert all(step == 3 for *_, step in mapped) and len(evaluations) == 4
    assert all(str(lesions).endswith(f"lesions/{s}.nii.gz") for s, lesions in evaluations)

    calls = len(trained_on)
    trained_on.clear()
    map_study.held_out_maps(data, None, tmp_path / "cohort", tmp_path / "store", tmp_path / "maps",
                            subjects=2, step=3)
    assert not trained_on and calls == 2  # a re-run reuses the fitted heads
    with pytest.raises(ValueError, match="subjects: expected 1 to 5 held out of the 6"):
        map_study.held_out_maps(data, None, tmp_path / "cohort", tmp_path / "store",
                                tmp_path / "maps", subjects=6)
