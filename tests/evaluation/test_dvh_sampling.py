"""DVHs with partial volumes (exact, sub-voxel) and by random sampling (Niemierko and Goitein
1990), checked against analytic DVHs and the Dvoretzky-Kiefer-Wolfowitz bound."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.evaluation import (
    DVH,
    DVHCurve,
    dkw_bound,
    dvh,
    dvh_max_difference,
    dvh_standard_error,
    exact_dvh,
    plot_dvhs,
    sample_dvhs,
    sampled_dvh,
    structure_occupancy,
)
from ids_engine.model import Grid

# A grid of 2 x 3 x 4 mm voxels; dose rises linearly along x (trilinear interpolation is exact).
GRID = Grid((10, 12, 40), (2.0, 3.0, 4.0), (-80.0, -18.0, -9.0))
X0, X1 = 10, 29  # the slab's first and last voxel columns
GRADIENT_GY_PER_MM = 0.25


@pytest.fixture(scope="module")
def horseshoe_coarse():
    from ids_engine.phantoms import PHANTOMS

    return PHANTOMS["horseshoe"](resolution="coarse")


def _linear_dose() -> np.ndarray:
    x_mm = GRID.axis_mm("x") - GRID.origin_mm_xyz[0]
    return np.broadcast_to(GRADIENT_GY_PER_MM * x_mm, GRID.shape_zyx).astype(np.float32).copy()


def _slab() -> np.ndarray:
    m = np.zeros(GRID.shape_zyx, bool)
    m[:, :, X0:X1 + 1] = True  # all of y and z: the region has flat faces only
    return m


def _analytic_slab_dvh(doses_gy: np.ndarray) -> np.ndarray:
    """V(D) of the slab: x uniform between the faces X0 - 1/2 and X1 + 1/2 (voxel units)."""
    lo, hi = (X0 - 0.5) * 4.0 * GRADIENT_GY_PER_MM, (X1 + 0.5) * 4.0 * GRADIENT_GY_PER_MM
    return np.clip((hi - doses_gy) / (hi - lo), 0.0, 1.0)


def _error_to_analytic(h: DVH) -> float:
    return float(np.max(np.abs(h.volume_fraction - _analytic_slab_dvh(h.dose_gy))))


def test_exact_dvh_of_a_slab_in_a_linear_dose_is_the_analytic_one():
    s = 4
    h = exact_dvh("slab", _linear_dose(), _slab(), GRID, supersample=s, bin_gy=0.05)
    n_x = X1 - X0 + 1
    # Sub-points sit on a lattice 1/s voxel apart: the cumulative fraction is a staircase of
    # steps 1/(n_x s) around the straight line.
    assert _error_to_analytic(h) <= 1.0 / (n_x * s) + 1e-9
    assert h.volume_cc == pytest.approx(n_x * GRID.shape_zyx[0] * GRID.shape_zyx[1] * GRID.voxel_volume_cc)
    # Without supersampling it is the voxel-centre DVH of the existing dvh().
    centre = exact_dvh("slab", _linear_dose(), _slab(), GRID, supersample=1, bin_gy=0.05)
    plain = dvh("slab", _linear_dose(), _slab(), GRID.voxel_volume_cc, bin_gy=0.05)
    np.testing.assert_allclose(centre.volume_fraction, plain.volume_fraction, atol=1e-12)


def test_partial_volume_of_an_isolated_voxel_and_an_edge():
    """The region is where the trilinear mask is >= 1/2. Around an isolated voxel each octant
    holds {abc >= 1/2, a, b, c in [1/2, 1]}, of volume 1 - (1 + L + L^2/2)/2 with L = ln 2;
    along a straight convex edge each quadrant loses area to 1 - (1 + L)/2."""
    L = np.log(2.0)
    m = np.zeros((7, 7, 7), bool)
    m[3, 3, 3] = True
    occ = structure_occupancy(m, supersample=24)
    assert occ.sum() == pytest.approx(8 * (1 - (1 + L + L * L / 2) / 2), rel=0.01)
    assert occ[3, 3, 3] == occ.sum()  # nothing spills into the neighbours: a convex blob
    # A square bar along z, 4 x 4 voxels: four convex edges, each leaving 4 * area per quadrant.
    bar = np.zeros((5, 10, 10), bool)
    bar[:, 3:7, 3:7] = True
    occ = structure_occupancy(bar, supersample=24)
    per_slice = 16 - 4 * (0.25 - (1 - (1 + L) / 2))
    assert occ.sum() / 5 == pytest.approx(per_slice, rel=2e-3)
    # A concave corner fills in: an L-shaped bar gains volume outside its voxels.
    ell = np.zeros((3, 10, 10), bool)
    ell[:, 2:8, 2:4] = True
    ell[:, 6:8, 2:8] = True
    occ = structure_occupancy(ell, supersample=16)
    assert occ[~ell].sum() > 0


def test_sampled_dvh_converges_within_the_dkw_bound():
    dose = _linear_dose()
    states = list(sample_dvhs(dose, [("slab", _slab())], GRID, seed=3, first_batch=500))
    assert states[-1].done and not any(s.done for s in states[:-1])
    n = np.array([s.points[0] for s in states])
    assert np.all(np.diff(n) > 0)
    volume_mm3 = 20 * 10 * 12 * GRID.voxel_volume_cc * 1000
    assert n[-1] >= volume_mm3 and states[-1].density_per_mm3[0] >= 1.0
    err = np.array([_error_to_analytic(s.dvhs[0]) for s in states])
    bound = np.array([dkw_bound(k, 1e-6) for k in n])
    assert np.all(err <= bound), (err, bound)
    # The error falls like 1/sqrt(n): over a 100-fold increase of points, at least 3 times.
    assert n[-1] / n[0] > 100
    assert err[-1] < err[0] / 3.0
    # The sampled volume is the region's.
    assert states[-1].dvhs[0].volume_cc == pytest.approx(volume_mm3 / 1000.0, rel=1e-3)


def test_sampled_dvh_against_the_exact_dvh_on_a_phantom(horseshoe_coarse):
    """The seed's stopping rule (1 point per mm^3) on the coarse horseshoe's OAR in a smooth
    dose: every intermediate curve within the DKW bound of the exact DVH (plus the exact DVH's
    own sub-voxel discretisation, measured against a finer one)."""
    p = horseshoe_coarse
    g = p.grid
    c = g.voxel_centres_xyz()
    centre = p.structure("PTV").centroid_xyz()
    dose = (60.0 * np.exp(-np.sum((c - centre) ** 2, axis=-1) / (2 * 40.0 ** 2))).astype(np.float32)
    oar = p.structure("OAR")
    exact = exact_dvh("OAR", dose, oar.mask, g, supersample=4)
    finer = exact_dvh("OAR", dose, oar.mask, g, supersample=6)
    quad = dvh_max_difference(exact, finer)
    assert quad < 0.004
    last = None
    for state in sample_dvhs(dose, [oar], g, seed=11):
        n = state.points[0]
        assert dvh_max_difference(state.dvh("OAR"), exact) <= dkw_bound(n, 1e-6) + 2 * quad
        last = state
    assert last.done and last.density_per_mm3[0] >= 1.0
    assert last.points[0] >= exact.volume_cc * 1000.0 * 0.99
    assert dvh_max_difference(last.dvh("OAR"), exact) < 0.01
    # Partial volumes: the region is a little smaller than the voxel count (a convex organ).
    assert exact.volume_cc < oar.volume_cc
    assert exact.volume_cc == pytest.approx(oar.volume_cc, rel=0.03)


def test_sampling_stops_when_cancelled_and_reports_progress():
    dose = _linear_dose()
    rounds = []

    def cancel():
        return len(rounds) >= 2

    def progress(done, total, label):
        rounds.append((done, total, label))

    state = sampled_dvh(dose, [("slab", _slab())], GRID, cancel=cancel, progress=progress, first_batch=100)
    assert not state.done and state.round == 1
    assert rounds[-1][0] == state.points[0] < rounds[-1][1] == state.target_points[0]
    # Stopping the generator is the other way (the seed's stop button).
    gen = sample_dvhs(dose, [("slab", _slab())], GRID, first_batch=100)
    first = next(gen)
    gen.close()
    assert first.points[0] == 100 and not first.done


def test_sampling_is_reproducible_and_the_standard_error_matches_the_spread():
    dose = _linear_dose()
    a = sampled_dvh(dose, [("slab", _slab())], GRID, density_per_mm3=0.01, seed=5)
    b = sampled_dvh(dose, [("slab", _slab())], GRID, density_per_mm3=0.01, seed=5)
    np.testing.assert_array_equal(a.dvhs[0].volume_fraction, b.dvhs[0].volume_fraction)
    # Across seeds, the spread of V at a mid dose matches sqrt(V (1 - V) / n).
    k = 40  # 2 Gy: V about 0.54
    vals = [sampled_dvh(dose, [("slab", _slab())], GRID, density_per_mm3=0.01, seed=s).dvhs[0].volume_fraction[k]
            for s in range(30)]
    se = dvh_standard_error(a.dvhs[0], a.points[0])[k]
    assert np.std(vals) == pytest.approx(se, rel=0.4)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="empty"):
        exact_dvh("none", _linear_dose(), np.zeros(GRID.shape_zyx, bool), GRID)
    with pytest.raises(ValueError, match="does not match the grid"):
        exact_dvh("slab", np.zeros((2, 2, 2)), _slab(), GRID)
    with pytest.raises(ValueError, match="density_per_mm3"):
        next(sample_dvhs(_linear_dose(), [("slab", _slab())], GRID, density_per_mm3=0))
    with pytest.raises(ValueError, match="volume"):
        plot_dvhs("x.png", [], volume="litres")


def test_plot_has_a_colour_per_structure_and_a_style_per_plan(tmp_path):
    import matplotlib.image as mpimg

    dose = _linear_dose()
    h = exact_dvh("slab", dose, _slab(), GRID)
    h2 = exact_dvh("slab", dose * 1.1, _slab(), GRID)
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    out = plot_dvhs(tmp_path / "dvh.png", [DVHCurve("A", h, red), DVHCurve("B", h2, red),
                                          DVHCurve("A", dvh("half", dose, _slab() & (np.arange(40) < 20), 1.0), blue)],
                    volume="cc", title="test")
    img = mpimg.imread(out)[..., :3]
    is_red = np.all(np.abs(img - red) < 0.15, axis=-1).sum()
    is_blue = np.all(np.abs(img - blue) < 0.15, axis=-1).sum()
    assert is_red > 200 and is_blue > 100


def test_ids_dvh_cli(tmp_path, capsys):
    import json

    from ids_engine.cli import main

    out = tmp_path / "dvh"
    rc = main(["dvh", "horseshoe", "--beams", "3", "--structures", "OAR", "--sampled", "--density", "0.2",
               "--volume", "cc", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert (out / "dvh.png").stat().st_size > 10_000 and (out / "convergence.png").stat().st_size > 10_000
    doc = json.loads((out / "dvh.json").read_text())
    oar = doc["plans"][0]["structures"][0]
    assert oar["name"] == "OAR" and oar["volume_cc"] < oar["voxel_volume_cc"]
    n = oar["sampled_points"]
    assert n >= 0.2 * oar["volume_cc"] * 1000
    assert oar["max_difference_pct"] / 100 <= dkw_bound(n, 1e-6) + 0.005
    rc = main(["dvh", "horseshoe", "--structures", "Liver", "--out", str(tmp_path / "x")])
    assert rc == 2 and "no structure 'Liver'" in capsys.readouterr().err
