"""Version 2: a subject's body, lung shape and inspiration as its template -> subject mapping.

The atlas is the mean shape; a subject differs from it by

- body size (all axes) and lung volume: the inspiration level ``q`` (scan volume over the
  volume at full inspiration) and emphysema's hyperinflation stretch mostly craniocaudally
  (the diaphragm moves), less antero-posteriorly and least laterally;
- a rotation and shift (the pose);
- non-rigid shape modes: diaphragm height and heart size;
- a random smooth B-spline field, scaled so that the residual misalignment after the best
  affine fit (what an affine registration can at most recover) is ``RESIDUAL_RMS_MM`` RMS over
  the lungs of a full-size chest, and that times the size's scale for the half-size chest of
  the small size: a smooth field's steepest gradient grows as its residual over the lung's
  size, and a half-size chest with the full residual would fold.

The same mapping model as version 1 (``transform.py``: x = A^-1 y + u(y)) carries it, on a
coarser control lattice, with the non-affine part capped so that the map stays invertible and
the fixed-point iteration of ``template_to_subject`` contracts.
"""
from __future__ import annotations

import numpy as np

from drasclr.data.synthetic.anatomy import SizeSpec
from drasclr.data.synthetic.transform import SubjectTransform

MAX_ROTATION_DEG = 8.0
MAX_SHIFT_MM = 10.0
BODY_SIZE_SD = 0.05
#: Scan lung volume over full-inspiration volume (coached breath-holds fall short of TLC).
INSPIRATION_RANGE = (0.82, 1.04)
#: Share of a volume change taken by (x, y, z): the diaphragm moves most.
VOLUME_AXIS_EXPONENTS = np.array([0.15, 0.25, 0.60])
#: Lung volume gain per unit emphysema share (hyperinflation).
HYPERINFLATION = 0.8
DIAPHRAGM_SD_MM = 6.0
HEART_SCALE_SD = 0.12
RESIDUAL_RMS_MM = (5.5, 8.0)
#: The non-affine part's largest gradient times the pose's scale stays below this.
MAX_CONTRACTION = 0.8
#: Corrections of the random field's gain on the forward map.
CALIBRATION_STEPS = 2
#: Control lattice: this many intervals across the largest side of the field of view.
LATTICE_INTERVALS = 4


def draw_shape(rng: np.random.Generator, spec: SizeSpec, sex: int, emphysema: float) -> dict:
    """The shape parameters of one subject (the truth record's ``anatomy.shape``)."""
    return {
        "body_size": float(np.clip(rng.normal(1.0 + 0.03 * (sex - 0.5), BODY_SIZE_SD),
                                   0.88, 1.12)),
        "inspiration": float(rng.uniform(*INSPIRATION_RANGE)),
        "hyperinflation": float(1.0 + HYPERINFLATION * emphysema),
        "rotation_deg": rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3).tolist(),
        "shift_mm": rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3).tolist(),
        "diaphragm_mm": float(rng.normal(0.0, DIAPHRAGM_SD_MM * spec.scale)),
        "heart_scale": float(rng.normal(0.0, HEART_SCALE_SD)),
        "residual_rms_mm": float(rng.uniform(*RESIDUAL_RMS_MM) * spec.scale),
    }


def shape_pose(shape: dict) -> np.ndarray:
    """The affine part A (4, 4) of a subject's mapping: rotation, size, volume, shift."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(shape["rotation_deg"])):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    volume = shape["inspiration"] * shape["hyperinflation"]
    scale = shape["body_size"] * volume**VOLUME_AXIS_EXPONENTS
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(scale)
    affine[:3, 3] = shape["shift_mm"]
    return affine


def _modes(template_points: np.ndarray, shape: dict, k: float) -> np.ndarray:
    """Displacements (template mm) of the diaphragm and heart modes at template points."""
    x, y, z = template_points.T
    # A higher diaphragm: subject points of the lower chest come from lower template points.
    lower = np.clip((40 * k - z) / (80 * k), 0.0, 1.0)
    lower = lower * lower * (3 - 2 * lower)
    displacement = np.zeros_like(template_points)
    displacement[:, 2] = -shape["diaphragm_mm"] * lower
    heart = np.array([-10 * k, 22 * k, -58 * k])
    offset = template_points - heart
    weight = np.exp(-np.sum(offset**2, 1) / (2 * (50 * k) ** 2))
    displacement -= shape["heart_scale"] * offset * weight[:, None]
    return displacement


def _affine_residual(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` (N, 3) minus their least-squares affine fit in ``points`` (N, 3)."""
    design = np.c_[points, np.ones(len(points))]
    return values - design @ np.linalg.lstsq(design, values, rcond=None)[0]


