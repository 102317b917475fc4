"""The true template -> subject mapping: a random pose (affine) plus a small smooth deformation.

The generator works from the subject's side: a subject world point y (mm) comes from the
template world point

    x = A^-1 y + u(y),

where A is the pose (rotation up to 10 degrees about each axis, per-axis scale 0.85-1.15 for
body size and inspiration level, shift up to 15 mm) and u is a cubic B-spline
free-form deformation (Rueckert et al., IEEE TMI 1999) with control points on a lattice in
subject world mm and displacements in template mm. The large variation lives in A; u is kept
to about 1 mm RMS (3 mm at most) so an affine registration recovers landmarks to ~1 mm.

Sampling an image therefore evaluates the map only on the subject grid, where it is one
separable tensor-product B-spline (the pose folds into the lattice exactly): a few small matrix
products, no per-voxel search or iteration. The forward direction, template -> subject,
solves y = A (x - u(y)) by fixed-point iteration, which contracts because |A| |grad u| << 1;
that is :func:`map_template_points`, used to place landmarks and lesions in subjects.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.85, 1.15)
MAX_SHIFT_MM = 15.0
MAX_DISPLACEMENT_MM = 3.0


def cubic_bspline(s: np.ndarray) -> np.ndarray:
    """The uniform cubic B-spline kernel (support |s| < 2, partition of unity)."""
    s = np.abs(s)
    return np.where(s < 1, 2 / 3 - s**2 + s**3 / 2, np.where(s < 2, (2 - s) ** 3 / 6, 0.0))


@dataclass(frozen=True)
class SubjectTransform:
    """Template <-> subject mapping of one subject.

    Attributes:
        affine: (4, 4) the pose A, template world mm -> subject world mm.
        lattice_origin: (3,) subject world mm of control point (0, 0, 0).
        lattice_spacing: control point spacing in mm (same on all axes).
        coefficients: (mx, my, mz, 3) control displacements in template mm.
    """

    affine: np.ndarray
    lattice_origin: np.ndarray
    lattice_spacing: float
    coefficients: np.ndarray

    # -- serialisation (truth/<id>.json) ------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "template_to_subject_affine": np.round(self.affine, 12).tolist(),
            "deformation": {
                "model": "x_template = inv(A) @ y_subject + u(y_subject); u = cubic B-spline "
                         "free-form deformation, control lattice in subject world mm, "
                         "displacements in template mm",
                "lattice_origin_mm": self.lattice_origin.tolist(),
                "lattice_spacing_mm": self.lattice_spacing,
                "coefficients_mm": np.round(self.coefficients, 9).tolist(),
            },
        }

    @classmethod
    def from_dict(cls, truth: dict) -> "SubjectTransform":
        try:
            deformation = truth["deformation"]
            return cls(
                affine=np.asarray(truth["template_to_subject_affine"], float),
                lattice_origin=np.asarray(deformation["lattice_origin_mm"], float),
                lattice_spacing=float(deformation["lattice_spacing_mm"]),
                coefficients=np.asarray(deformation["coefficients_mm"], float),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"truth record lacks the transform ({error!r})") from error

    # -- the mapping ---------------------------------------------------------------------------
    def _basis(self, coordinates: np.ndarray, axis: int) -> np.ndarray:
        """(n, m_axis) B-spline design matrix of 1D subject coordinates along ``axis``."""
        t = (coordinates - self.lattice_origin[axis]) / self.lattice_spacing
        return cubic_bspline(t[:, None] - np.arange(self.coefficients.shape[axis])[None, :])

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """u(y) in template mm at (N, 3) subject world points."""
        bx, by, bz = (self._basis(points[:, a], a) for a in range(3))
        # One axis at a time: a fixed contraction order, no per-call path search.
        partial = np.einsum("na,abcd->nbcd", bx, self.coefficients)
        partial = np.einsum("nb,nbcd->ncd", by, partial)
        return np.einsum("nc,ncd->nd", bz, partial)

    def subject_to_template(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) subject world mm -> template world mm (the direction images are sampled in)."""
        points = np.asarray(points, float)
        inverse = np.linalg.inv(self.affine)
        return points @ inverse[:3, :3].T + inverse[:3, 3] + self.displacement(points)

    def template_to_subject(self, points: np.ndarray, tolerance_mm: float = 1e-6) -> np.ndarray:
        """(N, 3) template world mm -> subject world mm: solve y = A (x - u(y)) by iteration."""
        points = np.asarray(points, float)
        linear, shift = self.affine[:3, :3], self.affine[:3, 3]
        subject = points @ linear.T + shift
        for _ in range(100):
            update = (points - self.displacement(subject)) @ linear.T + shift
            change = np.max(np.abs(update - subject), initial=0.0)
            subject = update
            if change < tolerance_mm:
                return subject
        raise RuntimeError("template -> subject iteration did not converge")

    def template_voxel_slabs(
        self, subject_affine: np.ndarray, shape: tuple[int, int, int],
        template_affine: np.ndarray, slab: int,
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (rows, (3, n, Y, Z) float32 template voxel coordinates) per slab of axis 0.

        Both grids are axis-aligned (diagonal affines), so the whole map, affine part included,
        is one separable tensor-product B-spline: cubic B-splines reproduce linear functions
        exactly when the control values are the function's values at the control points, so
        the affine part adds to the lattice. The lattice is contracted with the y and z design
        matrices once; each slab then costs one small matrix product per coordinate.
        """
        axes = [np.arange(n) * subject_affine[a, a] + subject_affine[a, 3]
                for a, n in enumerate(shape)]
        t = [(ax[[0, -1]] - self.lattice_origin[a]) / self.lattice_spacing
             for a, ax in enumerate(axes)]
        # Exact reproduction needs every point's 4 supporting control points in the lattice.
        if any(lo < 1 - 1e-6 or hi > n - 3 + 1e-6
               for (lo, hi), n in zip(t, self.coefficients.shape)):
            raise ValueError("subject grid reaches beyond the deformation lattice")
        # Control values of x -> T^-1 (A^-1 y + u(y)) in template voxels.
        inverse = np.linalg.inv(template_affine) @ np.linalg.inv(self.affine)
        grid = np.stack(np.meshgrid(*[self.lattice_origin[a] + self.lattice_spacing
                                      * np.arange(n) for a, n in
                                      enumerate(self.coefficients.shape[:3])],
                                    indexing="ij"), -1)
        control = grid @ inverse[:3, :3].T + inverse[:3, 3]
        control += self.coefficients @ np.linalg.inv(template_affine)[:3, :3].T
        bx, by, bz = (self._basis(axes[a], a) for a in range(3))
        # float32 halves the memory traffic; its rounding (~1e-4 voxel) is far below a voxel.
        lattice = np.einsum("abcd,jb,kc->dajk", control, by, bz, optimize=True)
        lattice = np.ascontiguousarray(lattice, dtype=np.float32)
        bx = bx.astype(np.float32)
        for start in range(0, shape[0], slab):
            rows = slice(start, min(start + slab, shape[0]))
            active = np.flatnonzero(bx[rows].any(axis=0))
            weights = np.ascontiguousarray(bx[rows][:, active])
            coordinates = np.empty((3, len(weights), shape[1], shape[2]), np.float32)
            for d in range(3):
                np.dot(weights, lattice[d, active].reshape(len(active), -1),
                       out=coordinates[d].reshape(len(weights), -1))
            yield rows, coordinates


def map_template_points(truth: dict, points_mm: np.ndarray) -> np.ndarray:
    """Apply a subject's full true mapping (pose and smooth deformation) to template points.

    Args:
        truth: the subject's ``truth/<id>.json`` record (as loaded by ``json.load``).
        points_mm: (N, 3) template world coordinates in mm (RAS+).

    Returns:
        (N, 3) the same anatomical points in the subject's world coordinates, mm.
    """
    points = np.asarray(points_mm, float)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points_mm must have shape (N, 3), got {points.shape}")
    return SubjectTransform.from_dict(truth).template_to_subject(points)


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """Draw the pose A (4, 4): rotation, per-axis scale (size and inspiration) and shift."""
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    # Body size scales all axes together; inspiration level stretches craniocaudally and AP.
    size = rng.uniform(0.9, 1.1)
    inspiration = rng.uniform(-0.05, 0.05)
    scale = np.clip(size * np.array([1.0, 1.0 + inspiration / 2, 1.0 + inspiration]), *SCALE_RANGE)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(scale)
    affine[:3, 3] = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)
    return affine


def random_deformation(
    rng: np.random.Generator, pose: np.ndarray, field_of_view: tuple[np.ndarray, np.ndarray],
    rms_mm: float,
) -> SubjectTransform:
    """Add to ``pose`` a smooth deformation of ``rms_mm`` RMS over ``field_of_view`` (lo, hi mm)."""
    low, high = (np.asarray(v, float) for v in field_of_view)
    spacing = float(np.max(high - low)) / 5.0
    counts = np.ceil((high - low) / spacing).astype(int) + 4
    coefficients = rng.standard_normal((*counts, 3))
    unit = SubjectTransform(pose, low - spacing, spacing, coefficients)
    # Calibrate the amplitude on a grid over the field of view: exact RMS, capped maximum.
    bases = [unit._basis(np.linspace(l, h, 12), a) for a, (l, h) in enumerate(zip(low, high))]
    probe = np.einsum("abcd,ia,jb,kc->ijkd", coefficients, *bases, optimize=True)
    magnitude = np.linalg.norm(probe, axis=-1)
    gain = min(rms_mm / np.sqrt(np.mean(magnitude**2)), MAX_DISPLACEMENT_MM / magnitude.max())
    return SubjectTransform(pose, low - spacing, spacing, coefficients * gain)
