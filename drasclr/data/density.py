"""Standard CT density measures of the lungs: the baselines of every evaluation table.

Computed per subject during preprocessing, on the 1 mm volume inside its lung mask, and
written to the store's manifest under the names of :data:`DENSITY_MEASURES`:

- LAA-950: percentage of lung voxels below -950 HU (emphysema extent; the paper's baseline);
- Perc15: the 15th percentile of lung HU (lower means more emphysema);
- mean lung density in HU;
- lung volume in ml;
- HAA: percentage of lung voxels between -700 and -300 HU (ground glass and consolidation
  extent, the COVID-19 severity baseline);
- regional LAA-950: the same percentage within the upper, middle and lower third of the lung
  height (superior-inferior, in world millimetres), and within the rind (lung voxels at most
  :data:`RIND_MM` from the lung's boundary, the pleura) and the core (deeper). Emphysema
  subtypes differ in where they lie (centrilobular upper and central, paraseptal subpleural,
  panlobular lower), which the whole-lung LAA-950 cannot tell apart. A region without voxels
  (a lung too thin for a core) counts 0 %.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Depth of the rind: lung voxels this close to the lung boundary (mm).
RIND_MM = 10.0

#: Manifest column -> what it holds.
DENSITY_MEASURES = {
    "laa950_percent": "LAA-950 (% of lung below -950 HU)",
    "perc15_hu": "Perc15 (15th percentile of lung HU)",
    "mean_lung_density_hu": "mean lung density (HU)",
    "lung_volume_ml": "lung volume (ml)",
    "haa_700_300_percent": "HAA (% of lung between -700 and -300 HU)",
    "laa950_upper_percent": "LAA-950 upper (% of the upper third below -950 HU)",
    "laa950_middle_percent": "LAA-950 middle (% of the middle third below -950 HU)",
    "laa950_lower_percent": "LAA-950 lower (% of the lower third below -950 HU)",
    "laa950_rind_percent": f"LAA-950 rind (% of lung within {RIND_MM:g} mm of the pleura "
                           f"below -950 HU)",
    "laa950_core_percent": "LAA-950 core (% of deeper lung below -950 HU)",
}
#: The measures that stand for emphysema and lung size (the COPD tables' density baseline).
COPD_DENSITY = ("laa950_percent", "perc15_hu", "mean_lung_density_hu", "lung_volume_ml")
#: The measure that stands for ground glass and consolidation (the COVID table's baseline).
COVID_DENSITY = ("haa_700_300_percent", "mean_lung_density_hu")
#: LAA-950 by zone and by depth (a density-measure row of its own in the COPD tables).
REGIONAL_LAA950 = ("laa950_upper_percent", "laa950_middle_percent", "laa950_lower_percent",
                   "laa950_rind_percent", "laa950_core_percent")


def density_measures(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """The measures of :data:`DENSITY_MEASURES` for the voxels of ``hu`` where ``lung`` is set.

    Args:
        hu: CT intensities in HU.
        lung: boolean lung mask on the same grid.
        affine: (4, 4) voxel index -> RAS world mm: the voxel volume, the voxel size of the
            rind's depth and the superior-inferior direction of the zones.
    Raises:
        ValueError: shapes differ, or the mask is empty.
    """
    if hu.shape != lung.shape:
        raise ValueError(f"density: image {hu.shape} and lung mask {lung.shape} differ in shape")
    lung = np.asarray(lung, dtype=bool)
    index = np.nonzero(lung)
    if index[0].size == 0:
        raise ValueError("density: the lung mask is empty")
    affine = np.asarray(affine, dtype=np.float64)
    values = np.asarray(hu)[index].astype(np.float64)
    low = values < -950.0
    return {
        "laa950_percent": _percent(low),
        "perc15_hu": float(np.percentile(values, 15)),
        "mean_lung_density_hu": float(values.mean()),
        "lung_volume_ml": float(values.size * abs(np.linalg.det(affine[:3, :3])) / 1000.0),
        "haa_700_300_percent": _percent((values >= -700.0) & (values <= -300.0)),
        **_regional_laa950(low, lung, index, affine),
    }


def _percent(selected: np.ndarray) -> float:
    return 100.0 * float(np.mean(selected)) if selected.size else 0.0


def _regional_laa950(low: np.ndarray, lung: np.ndarray, index: tuple[np.ndarray, ...],
                     affine: np.ndarray) -> dict[str, float]:
    """LAA-950 by thirds of the lung height and in the rind and core (``low``: the lung
    voxels of ``index`` below -950 HU)."""
    height = affine[2, :3] @ np.stack(index).astype(np.float64)  # RAS z: superior is larger
    thirds = np.linspace(height.min(), height.max(), 4)
    zone = np.clip(np.searchsorted(thirds[1:-1], height, side="right"), 0, 2)  # 0 lower .. 2 upper
    # Distance to the nearest voxel outside the lung, in mm, on the lung's padded bounding box.
    box = tuple(slice(i.min(), i.max() + 1) for i in index)
    padded = np.pad(lung[box], 1)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    rind = depth[tuple(i - i.min() for i in index)] <= RIND_MM
    return {
        "laa950_upper_percent": _percent(low[zone == 2]),
        "laa950_middle_percent": _percent(low[zone == 1]),
        "laa950_lower_percent": _percent(low[zone == 0]),
        "laa950_rind_percent": _percent(low[rind]),
        "laa950_core_percent": _percent(low[~rind]),
    }
