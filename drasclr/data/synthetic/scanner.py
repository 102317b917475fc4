"""The scanner: a subject's voxel grid, sampling template space into it, and image effects.

Each subject has its own anisotropic spacing (in-plane and slice, ``SizeSpec``), a
reconstruction sharpness (Gaussian point-spread sigma in mm), a noise level and a HU
calibration offset of up to +-20 HU. Noise is white noise passed through the
same point-spread function, as in filtered back-projection, scaled so that its final standard
deviation is the subject's noise level. The grid is axis-aligned RAS+ and centred on the world
origin; voxels outside the sampled template read as air.

Version 2 draws these from the scan's site and reconstruction kernel (``SITES``,
``protocol_scanner``): a sharp kernel keeps edges and multiplies noise, a smooth one blurs
both; dose scales the noise as 1 / sqrt(dose); each site has its own calibration offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from drasclr.data.synthetic.anatomy import HU_AIR, SizeSpec
from drasclr.data.synthetic.transform import SubjectTransform

HU_RANGE = (-1024, 3071)
MAX_HU_OFFSET = 20.0
NOISE_SD_RANGE = (15.0, 45.0)
SHARPNESS_SIGMA_MM = (0.3, 0.8)
GAUSSIAN_TRUNCATE = 3.0
#: Slab thickness (voxels along axis 0) of the sampling loop, bounding coordinate memory.
SLAB = 16


@dataclass(frozen=True)
class Scanner:
    """Acquisition parameters of one subject."""

    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    noise_sd_hu: float
    hu_offset: float
    sharpness_sigma_mm: float
    site: int | None = None  # version 2: the scan's site and kernel (0 smooth, 1 sharp)
    kernel: int | None = None

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> subject world mm: axis-aligned, centred on the origin."""
        spacing = np.asarray(self.spacing_mm)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -(np.asarray(self.shape) - 1) / 2 * spacing
        return affine

    def to_dict(self) -> dict:
        return {"spacing_mm": list(self.spacing_mm), "shape": list(self.shape),
                "noise_sd_hu": self.noise_sd_hu, "hu_offset": self.hu_offset,
                "sharpness_sigma_mm": self.sharpness_sigma_mm,
                **({} if self.site is None else {"site": self.site, "kernel": self.kernel})}


def random_scanner(rng: np.random.Generator, spec: SizeSpec, scale: float) -> Scanner:
    """Draw acquisition parameters; the field of view is the template's times ``scale``."""
    inplane = float(rng.uniform(*spec.inplane_spacing_mm))
    spacing = (inplane, inplane, float(rng.uniform(*spec.slice_spacing_mm)))
    extent = np.asarray(spec.template_extent_mm, float) * scale
    shape = tuple(int(n) for n in np.ceil(extent / spacing))
    return Scanner(
        spacing_mm=tuple(round(s, 6) for s in spacing),
        shape=shape,
        noise_sd_hu=round(float(rng.uniform(*NOISE_SD_RANGE)), 6),
        hu_offset=round(float(rng.uniform(-MAX_HU_OFFSET, MAX_HU_OFFSET)), 6),
        sharpness_sigma_mm=round(float(rng.uniform(*SHARPNESS_SIGMA_MM)), 6),
    )


@dataclass(frozen=True)
class Site:
    """A site's CT protocol: how often it reconstructs sharp, its dose, its calibration."""

    sharp_probability: float
    relative_dose: float
    hu_offset_mean: float


#: The cohort's sites (index = ``site`` column); see docs/synthetic_cohort.md.
SITES = (Site(0.1, 1.0, 0.0), Site(0.4, 0.7, -8.0), Site(0.2, 1.3, 10.0), Site(0.05, 0.5, 4.0))
#: Per kernel (0 smooth, 1 sharp): point-spread sigma range (mm) and noise SD (HU) at dose 1.
KERNEL_SIGMA_MM = ((0.4, 0.6), (0.2, 0.3))
KERNEL_NOISE_SD_HU = (12.0, 28.0)
#: Per-subject spread of the dose around the site's (tube current modulation, body size).
DOSE_SPREAD = (0.8, 1.25)
SITE_OFFSET_SD_HU = 4.0


