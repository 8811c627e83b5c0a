"""Gamma index: analytic cases and agreement with pymedphys' gamma."""

import numpy as np
import pytest
from scipy import ndimage

from ids_engine.evaluation import gamma_index, gamma_pass_rate, gamma_summary, grid_axes_mm
from ids_engine.model import Grid


def _axes(shape, spacing, origin=(0.0, 0.0, 0.0)):
    return tuple(o + s * np.arange(n) for o, s, n in zip(origin, spacing, shape))


def test_identical_doses_give_zero_and_the_cutoff_excludes_low_dose():
    axes = _axes((6, 7, 8), (2.0, 1.5, 1.0))
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    d = 50.0 * np.exp(-((xx - 4) ** 2 + (yy - 5) ** 2 + (zz - 5) ** 2) / 30.0)
    g = gamma_index(axes, d, axes, d, dose_percent=3, dta_mm=3, cutoff_percent=10)
    assert np.all(g[d >= 5.0] == 0.0)
    assert np.all(np.isnan(g[d < 5.0]))
    assert gamma_pass_rate(g) == 100.0


def test_uniform_dose_difference_in_a_flat_field():
    # A flat 40 Gy field, evaluated 2 % higher: no distance helps, gamma = 0.8 Gy / (3 % of 40 Gy).
    axes = _axes((5, 6, 7), (3.0, 2.0, 2.5))
    ref = np.full((5, 6, 7), 40.0)
    g = gamma_index(axes, ref, axes, ref * 1.02, dose_percent=3, dta_mm=3)
    np.testing.assert_allclose(g, 0.8 / 1.2, rtol=1e-9)
    # Local gamma refers to the local dose: identical here (flat).
    gl = gamma_index(axes, ref, axes, ref * 1.02, dose_percent=2, dta_mm=3, local=True)
    np.testing.assert_allclose(gl, 1.0, rtol=1e-9)


@pytest.mark.parametrize("shift_mm", [1.0, 2.5, 4.0])
def test_shifted_linear_ramp_has_the_closed_form_gamma(shift_mm):
    # D_r(x) = g x, D_e(x) = g (x - s): gamma = |s| / sqrt(DTA^2 + (dD / g)^2) (minimise
    # t^2 / DTA^2 + g^2 (t - s)^2 / dD^2 over the search offset t).
    x = np.arange(0.0, 120.0, 1.0)
    slope = 0.5  # Gy / mm
    ref = 10.0 + slope * x
    ev = 10.0 + slope * (x - shift_mm)
    axes = (np.zeros(1), np.zeros(1), x)
    g = gamma_index(axes, ref[None, None], axes, ev[None, None], dose_percent=3, dta_mm=3,
                    interp_fraction=20, cutoff_percent=0)[0, 0]
    dd = 0.03 * ref.max()
    expected = shift_mm / np.hypot(3.0, dd / slope)
    inner = g[15:-15]  # away from the ends, where the match would lie outside the grid
    np.testing.assert_allclose(inner, expected, atol=0.01)


def test_shifted_erf_edge_passes_when_the_shift_is_within_the_dta():
    from scipy.special import erf

    x = np.arange(-40.0, 40.0, 0.5)
    ref = 30.0 * (1 + erf(x / 4.0))
    axes = (np.zeros(1), np.zeros(1), x)
    for shift, passes in ((2.5, True), (4.0, False)):
        ev = 30.0 * (1 + erf((x - shift) / 4.0))
        # A fine search (DTA / 50): the edge is 8.5 Gy / mm steep, so the dose term at the
        # search step nearest the exact match stays small.
        g = gamma_index(axes, ref[None, None], axes, ev[None, None], dose_percent=3, dta_mm=3, cutoff_percent=10,
                        interp_fraction=50)[0, 0]
        ok = np.isfinite(g) & (x < 30)
        # In the steep edge, distance is the only way to agree: gamma -> shift / DTA.
        steep = ok & (np.abs(x - shift / 2) < 1.0)
        assert np.all(g[steep] <= shift / 3.0 + 0.03) and np.all(g[steep] >= shift / 3.0 - 0.1)
        assert (gamma_pass_rate(g[ok]) == 100.0) == passes


def test_subset_cap_and_bad_input():
    rng = np.random.default_rng(3)
    axes = _axes((8, 8, 8), (2.0, 2.0, 2.0))
    ref = ndimage.gaussian_filter(rng.random((8, 8, 8)), 1.5) * 100
    ev = ref * 1.5
    g = gamma_index(axes, ref, axes, ev, dose_percent=2, dta_mm=2, max_gamma=1.5, max_points=50, cutoff_percent=0)
    assert np.isfinite(g).sum() == 50 and np.nanmax(g) <= 1.5
    s = gamma_summary(g)
    assert s["points"] == 50 and 0 <= s["pass_rate_pct"] <= 100
    with pytest.raises(ValueError, match="axis 2 has 7 coordinates"):
        gamma_index((axes[0], axes[1], axes[2][:-1]), ref, axes, ev, dose_percent=3, dta_mm=3)
    with pytest.raises(ValueError, match="finite"):
        gamma_index(axes, ref, axes, np.where(ref > 50, np.nan, ref), dose_percent=3, dta_mm=3)


def test_grid_axes_follow_the_grid():
    grid = Grid(shape_zyx=(3, 4, 5), spacing_mm_zyx=(2.0, 1.5, 1.0), origin_mm_xyz=(-10.0, 5.0, 7.0))
    z, y, x = grid_axes_mm(grid)
    assert z[0] == 7.0 and z[-1] == 11.0 and y[1] == 6.5 and x[-1] == -6.0


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("criteria", [(3.0, 3.0), (2.0, 2.0)])
def test_agrees_with_pymedphys(local, criteria):
    pymedphys = pytest.importorskip("pymedphys")
    rng = np.random.default_rng(7)
    shape, spacing = (10, 16, 14), (3.0, 2.0, 1.5)
    axes_ref = _axes(shape, spacing)
    ref = ndimage.gaussian_filter(rng.random(shape), 2.5)
    ref = 60.0 * (ref - ref.min()) / (ref.max() - ref.min())
    # The evaluated dose: shifted, rescaled and on another grid (offset, finer in y).
    axes_ev = _axes((10, 31, 14), (3.0, 1.0, 1.5), origin=(0.4, 0.0, -0.3))
    zz, yy, xx = np.meshgrid(*axes_ev, indexing="ij")
    idx = np.stack([(zz - 0.6) / 3.0, (yy + 0.5) / 2.0, (xx - 0.2) / 1.5])
    ev = 1.01 * ndimage.map_coordinates(ref, idx, order=1, mode="nearest")
    dp, dta = criteria
    ours = gamma_index(axes_ref, ref, axes_ev, ev, dose_percent=dp, dta_mm=dta, local=local, cutoff_percent=10)
    theirs = pymedphys.gamma(axes_ref, ref, axes_ev, ev, dp, dta, lower_percent_dose_cutoff=10, local_gamma=local,
                             interp_algo="scipy")
    both = np.isfinite(ours) & np.isfinite(theirs)
    assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))
    diff = np.abs(ours - theirs)[both]
    assert np.median(diff) < 0.01
    # Local gamma divides by the local dose: near the cutoff one search step weighs more.
    assert np.percentile(diff, 99) < (0.2 if local else 0.1)
    assert abs(gamma_pass_rate(ours) - gamma_pass_rate(theirs)) < 0.5
