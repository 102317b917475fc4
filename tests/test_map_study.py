"""Dense maps of held-out subjects (drasclr.evaluation.map_study): which subjects are held out,
and that their boxes never reach the classifier whose maps are scored on them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drasclr.evaluation import map_study
from drasclr.evaluation.detection_patches import DetectionPatches


def boxes(diseased: int = 6, healthy: int = 6, per_subject: int = 4) -> DetectionPatches:
    """Subjects sub0000.. with centrilobular and paraseptal boxes, then healthy-only ones."""
    rng = np.random.default_rng()
    ids = np.repeat([f"sub{i:04d}" for i in range(diseased + healthy)], per_subject)
    labels = np.where(np.arange(len(ids)) < diseased * per_subject,
                      np.tile(["centrilobular", "paraseptal"], len(ids) // 2), "healthy")
    n = len(ids)
    return DetectionPatches(ids, labels, rng.normal(size=(n, 3)), rng.normal(size=(n, 3)),
                            rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                            rng.integers(-1024, 240, (n, 32, 32, 32)).astype(np.int16))


def test_held_out_subjects_are_drawn_at_random_seeded_with_healthy_ones():
    data = boxes(diseased=12, healthy=10)
    diseased = {f"sub{i:04d}" for i in range(12)}
    draws = {}
    for seed in range(6):
        sick, healthy = map_study.held_out_subjects(data, "paraseptal", 3, seed)
        assert set(sick) <= diseased and len(set(sick)) == 3
        assert not set(healthy) & diseased and len(set(healthy)) == 3
        assert map_study.held_out_subjects(data, "paraseptal", 3, seed) == (sick, healthy)
        draws[seed] = tuple(sorted(sick))
    assert len(set(draws.values())) > 1  # another seed, another draw: not a ranking
    with pytest.raises(ValueError, match="subjects: expected 1 to 9 held out of the 12 "
                                         "subjects with paraseptal boxes and of the 10"):
        map_study.held_out_subjects(data, "paraseptal", 10)


def test_held_out_subjects_never_train_the_classifier_that_maps_them(tmp_path, monkeypatch):
    data = boxes()
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
    subjects = set(data.subject_ids)
    for subtype in ("centrilobular", "paraseptal"):
        held_out = {s for s, head, _ in mapped if subtype in head}
        assert held_out == set(sum(map_study.held_out_subjects(data, subtype, 2), []))
        assert len(held_out) == 4 and trained_on[subtype] == subjects - held_out
    assert all(step == 3 for *_, step in mapped) and len(evaluations) == 8
    assert all(str(lesions).endswith(f"lesions/{s}.nii.gz") for s, lesions in evaluations)

    calls = len(trained_on)
    trained_on.clear()
    map_study.held_out_maps(data, None, tmp_path / "cohort", tmp_path / "store", tmp_path / "maps",
                            subjects=2, step=3)
    assert not trained_on and calls == 2  # a re-run reuses the fitted heads