def protocol_scanner(rng: np.random.Generator, spec: SizeSpec, scale: float, site: int,
                     kernel: int) -> Scanner:
    """Version 2: the scanner of a subject scanned at ``site`` with ``kernel``."""
    inplane = float(rng.uniform(*spec.inplane_spacing_mm))
    spacing = (inplane, inplane, float(rng.uniform(*spec.slice_spacing_mm)))
    extent = np.asarray(spec.template_extent_mm, float) * scale
    protocol = SITES[site]
    dose = protocol.relative_dose * rng.uniform(*DOSE_SPREAD)
    return Scanner(
        spacing_mm=tuple(round(s, 6) for s in spacing),
        shape=tuple(int(n) for n in np.ceil(extent / spacing)),
        noise_sd_hu=round(float(KERNEL_NOISE_SD_HU[kernel] / np.sqrt(dose)), 6),
        hu_offset=round(float(protocol.hu_offset_mean + rng.normal(0, SITE_OFFSET_SD_HU)), 6),
        sharpness_sigma_mm=round(float(rng.uniform(*KERNEL_SIGMA_MM[kernel])), 6),
        site=site, kernel=kernel,
    )


def field_of_view(scanner: Scanner) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) subject world mm of the voxel centres."""
    affine = scanner.affine
    low = affine[:3, 3]
    return low, low + (np.asarray(scanner.shape) - 1) * np.asarray(scanner.spacing_mm)


def sample_template(
    scanner: Scanner, transform: SubjectTransform, template_affine: np.ndarray,
    hu: np.ndarray, labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample template-space HU (linear) and labels (nearest) onto the subject grid.

    One coordinate computation per slab serves both volumes.
    """
    import torch
    import torch.nn.functional as F

    shape = scanner.shape
    out_hu = np.empty(shape, np.float32)
    out_labels = np.empty(shape, labels.dtype)
    # torch's grid_sample is about twice as fast as ndimage.map_coordinates for these lookups
    # (two thirds of a subject's render). Its zero padding reads as air once HU is shifted.
    air_shifted = torch.from_numpy(hu - HU_AIR)[None, None]
    label_volume = torch.from_numpy(labels.astype(np.float32))[None, None]
    voxels_to_unit = 2 / (torch.tensor(hu.shape[::-1], dtype=torch.float32) - 1)
    # One thread: a subject is one core's work (workers run in parallel), and a forked worker
    # must not enter an OpenMP region its parent may already have used.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows, coordinates in transform.template_voxel_slabs(scanner.affine, shape,
                                                                template_affine, SLAB):
            # (3, n, Y, Z) voxel (i, j, k) -> (1, n, Y, Z, 3) grid (x=k, y=j, z=i) in [-1, 1]
            grid = torch.from_numpy(np.moveaxis(coordinates[::-1], 0, -1).astype(np.float32))
            grid = (grid * voxels_to_unit - 1)[None]
            out_hu[rows] = F.grid_sample(air_shifted, grid, mode="bilinear",
                                         padding_mode="zeros", align_corners=True)[0, 0] + HU_AIR
            out_labels[rows] = F.grid_sample(label_volume, grid, mode="nearest",
                                             padding_mode="zeros", align_corners=True)[0, 0]
    finally:
        torch.set_num_threads(threads)
    return out_hu, out_labels


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1D kernel ``ndimage.gaussian_filter`` uses for ``sigma`` (to size the noise)."""
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def acquire(hu: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Scanner effects on sampled HU (modified in place): blur, noise, offset -> int16 HU."""
    sigma = [scanner.sharpness_sigma_mm / s for s in scanner.spacing_mm]
    # Variance of white noise after the separable blur: product of the kernels' squared sums.
    gain = np.sqrt(np.prod([np.sum(_gaussian_kernel(s) ** 2) for s in sigma]))
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= scanner.noise_sd_hu / gain
    hu += noise
    del noise
    ndimage.gaussian_filter(hu, sigma, output=hu, truncate=GAUSSIAN_TRUNCATE)
    hu += scanner.hu_offset
    np.clip(hu, *HU_RANGE, out=hu)
    return np.rint(hu).astype(np.int16)