def shape_transform(rng: np.random.Generator, shape: dict, spec: SizeSpec,
                    field_of_view: tuple[np.ndarray, np.ndarray],
                    lung_points: np.ndarray) -> SubjectTransform:
    """The subject's full mapping: pose, shape modes and a calibrated random field.

    Args:
        lung_points: (N, 3) template mm of lung voxels, where the residual is calibrated.
    """
    pose = shape_pose(shape)
    low, high = (np.asarray(v, float) for v in field_of_view)
    spacing = float(np.max(high - low)) / LATTICE_INTERVALS
    counts = np.ceil((high - low) / spacing).astype(int) + 4
    origin = low - spacing
    control = np.stack(np.meshgrid(*[origin[a] + spacing * np.arange(n)
                                     for a, n in enumerate(counts)], indexing="ij"), -1)
    inverse = np.linalg.inv(pose)
    modes = _modes(control.reshape(-1, 3) @ inverse[:3, :3].T + inverse[:3, 3], shape,
                   spec.scale).reshape(control.shape)
    noise = rng.standard_normal(control.shape)

    def field(coefficients):
        return SubjectTransform(pose, origin, spacing, coefficients)

    probe = lung_points @ pose[:3, :3].T + pose[:3, 3]  # near the subject's lungs
    limit = MAX_CONTRACTION / np.linalg.norm(pose[:3, :3], 2)

    def capped(gain):
        # Keep the map invertible: cap the non-affine part's steepest gradient.
        coefficients = modes + gain * noise
        steepest = _steepest_gradient(field(coefficients), probe)
        return coefficients * min(1.0, limit / steepest)

    def residual(coefficients):
        """RMS of the template -> subject map's departure from its best affine fit."""
        mapped = field(coefficients).template_to_subject(lung_points, tolerance_mm=1e-3)
        return np.sqrt(np.mean(np.sum(_affine_residual(lung_points, mapped) ** 2, 1)))

    # Start from the first-order gain (mean |mode + g noise|^2 = target^2 in template mm),
    # then correct it on the forward map, whose composition shrinks the residual.
    mode_residual = _affine_residual(probe, field(modes).displacement(probe))
    noise_residual = _affine_residual(probe, field(noise).displacement(probe))
    target = shape["residual_rms_mm"]
    a, b, c = (np.mean(np.sum(u * v, 1)) for u, v in ((mode_residual, mode_residual),
                                                      (mode_residual, noise_residual),
                                                      (noise_residual, noise_residual)))
    gain = max((-b + np.sqrt(max(b * b - c * (a - target**2), 0.0))) / c, 0.0)
    coefficients = capped(gain)
    for _ in range(CALIBRATION_STEPS):
        gain *= target / residual(coefficients)
        coefficients = capped(gain)
    return field(coefficients)


def _steepest_gradient(transform: SubjectTransform, points: np.ndarray) -> float:
    """Largest spectral norm of the displacement's Jacobian over ``points`` (central
    differences)."""
    step = 0.5
    columns = [(transform.displacement(points + step * e)
                - transform.displacement(points - step * e)) / (2 * step) for e in np.eye(3)]
    jacobian = np.stack(columns, -1)  # (N, 3 out, 3 in)
    return float(np.max(np.linalg.norm(jacobian, ord=2, axis=(1, 2))))

