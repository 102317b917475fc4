"""Batched on-device augmentation of HU patches, every sample with its own draws.

Yu et al. 2023, Section 3 (the authors' code applies MONAI's RandAffine, RandGaussianNoise and
RandAdjustContrast to one patch at a time on the CPU). Here the same transforms run on a whole
batch on the batch's device, on the HU + 1024 scale, in the reference's order:

- random affine, probability 1: rotation U(-pi/18, pi/18) per axis, translation U(-12, 12)
  voxels per axis, scale 1 + U(-0.1, 0.1) per axis, bilinear, border padding, 32^3 output.
  Matrices compose as MONAI's ``AffineGrid`` does (rotate @ translate @ scale, rotation
  Rx @ Ry @ Rz as ``create_rotate``) about the patch centre, and are resampled by MONAI's
  batched ``AffineTransform`` layer;
- Gaussian noise, probability 0.25, std 50 (HU);
- contrast, probability 0.25: x <- ((x - min) / range) ** gamma * range + min per sample,
  gamma ~ U(0.5, 4.5) (MONAI's ``RandAdjustContrast`` defaults).

Then the network input is x / 632 - 1 (Yu et al. 2023, Section 4.1; like the authors' code, values
that noise pushed outside the window are not clipped again).
"""
from __future__ import annotations

import math

import torch
from monai.networks.layers import AffineTransform
from torch import Tensor, nn

from drasclr.intensity import HALF_WINDOW, HU_WINDOW

ROTATION_RANGE = math.pi / 18
TRANSLATION_RANGE = 12.0
SCALE_RANGE = 0.1
NOISE_PROB, NOISE_STD = 0.25, 50.0
CONTRAST_PROB, GAMMA_RANGE = 0.25, (0.5, 4.5)


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


def draw_affine(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(n, 4, 4) random affine matrices with the authors' ranges, one draw per sample."""
    uniform = lambda: torch.rand(n, 3, generator=generator, device=device) * 2 - 1  # noqa: E731
    return compose_affine(
        uniform() * ROTATION_RANGE, uniform() * TRANSLATION_RANGE, 1 + uniform() * SCALE_RANGE
    )


class PatchAugment(nn.Module):
    """HU patches -> normalised, augmented network inputs, a batch at a time.

    Args:
        patch_size: output edge length (the encoder's 32).
        augment: False skips the random transforms (clip and normalise only).
    """

    def __init__(self, patch_size: int = 32, augment: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.augment = augment
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

    def forward(self, patches: Tensor, generator: torch.Generator) -> Tensor:
        """(N, P, P, P) HU (any dtype) -> (N, 1, p, p, p) float32 in about [-1, 1].

        ``generator`` lives on the patches' device; all draws come from it, so a run that
        restores its state repeats the same augmentations.
        """
        if patches.dim() != 4:
            raise ValueError(f"patches: expected (N, P, P, P) HU patches, got {tuple(patches.shape)}")
        x = patches.float().clamp(*HU_WINDOW)[:, None] - HU_WINDOW[0]
        if self.augment and len(x):
            x = self._augment(x, generator)
        return x / HALF_WINDOW - 1

    def _augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        matrix = draw_affine(x.shape[0], generator, x.device)
        x = self.resample(x, self.about_centre(matrix, x.shape[-1]))
        return random_contrast(random_noise(x, generator), generator)


def random_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    """Add N(0, 50^2) noise to each sample of (N, C, ...) with probability 0.25."""
    noisy = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device) * NOISE_STD
    return torch.where(noisy < NOISE_PROB, x + noise, x)


def random_contrast(x: Tensor, generator: torch.Generator) -> Tensor:
    """Gamma contrast of each sample with probability 0.25, gamma ~ U(0.5, 4.5) (MONAI's)."""
    per_sample = (len(x),) + (1,) * (x.dim() - 1)
    adjusted = torch.rand(per_sample, generator=generator, device=x.device) < CONTRAST_PROB
    low, high = GAMMA_RANGE
    gamma = low + (high - low) * torch.rand(per_sample, generator=generator, device=x.device)
    dims = tuple(range(1, x.dim()))
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    spread = hi - lo
    contrasted = ((x - lo) / (spread + 1e-7)) ** gamma * spread + lo
    return torch.where(adjusted, contrasted, x)
