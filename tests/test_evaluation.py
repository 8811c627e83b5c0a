"""DVH and DVH metrics against exact counts (property-based)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ids_engine.evaluation import dvh, dvh_metrics
from ids_engine.model import Grid

doses = arrays(np.float64, st.integers(1, 400), elements=st.floats(0.0, 80.0, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(doses, st.floats(0.0, 80.0))
def test_cumulative_dvh_is_the_exact_count(d, threshold):
    mask = np.ones(d.shape, bool)
    h = dvh("s", d, mask, voxel_volume_cc=0.008, bin_gy=0.1)
    # At every bin edge the volume fraction equals the count of voxels at or above it.
    k = int(np.searchsorted(h.dose_gy, threshold))
    if k < h.dose_gy.size:
        edge = h.dose_gy[k]
        assert h.volume_fraction[k] == pytest.approx(np.mean(d >= edge))
    assert h.volume_fraction[0] == pytest.approx(1.0)
    assert h.volume_cc == pytest.approx(d.size * 0.008)


@settings(max_examples=60, deadline=None)
@given(doses)
def test_dx_metrics_hold_their_definition(d):
    m = dvh_metrics(d, np.ones(d.shape, bool), prescription_gy=60.0)
    for pct, key in ((98, "D98_gy"), (95, "D95_gy"), (50, "D50_gy"), (2, "D2_gy")):
        # At least pct % of the volume receives D_pct or more.
        assert np.mean(d >= m[key]) >= pct / 100.0 - 1e-12
    assert m["min_gy"] <= m["D98_gy"] <= m["D95_gy"] <= m["D50_gy"] <= m["D2_gy"] <= m["max_gy"]
    assert m["V95_pct"] == pytest.approx(100 * np.mean(d >= 57.0))
    assert m["mean_gy"] == pytest.approx(d.mean())


def test_dvh_of_an_empty_structure_is_refused():
    with pytest.raises(ValueError, match="empty"):
        dvh("empty", np.zeros(5), np.zeros(5, bool), 0.001)


@settings(max_examples=80, deadline=None)
@given(
    st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.floats(0.1, 5.0), st.floats(0.1, 5.0), st.floats(0.1, 5.0)),
    st.tuples(st.floats(-500, 500), st.floats(-500, 500), st.floats(-500, 500)),
    st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_grid_index_world_round_trip(shape, spacing, origin, frac):
    g = Grid(shape, spacing, origin)
    idx = np.array([f * (n - 1) for f, n in zip(frac, shape)])
    np.testing.assert_allclose(g.world_to_index(g.index_to_world(idx)), idx, atol=1e-9)
