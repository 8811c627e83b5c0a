"""Depth-dose terms: the engine's per-voxel D_c(l) against the analytic formula (Bortfeld 1993,
eq. 4-5 of the IDS paper), in the build-up where a coarse table used to be 0.6 % low."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ids_engine import backend
from ids_engine.dose import DoseEngine, EngineOptions
from ids_engine.model import Beam, Grid, Patient, Structure, default_6mv

# Relative agreement required of the depth terms, of the local value, at every depth.
DEPTH_TERM_RTOL = 1e-3
SURFACE_Y_MM = -10.0  # the phantom's anterior face, on a voxel boundary
DY_MM = 0.5  # voxel size along the beam: centres at depths 0.25, 0.75, ... mm


def _analytic(machine, depth_mm):
    """D_c(l) straight from the formula, float64, written out here (not the machine's method)."""
    m = machine.attenuation_per_mm
    l = np.asarray(depth_mm, dtype=np.float64)
    return np.stack([a * b / (b - m) * (np.exp(-m * l) - np.exp(-b * l))
                     for a, b in zip(machine.weights, machine.betas_per_mm)])


def _thin_water():
    """Water 0.5 mm voxels deep (y) from y = -10 mm, 24 mm deep, 40 mm across (4 mm voxels)."""
    ny, nxz = 52, 13
    grid = Grid((nxz, ny, nxz), (4.0, DY_MM, 4.0), (-24.0, SURFACE_Y_MM - 0.75, -24.0))
    z, y, x = (grid.axis_mm(a) for a in "zyx")
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    body = (np.abs(X) < 21) & (np.abs(Z) < 21) & (Y > SURFACE_Y_MM) & (Y < SURFACE_Y_MM + 24.0)
    ct = np.where(body, 0.0, -1000.0)
    return Patient(grid, ct, (Structure("BODY", "external", body, grid),), name="thin water")


@pytest.mark.parametrize("machine_name", ["default", "all narrow"])
def test_engine_depth_terms_match_formula_in_build_up(xp_name, machine_name):
    """Central-axis voxels at 0.25..20 mm: weights / (gy_per_mu * ISQ) equal D_c(l) to 0.1 %."""
    machine = default_6mv()
    if machine_name == "all narrow":  # all three components on the fine level
        machine = replace(machine, narrow_components=(0, 1, 2))
    p = _thin_water()
    eng = DoseEngine(p, [Beam(isocentre_mm_xyz=(0.0, 0.0, 0.0))], machine, options=EngineOptions(coarse_factor_zyx=(1, 4, 1)))
    lvl = eng.geometry[0].fine
    vox = backend.asnumpy(lvl.vox)
    k, j, i = np.unravel_index(vox, p.grid.shape_zyx)
    centre = (k == 6) & (i == 6)  # x = z = 0
    y = p.grid.axis_mm("y")[j[centre]]
    depth = y - SURFACE_Y_MM
    sel = depth <= 20.0
    assert np.allclose(depth[sel], np.arange(0.25, 20.0, DY_MM))
    # The ray tracer's depth on the axis is the geometric one (float32 round-off).
    np.testing.assert_allclose(backend.asnumpy(lvl.depth_mm)[centre][sel], depth[sel], rtol=1e-5, atol=2e-5)
    isq = (1000.0 / (1000.0 + y[sel])) ** 2
    got = backend.asnumpy(lvl.weights)[:, centre][:, sel] / (eng.machine.gy_per_mu * isq)
    want = _analytic(machine, depth[sel])[list(lvl.components)]
    np.testing.assert_allclose(got, want, rtol=DEPTH_TERM_RTOL, atol=0)
    # The point-dose path (dose_at_points) uses the same terms.
    pts = np.stack([np.zeros(sel.sum()), y[sel], np.zeros(sel.sum())], axis=-1)
    w = backend.asnumpy(eng.point_weights(0, pts)[4]) / (eng.machine.gy_per_mu * isq)
    np.testing.assert_allclose(w, _analytic(machine, depth[sel]), rtol=DEPTH_TERM_RTOL, atol=0)


@pytest.mark.parametrize("betas", [(0.27, 0.045, 0.018), (0.3, 0.05, 0.01), (1.0, 0.2, 0.003)])
def test_depth_table_interpolates_within_tolerance(betas):
    """The table (used for device lookups, e.g. TPI) meets 0.1 % at every depth, 0-600 mm,
    including the first micrometres, for default and matRad-like build-up coefficients."""
    machine = replace(default_6mv(), betas_per_mm=betas)
    d_tab, c_tab = machine.depth_table()
    assert d_tab[0] == 0.0 and d_tab[-1] >= 600.0 and np.all(np.diff(d_tab) > 0)
    l = np.concatenate([[1e-4, 1e-3, 0.01, 0.1], np.arange(0.25, 20.0, 0.25), np.arange(20.0, 600.0, 0.37)])
    want = _analytic(machine, l)
    for c in range(3):
        np.testing.assert_allclose(np.interp(l, d_tab, c_tab[c]), want[c], rtol=DEPTH_TERM_RTOL, atol=0)
    # The machine's own evaluation is the formula.
    np.testing.assert_allclose(machine.depth_components(l), want, rtol=1e-12)
    np.testing.assert_array_equal(machine.depth_components(-np.ones(2)), 0.0)
