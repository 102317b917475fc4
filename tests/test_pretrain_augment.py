"""Batched augmentation: MONAI's matrices, the reference's ranges as configurable defaults,
per-sample independent draws."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from monai.transforms.utils import create_rotate, create_scale, create_translate

from drasclr.pretrain.augment import (
    AugmentConfig, PatchAugment, RandAdjustContrast, RandAffine, RandGaussianNoise, compose_affine,
    draw_affine,
)
from drasclr.pretrain.config import TrainConfig


def _recover(matrix):
    """Angles, translation, scale of R(angles) @ T(t) @ S(scale) (R = Rx Ry Rz)."""
    linear = matrix[:, :3, :3]
    scale = linear.norm(dim=1)
    rot = linear / scale[:, None, :]
    b = torch.asin(rot[:, 0, 2].clamp(-1, 1))
    a = torch.atan2(-rot[:, 1, 2], rot[:, 2, 2])
    c = torch.atan2(-rot[:, 0, 1], rot[:, 0, 0])
    translation = (rot.transpose(1, 2) @ matrix[:, :3, 3:])[..., 0]
    return torch.stack([a, b, c], 1), translation, scale


def test_compose_matches_monai_matrices():
    gen = torch.Generator().manual_seed(0)
    angles = (torch.rand(4, 3, generator=gen, dtype=torch.float64) - 0.5)
    translation = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 5
    scale = 1 + (torch.rand(4, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.2
    got = compose_affine(angles, translation, scale)
    for i in range(4):
        want = (create_rotate(3, angles[i].tolist()) @ create_translate(3, translation[i].tolist())
                @ create_scale(3, scale[i].tolist()))
        np.testing.assert_allclose(got[i].numpy(), want, atol=1e-12)


def test_drawn_parameters_span_spec_ranges():
    n = 2000
    matrices = draw_affine(n, torch.Generator().manual_seed(1), torch.device("cpu")).double()
    angles, translation, scale = _recover(matrices)
    torch.testing.assert_close(compose_affine(angles, translation, scale), matrices, atol=1e-6, rtol=0)
    for values, bound in ((angles, math.pi / 18), (translation, 12.0), (scale - 1, 0.1)):
        assert values.abs().max() <= bound * (1 + 1e-5)
        # every axis drawn independently and over the whole range (uniform: |x| mean = bound / 2)
        assert (values.abs().amax(0) > 0.97 * bound).all()
        torch.testing.assert_close(values.abs().mean(0), torch.full((3,), bound / 2, dtype=torch.float64),
                                   rtol=0.06, atol=0)
    assert np.corrcoef(angles.T.numpy())[0, 1] < 0.1  # axes independent


def _smooth_volume(n, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, size)
    z, y, x = torch.meshgrid(grid, grid, grid, indexing="ij")
    freq = torch.rand(n, 3, 1, 1, 1, generator=gen) * 4 + 1
    return 600 + 500 * torch.sin(freq[:, 0] * z * 3 + freq[:, 1] * y * 2) * torch.cos(freq[:, 2] * x * 2)


def test_resampling_translates_in_voxels():
    volume = _smooth_volume(2)[:, None]
    shift = torch.tensor([2.0, -3.0, 1.0], dtype=torch.float64)
    matrix = compose_affine(torch.zeros(2, 3, dtype=torch.float64), shift.expand(2, 3),
                            torch.ones(2, 3, dtype=torch.float64)).float()
    aug = RandAffine(32)
    out = aug.resample(volume, aug.about_centre(matrix, 32))
    # output voxel v samples input voxel v + shift
    torch.testing.assert_close(out[:, :, 0:29, 3:32, 0:31], volume[:, :, 2:31, 0:29, 1:32],
                               atol=1e-2, rtol=1e-4)
    identity = aug.resample(volume, aug.about_centre(torch.eye(4).expand(2, 4, 4), 32))
    torch.testing.assert_close(identity, volume, atol=1e-2, rtol=1e-4)
    # a rotation by pi/2 about axis 2 turns the patch about its centre: (i, j) -> (j, 31 - i)
    quarter = torch.tensor([[0.0, 0.0, math.pi / 2]] * 2, dtype=torch.float64)
    turn = compose_affine(quarter, torch.zeros(2, 3, dtype=torch.float64),
                          torch.ones(2, 3, dtype=torch.float64))
    turned = aug.resample(volume, aug.about_centre(turn.float(), 32))
    torch.testing.assert_close(turned, volume.transpose(2, 3).flip(3), atol=1e-2, rtol=1e-4)


def test_noise_probability_and_std():
    x = torch.full((800, 1, 6, 6, 6), 500.0)
    out = RandGaussianNoise()(x, torch.Generator().manual_seed(2))
    noisy = (out != x).flatten(1).any(1)
    assert 0.2 < noisy.float().mean() < 0.3
    residual = (out - x)[noisy]
    assert abs(residual.std().item() - 50) < 1.5 and abs(residual.mean().item()) < 1.5


def test_contrast_probability_and_gamma_range():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(800, 1, 5, 5, 5, generator=gen) * 1264
    out = RandAdjustContrast()(x, torch.Generator().manual_seed(4))
    changed = ~torch.isclose(out, x, atol=1e-2).flatten(1).all(1)
    assert 0.2 < changed.float().mean() < 0.3
    flat_x, flat_y = x[changed].flatten(1).double(), out[changed].flatten(1).double()
    lo, hi = flat_x.amin(1, keepdim=True), flat_x.amax(1, keepdim=True)
    u, v = (flat_x - lo) / (hi - lo), (flat_y - lo) / (hi - lo)
    inner = (u > 0.2) & (u < 0.8)
    gamma = torch.where(inner, v.clamp_min(1e-12).log() / u.log(), torch.nan)
    per_sample = gamma.nanmedian(1).values
    assert per_sample.min() >= 0.5 - 1e-2 and per_sample.max() <= 4.5 + 1e-2
    assert per_sample.min() < 0.8 and per_sample.max() > 4.0  # spans MONAI's default range
    # one gamma per sample
    assert (gamma.nan_to_num(0) - per_sample[:, None]).abs().where(inner, 0).max() < 0.02


def test_full_pipeline_normalises_and_draws_per_sample():
    hu = (_smooth_volume(6, seed=5) - 1500).to(torch.int16)  # HU around -900
    gen = torch.Generator().manual_seed(6)
    out = PatchAugment()(hu, gen)
    assert out.shape == (6, 1, 32, 32, 32) and out.dtype == torch.float32
    plain = PatchAugment(augment=False)(hu, gen)
    torch.testing.assert_close(plain[:, 0], (hu.float().clamp(-1024, 240) + 1024) / 632 - 1)
    twice = PatchAugment()(hu[:1].expand(6, 32, 32, 32), gen)  # same patch, six different views
    assert all(not torch.allclose(twice[0], twice[i]) for i in range(1, 6))
    with pytest.raises(ValueError, match="patches"):
        PatchAugment()(hu[:, None], gen)


def test_defaults_are_the_reference_values():
    """The authors' settings (MONAI RandAffine prob 1, rotate pi/18, translate 12, scale 0.1;
    RandGaussianNoise prob 0.25 std 50; RandAdjustContrast prob 0.25, gamma (0.5, 4.5))."""
    config = AugmentConfig()
    assert (config.enabled, config.affine_prob, math.radians(config.rotate_degrees),
            config.translate_voxels, config.scale_range) == (True, 1.0, math.pi / 18, 12.0, 0.1)
    assert (config.noise_prob, config.noise_std) == (0.25, 50.0)
    assert (config.contrast_prob, config.contrast_gamma) == (0.25, (0.5, 4.5))
    assert TrainConfig().augment == config and PatchAugment().config == config


@pytest.mark.parametrize("setting,index,bound", [
    ({"rotate_degrees": 30.0}, 0, math.radians(30)), ({"translate_voxels": 3.0}, 1, 3.0),
    ({"scale_range": 0.3}, 2, 0.3), ({"translate_voxels": 0.0}, 1, 0.0),
])
def test_changing_a_range_changes_the_drawn_affine(setting, index, bound):
    n = 2000
    matrices = draw_affine(n, torch.Generator().manual_seed(1), torch.device("cpu"), **setting).double()
    values = _recover(matrices)[index] - (1 if index == 2 else 0)
    assert values.abs().max() <= bound * (1 + 1e-5) + 1e-6
    if bound:
        assert (values.abs().amax(0) > 0.97 * bound).all()


def test_config_reaches_the_sampled_views():
    hu = (_smooth_volume(8, seed=5) - 1500).to(torch.int16)
    plain = PatchAugment(augment=False)(hu, torch.Generator().manual_seed(0))
    still = AugmentConfig(rotate_degrees=0, translate_voxels=0, scale_range=0, noise_prob=0,
                          contrast_prob=0)
    torch.testing.assert_close(PatchAugment(augment=still)(hu, torch.Generator().manual_seed(0)),
                               plain, atol=1e-4, rtol=0)  # an identity affine, nothing else
    noisy = PatchAugment(augment=dataclasses.replace(still, noise_prob=1.0, noise_std=100.0))
    residual = (noisy(hu, torch.Generator().manual_seed(0)) - plain) * 632  # back to HU
    assert abs(residual.std().item() - 100) < 2
    half = PatchAugment(augment=dataclasses.replace(AugmentConfig(), affine_prob=0.5, noise_prob=0,
                                                    contrast_prob=0))
    moved = ~torch.isclose(half(hu.repeat(25, 1, 1, 1), torch.Generator().manual_seed(1)),
                           plain.repeat(25, 1, 1, 1, 1), atol=1e-4).flatten(1).all(1)
    assert 0.25 < moved.float().mean() < 0.75


def test_train_config_takes_a_mapping_or_the_old_bool(tmp_path):
    assert TrainConfig.from_dict({"augment": False}).augment == AugmentConfig(enabled=False)
    assert TrainConfig.from_dict({"augment": True}).augment == AugmentConfig()
    config = TrainConfig.from_dict({"augment": {"noise_std": 20.0, "contrast_gamma": [1.0, 2.0]}})
    assert config.augment == AugmentConfig(noise_std=20.0, contrast_gamma=(1.0, 2.0))
    assert TrainConfig.load(config.save(tmp_path / "run.yaml")) == config
    with pytest.raises(ValueError, match=r"unknown augment key\(s\) \['noise'\]"):
        TrainConfig.from_dict({"augment": {"noise": 1.0}})
    with pytest.raises(ValueError, match="augment.noise_prob: a probability must be in"):
        TrainConfig.from_dict({"augment": {"noise_prob": 1.5}})
    with pytest.raises(ValueError, match="contrast_gamma: expected 0 < low <= high"):
        AugmentConfig(contrast_gamma=(2.0, 1.0))
