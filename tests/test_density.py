"""Density measures against their definitions on random lungs."""
import numpy as np
import pytest

from drasclr.data.density import DENSITY_MEASURES, RIND_MM, density_measures

MM = np.diag([1.0, 1.0, 1.0, 1.0])


def test_measures_match_their_definitions():
    rng = np.random.default_rng(0)
    hu = rng.normal(-850, 120, size=(20, 18, 16))
    lung = rng.random(hu.shape) < 0.6
    values = hu[lung]
    measures = density_measures(hu, lung, MM)
    assert set(measures) == set(DENSITY_MEASURES)
    assert measures["laa950_percent"] == pytest.approx(100 * np.count_nonzero(values < -950) / values.size)
    percentile15 = np.sort(values)[int(round(0.15 * (values.size - 1)))]
    assert measures["perc15_hu"] == pytest.approx(percentile15, abs=1.0)
    assert measures["mean_lung_density_hu"] == pytest.approx(values.mean())
    assert measures["lung_volume_ml"] == pytest.approx(values.size / 1000)
    inside = (values >= -700) & (values <= -300)
    assert measures["haa_700_300_percent"] == pytest.approx(100 * inside.mean())


def test_regional_laa950_matches_a_brute_force_reference():
    # Anisotropic voxels, the superior direction along minus the first array axis, and a lung
    # that does not fill its array: zones by world height, rind by distance in mm to the
    # nearest voxel outside the lung (the array's outside counts as outside), in float64.
    rng = np.random.default_rng(1)
    shape = (16, 12, 13)
    hu = rng.normal(-930, 40, size=shape)
    lung = np.zeros(shape, bool)
    lung[2:14, 1:11, 2:12] = True
    lung[2:7, 1:5, 2:6] = False  # a notch: the boundary is not a box's
    affine = np.array([[0, 0, 3.0, 0], [0, 4.0, 0, 0], [-3.5, 0, 0, 7], [0, 0, 0, 1]], float)
    measures = density_measures(hu, lung, affine)

    world = lambda idx: (affine[:3, :3] @ np.asarray(idx, float).T).T  # noqa: E731
    padded = np.pad(lung, 1)
    inside = world(np.argwhere(padded))
    outside = world(np.argwhere(~padded))
    depth = np.sqrt(((inside[:, None, :] - outside[None, :, :]) ** 2).sum(-1)).min(1)
    low = np.pad(hu, 1)[padded] < -950
    height = inside[:, 2]
    cuts = height.min() + (height.max() - height.min()) * np.array([1 / 3, 2 / 3])
    zones = {"lower": height < cuts[0], "middle": (height >= cuts[0]) & (height < cuts[1]),
             "upper": height >= cuts[1], "rind": depth <= RIND_MM, "core": depth > RIND_MM}
    for name, members in zones.items():
        assert members.any() and (~members).any(), name
        assert measures[f"laa950_{name}_percent"] == pytest.approx(100 * low[members].mean()), name
    # A zone split of the whole: the zones' voxel-weighted mean is the whole-lung LAA-950.
    weighted = sum(low[zones[z]].sum() for z in ("lower", "middle", "upper")) / low.size
    assert measures["laa950_percent"] == pytest.approx(100 * weighted)


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        density_measures(np.zeros((3, 3, 3)), np.ones((3, 3, 2), bool), MM)
    with pytest.raises(ValueError, match="lung mask is empty"):
        density_measures(np.full((3, 3, 3), -900.0), np.zeros((3, 3, 3), bool), MM)
