"""Standard CT density measures of the lungs: the baselines of every evaluation table.

Computed per subject during preprocessing, on the 1 mm volume inside its lung mask, and
written to the store's manifest under the names of :data:`DENSITY_MEASURES`:

- LAA-950: percentage of lung voxels below -950 HU (emphysema extent; the paper's baseline);
- Perc15: the 15th percentile of lung HU (lower means more emphysema);
- mean lung density in HU;
- lung volume in ml;
- HAA: percentage of lung voxels between -700 and -300 HU (ground glass and consolidation
  extent, the COVID-19 severity baseline).
"""
from __future__ import annotations

import numpy as np

#: Manifest column -> what it holds.
DENSITY_MEASURES = {
    "laa950_percent": "LAA-950 (% of lung below -950 HU)",
    "perc15_hu": "Perc15 (15th percentile of lung HU)",
    "mean_lung_density_hu": "mean lung density (HU)",
    "lung_volume_ml": "lung volume (ml)",
    "haa_700_300_percent": "HAA (% of lung between -700 and -300 HU)",
}
#: The measures that stand for emphysema and lung size (the COPD tables' density baseline).
COPD_DENSITY = ("laa950_percent", "perc15_hu", "mean_lung_density_hu", "lung_volume_ml")
#: The measure that stands for ground glass and consolidation (the COVID table's baseline).
COVID_DENSITY = ("haa_700_300_percent", "mean_lung_density_hu")


def density_measures(hu: np.ndarray, lung: np.ndarray, voxel_volume_ml: float) -> dict[str, float]:
    """The measures of :data:`DENSITY_MEASURES` for the voxels of ``hu`` where ``lung`` is set.

    Args:
        hu: CT intensities in HU.
        lung: boolean lung mask on the same grid.
        voxel_volume_ml: the volume of one voxel (0.001 at 1 mm).
    Raises:
        ValueError: shapes differ, or the mask is empty.
    """
    if hu.shape != lung.shape:
        raise ValueError(f"density: image {hu.shape} and lung mask {lung.shape} differ in shape")
    values = np.asarray(hu)[np.asarray(lung, dtype=bool)].astype(np.float64)
    if values.size == 0:
        raise ValueError("density: the lung mask is empty")
    return {
        "laa950_percent": 100.0 * float(np.mean(values < -950.0)),
        "perc15_hu": float(np.percentile(values, 15)),
        "mean_lung_density_hu": float(values.mean()),
        "lung_volume_ml": float(values.size * voxel_volume_ml),
        "haa_700_300_percent": 100.0 * float(np.mean((values >= -700.0) & (values <= -300.0))),
    }
