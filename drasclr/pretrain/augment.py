"""Batched on-device augmentation of HU patches, every sample with its own draws.

The reference applies MONAI's RandAffine, RandGaussianNoise and RandAdjustContrast to one
patch at a time on the CPU (paper Section 3). Here the same transforms, in the same order, run
on a whole batch on the batch's device, on the HU + 1024 scale, as MONAI-style composable
transforms (``RandAffine``, ``RandGaussianNoise``, ``RandAdjustContrast``, each with its
probability and ranges). Their settings are an `AugmentConfig` (``TrainConfig.augment``) whose
defaults are the reference's values:

- random affine, probability 1: rotation U(-10, 10) degrees per axis, translation U(-12, 12)
  voxels per axis, scale 1 + U(-0.1, 0.1) per axis, bilinear, border padding, 32^3 output.
  Matrices compose as MONAI's ``AffineGrid`` does (rotate @ translate @ scale, rotation
  Rx @ Ry @ Rz as ``create_rotate``) about the patch centre, and are resampled by MONAI's
  batched ``AffineTransform`` layer;
- Gaussian noise, probability 0.25, std 50 (HU);
- contrast, probability 0.25: x <- ((x - min) / range) ** gamma * range + min per sample,
  gamma ~ U(0.5, 4.5) (MONAI's ``RandAdjustContrast`` defaults).

Then the network input is x / 632 - 1 (drasclr.intensity; like the reference, values that
noise pushed outside the window are not clipped again).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.layers import AffineTransform
from torch import Tensor, nn

from drasclr.data.patches import PATCH_SIZE
from drasclr.intensity import hu_to_window_offset, window_offset_to_input


def _setting(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of every augmentation; the defaults are the reference's."""

    enabled: bool = _setting("augment at all (false: clip and normalise only)", True)
    affine_prob: float = _setting("probability of the random affine per sample", 1.0)
    rotate_degrees: float = _setting("rotation U(-r, r) degrees about each axis", 10.0)
    translate_voxels: float = _setting("translation U(-t, t) voxels along each axis", 12.0)
    scale_range: float = _setting("scale 1 + U(-s, s) along each axis", 0.1)
    noise_prob: float = _setting("probability of Gaussian noise per sample", 0.25)
    noise_std: float = _setting("standard deviation of the Gaussian noise, in HU", 50.0)
    contrast_prob: float = _setting("probability of the gamma contrast change per sample", 0.25)
    contrast_gamma: tuple[float, float] = _setting("gamma U(low, high) of the contrast change",
                                                   (0.5, 4.5))

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"augment.enabled: expected true or false, got {self.enabled!r}")
        if not (isinstance(self.contrast_gamma, tuple) and len(self.contrast_gamma) == 2):
            raise ValueError(f"augment.contrast_gamma: expected (low, high), got {self.contrast_gamma!r}")
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:-1]}
        numbers.update(zip(("contrast_gamma low", "contrast_gamma high"), self.contrast_gamma))
        for name, value in numbers.items():
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"augment.{name}: expected a finite number >= 0, got {value!r}")
            if name.endswith("_prob") and value > 1:
                raise ValueError(f"augment.{name}: a probability must be in [0, 1], got {value!r}")
        if not 0 < self.contrast_gamma[0] <= self.contrast_gamma[1]:
            raise ValueError(f"augment.contrast_gamma: expected 0 < low <= high, "
                             f"got {self.contrast_gamma!r}")

    @classmethod
    def from_value(cls, value: "AugmentConfig | bool | dict", source: str = "config") -> "AugmentConfig":
        """From a mapping of fields, or the older ``augment: true/false``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, dict):
            raise ValueError(f"{source}: augment must be true, false or a mapping of "
                             f"{[f.name for f in dataclasses.fields(cls)]}, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{source}: unknown augment key(s) {unknown}; valid keys: {sorted(known)}")
        if "contrast_gamma" in value and isinstance(value["contrast_gamma"], list):
            value = {**value, "contrast_gamma": tuple(value["contrast_gamma"])}  # YAML has lists
        try:
            return cls(**value)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def compose_affine(angles: Tensor, translation: Tensor, scale: Tensor) -> Tensor:
    """(N, 4, 4) matrices R(angles) @ T(translation) @ S(scale), MONAI's composition order.

    Args:
        angles: (N, 3) radians about axes 0, 1, 2; R = Rx @ Ry @ Rz as MONAI's create_rotate.
        translation: (N, 3) voxels.
        scale: (N, 3) factors.
    """
    n = angles.shape[0]
    cos, sin = angles.cos(), angles.sin()
    eye = torch.eye(3, dtype=angles.dtype, device=angles.device).expand(n, 3, 3)
    rotations = []
    for axis in range(3):  # three axes, not a loop over samples
        a, b = [i for i in range(3) if i != axis]
        rot = eye.clone()
        rot[:, a, a], rot[:, b, b] = cos[:, axis], cos[:, axis]
        # create_rotate's sign pattern: about axis 1 the sine signs are flipped
        sign = -1.0 if axis == 1 else 1.0
        rot[:, a, b], rot[:, b, a] = -sign * sin[:, axis], sign * sin[:, axis]
        rotations.append(rot)
    linear = rotations[0] @ rotations[1] @ rotations[2]
    matrix = torch.zeros(n, 4, 4, dtype=angles.dtype, device=angles.device)
    matrix[:, :3, :3] = linear * scale[:, None, :]
    matrix[:, :3, 3] = (linear @ translation[:, :, None])[..., 0]
    matrix[:, 3, 3] = 1
    return matrix


def draw_affine(n: int, generator: torch.Generator, device: torch.device,
                rotate_degrees: float = AugmentConfig.rotate_degrees,
                translate_voxels: float = AugmentConfig.translate_voxels,
                scale_range: float = AugmentConfig.scale_range) -> Tensor:
    """(n, 4, 4) random affine matrices, one draw per sample and axis: rotation
    U(-rotate_degrees, rotate_degrees), translation U(-translate_voxels, translate_voxels),
    scale 1 + U(-scale_range, scale_range)."""
    uniform = lambda: torch.rand(n, 3, generator=generator, device=device) * 2 - 1  # noqa: E731
    return compose_affine(uniform() * math.radians(rotate_degrees), uniform() * translate_voxels,
                          1 + uniform() * scale_range)


def _per_sample(x: Tensor) -> tuple[int, ...]:
    """Shape of one value per sample of (N, C, ...), broadcastable against ``x``."""
    return (len(x),) + (1,) * (x.dim() - 1)


class RandAffine(nn.Module):
    """Random rotation, translation and scale about the patch centre, resampled to
    ``patch_size``^3 (MONAI's ``RandAffine``, batched; see `draw_affine` for the ranges).

    With ``prob`` 1 (the reference) every sample is transformed and no draw is spent on
    choosing; otherwise the samples not chosen are centre-cropped only."""

    def __init__(self, patch_size: int = PATCH_SIZE, prob: float = AugmentConfig.affine_prob,
                 rotate_degrees: float = AugmentConfig.rotate_degrees,
                 translate_voxels: float = AugmentConfig.translate_voxels,
                 scale_range: float = AugmentConfig.scale_range) -> None:
        super().__init__()
        self.patch_size, self.prob = patch_size, prob
        self.ranges = {"rotate_degrees": rotate_degrees, "translate_voxels": translate_voxels,
                       "scale_range": scale_range}
        # voxel-index coordinates (exact integer shifts); centring is done in `about_centre`
        self.resample = AffineTransform(
            spatial_size=(patch_size,) * 3, normalized=False, zero_centered=False,
            mode="bilinear", padding_mode="border", align_corners=False,
        )

    def about_centre(self, matrix: Tensor, input_size: int) -> Tensor:
        """Conjugate output->input voxel maps so they act about the patches' centres."""
        shift = torch.eye(4, dtype=matrix.dtype, device=matrix.device)
        to_input, from_output = shift.clone(), shift.clone()
        to_input[:3, 3] = (input_size - 1) / 2
        from_output[:3, 3] = -(self.patch_size - 1) / 2
        return to_input @ matrix @ from_output

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        matrix = draw_affine(len(x), generator, x.device, **self.ranges)
        if self.prob < 1:
            chosen = torch.rand(len(x), 1, 1, generator=generator, device=x.device) < self.prob
            matrix = torch.where(chosen, matrix, torch.eye(4, device=x.device))
        return self.resample(x, self.about_centre(matrix, x.shape[-1]))


class RandGaussianNoise(nn.Module):
    """Add N(0, std^2) noise to each sample with probability ``prob`` (MONAI's
    ``RandGaussianNoise``, batched)."""

    def __init__(self, prob: float = AugmentConfig.noise_prob,
                 std: float = AugmentConfig.noise_std) -> None:
        super().__init__()
        self.prob, self.std = prob, std

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        noisy = torch.rand(_per_sample(x), generator=generator, device=x.device) < self.prob
        noise = torch.randn(x.shape, generator=generator, device=x.device) * self.std
        return torch.where(noisy, x + noise, x)


class RandAdjustContrast(nn.Module):
    """Gamma contrast ``((x - min) / range) ** gamma * range + min`` of each sample with
    probability ``prob``, gamma ~ U(low, high) (MONAI's ``RandAdjustContrast``, batched)."""

    def __init__(self, prob: float = AugmentConfig.contrast_prob,
                 gamma: tuple[float, float] = AugmentConfig.contrast_gamma) -> None:
        super().__init__()
        self.prob, self.gamma = prob, gamma

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        adjusted = torch.rand(_per_sample(x), generator=generator, device=x.device) < self.prob
        low, high = self.gamma
        gamma = low + (high - low) * torch.rand(_per_sample(x), generator=generator, device=x.device)
        dims = tuple(range(1, x.dim()))
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        spread = hi - lo
        contrasted = ((x - lo) / (spread + 1e-7)) ** gamma * spread + lo
        return torch.where(adjusted, contrasted, x)


class PatchAugment(nn.Module):
    """HU patches -> normalised, augmented network inputs, a batch at a time: the window, then
    ``transforms`` in order (each draws per sample), then the network's input scale.

    Args:
        patch_size: output edge length (the encoder's 32).
        augment: an `AugmentConfig`, or True / False for the reference's settings / none
            (clip and normalise only).
    """

    def __init__(self, patch_size: int = PATCH_SIZE, augment: AugmentConfig | bool = True) -> None:
        super().__init__()
        self.config = AugmentConfig.from_value(augment, source="augment")
        c = self.config
        self.transforms = nn.ModuleList([
            RandAffine(patch_size, c.affine_prob, c.rotate_degrees, c.translate_voxels, c.scale_range),
            RandGaussianNoise(c.noise_prob, c.noise_std),
            RandAdjustContrast(c.contrast_prob, c.contrast_gamma),
        ] if c.enabled else [])

    def forward(self, patches: Tensor, generator: torch.Generator) -> Tensor:
        """(N, P, P, P) HU (any dtype) -> (N, 1, p, p, p) float32 in about [-1, 1].

        ``generator`` lives on the patches' device; all draws come from it, so a run that
        restores its state repeats the same augmentations.
        """
        if patches.dim() != 4:
            raise ValueError(f"patches: expected (N, P, P, P) HU patches, got {tuple(patches.shape)}")
        x = hu_to_window_offset(patches)[:, None]
        if len(x):
            for transform in self.transforms:
                x = transform(x, generator)
        return window_offset_to_input(x)
