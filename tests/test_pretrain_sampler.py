"""Landmark-grouped batch plans: coverage, grouping, determinism, resume, DDP split."""
import numpy as np
import pytest

from drasclr.pretrain.sampler import LandmarkBatchSampler


def _pairs(batches):
    return [(int(s), int(l)) for b in batches for s, l in zip(b.subjects, b.landmarks)]


@pytest.mark.parametrize("subjects,landmarks,batch,groups", [
    (8, 12, 16, 4),    # exact fit: every batch 4 landmarks x 4 subjects
    (7, 5, 6, 2),      # ragged: 7 subjects in chunks of 3, 5 landmarks in pairs
    (6, 4, 4, 1),      # the reference's mode: one landmark per batch
])
def test_every_pair_once_per_epoch(subjects, landmarks, batch, groups):
    sampler = LandmarkBatchSampler(subjects, landmarks, batch, groups, seed=3)
    batches = list(sampler.batches(epoch=0))
    assert len(batches) == len(sampler)
    pairs = _pairs(batches)
    assert sorted(pairs) == [(s, l) for s in range(subjects) for l in range(landmarks)]
    for b in batches:
        assert len(b.subjects) <= batch and len(np.unique(b.landmarks)) <= groups
        for l in np.unique(b.landmarks):  # a landmark's subjects in a batch are distinct
            assert len(set(b.subjects[b.landmarks == l])) == (b.landmarks == l).sum()
    if subjects % (batch // groups) == 0:
        full = [b for b in batches if len(b.subjects) == batch]
        assert len(full) >= len(batches) - 1
        assert all(np.bincount(b.landmarks).max() == batch // groups for b in full)


def test_deterministic_per_seed_and_epoch_and_resumable():
    sampler = LandmarkBatchSampler(8, 12, 16, 4, seed=3)
    first = _pairs(sampler.batches(0))
    assert first == _pairs(LandmarkBatchSampler(8, 12, 16, 4, seed=3).batches(0))
    assert first != _pairs(sampler.batches(1))
    assert first != _pairs(LandmarkBatchSampler(8, 12, 16, 4, seed=4).batches(0))
    resumed = list(sampler.batches(0, start=2))
    assert resumed[0].index == 2 and _pairs(resumed) == _pairs(list(sampler.batches(0))[2:])


def test_ddp_ranks_split_each_batch():
    ranks = [list(LandmarkBatchSampler(8, 12, 16, 4, seed=1, rank=r, world_size=2).batches(0))
             for r in range(2)]
    whole = list(LandmarkBatchSampler(8, 12, 16, 4, seed=1).batches(0))
    for b0, b1, b in zip(*ranks, whole):
        assert len(b0.subjects) == len(b1.subjects) == 8
        np.testing.assert_array_equal(np.concatenate([b0.subjects, b1.subjects]), b.subjects)
        np.testing.assert_array_equal(np.concatenate([b0.landmarks, b1.landmarks]), b.landmarks)
        assert len(np.unique(b0.landmarks)) == 2  # whole landmark groups per rank


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        LandmarkBatchSampler(8, 12, 10, 4)
    with pytest.raises(ValueError, match="exceeds"):
        LandmarkBatchSampler(8, 3, 8, 4)
