"""Density measures against their definitions on random lungs."""
import numpy as np
import pytest

from drasclr.data.density import DENSITY_MEASURES, density_measures


def test_measures_match_their_definitions():
    rng = np.random.default_rng(0)
    hu = rng.normal(-850, 120, size=(20, 18, 16))
    lung = rng.random(hu.shape) < 0.6
    values = hu[lung]
    measures = density_measures(hu, lung, 0.001)
    assert set(measures) == set(DENSITY_MEASURES)
    assert measures["laa950_percent"] == pytest.approx(100 * np.count_nonzero(values < -950) / values.size)
    percentile15 = np.sort(values)[int(round(0.15 * (values.size - 1)))]
    assert measures["perc15_hu"] == pytest.approx(percentile15, abs=1.0)
    assert measures["mean_lung_density_hu"] == pytest.approx(values.mean())
    assert measures["lung_volume_ml"] == pytest.approx(values.size / 1000)
    inside = (values >= -700) & (values <= -300)
    assert measures["haa_700_300_percent"] == pytest.approx(100 * inside.mean())


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        density_measures(np.zeros((3, 3, 3)), np.ones((3, 3, 2), bool), 0.001)
    with pytest.raises(ValueError, match="lung mask is empty"):
        density_measures(np.full((3, 3, 3), -900.0), np.zeros((3, 3, 3), bool), 0.001)
