"""Physics of the pencil-beam engine, tested against physics (not "it runs")."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import DoseEngine, EngineOptions
from ids_engine.model import Beam, Grid, Patient, Structure

# Water phantom for the tests: 2 mm voxels laterally, 2 mm in depth, centred at the origin.
# The beam at gantry 0 enters at the anterior surface y = -DEPTH_HALF_MM and travels to +y.
DEPTH_HALF_MM = 100.0


def water_phantom(width_mm=160.0, depth_mm=2 * DEPTH_HALF_MM, spacing_mm=2.0, slab=None, slab_hu=0.0):
    """A water box (0 HU) in air, (x, z) width ``width_mm``, y depth ``depth_mm``.

    ``slab=(y0, y1)``: a layer of ``slab_hu`` between patient y0 and y1 (all x, z).
    """
    n_xz = int(round(width_mm / spacing_mm)) + 2
    n_y = int(round(depth_mm / spacing_mm)) + 2
    grid = Grid((n_xz, n_y, n_xz), (spacing_mm,) * 3,
                (-(n_xz - 1) * spacing_mm / 2, -(n_y - 1) * spacing_mm / 2, -(n_xz - 1) * spacing_mm / 2))
    z, y, x = (grid.axis_mm(a) for a in "zyx")
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    body = (np.abs(X) < width_mm / 2) & (np.abs(Y) < depth_mm / 2) & (np.abs(Z) < width_mm / 2)
    ct = np.where(body, 0.0, -1000.0)
    if slab is not None:
        ct = np.where(body & (Y >= slab[0]) & (Y < slab[1]), slab_hu, ct)
    return Patient(grid, ct, (Structure("BODY", "external", body, grid),), name="water")


def axis_index(p: Patient, y_mm):
    """Flat voxel indices on the central axis (x = z = 0) at patient y positions."""
    g = p.grid
    pts = np.stack([np.zeros_like(y_mm), y_mm, np.zeros_like(y_mm)], axis=-1)
    kji = g.nearest_index(pts)
    return np.ravel_multi_index(kji.T, g.shape_zyx)


def open_engine(p: Patient, field_mm=100.0, iso_y=None, gantry=0.0, **opts):
    iso = (0.0, -DEPTH_HALF_MM if iso_y is None else iso_y, 0.0)
    eng = DoseEngine(p, [Beam(gantry_deg=gantry, isocentre_mm_xyz=iso)], options=EngineOptions(**opts))
    half = field_mm / 2
    eng.set_fluences([eng.open_field(0, (-half, half), (-half, half))])
    return eng


@pytest.fixture(scope="module")
def water():
    return water_phantom()


@pytest.fixture(scope="module")
def pdd_10x10(water):
    """Central-axis depth dose of a 10 x 10 cm field at SSD 100 cm (isocentre on the surface)."""
    eng = open_engine(water, 100.0)
    y = water.grid.axis_mm("y")
    y = y[(y > -DEPTH_HALF_MM) & (y < DEPTH_HALF_MM)]
    depth = y + DEPTH_HALF_MM
    dose = eng.dose_cube_host().ravel()[axis_index(water, y)]
    return depth, dose, eng


def test_depth_dose_shape(pdd_10x10):
    depth, dose, _ = pdd_10x10
    i_max = int(np.argmax(dose))
    d_max = depth[i_max]
    assert 10.0 <= d_max <= 20.0, f"dmax {d_max} mm outside 10-20 mm for 6 MV"
    # Build-up: the first voxel (1 mm deep) is well below the maximum.
    assert dose[0] < 0.8 * dose[i_max]
    pdd = 100 * dose / dose[i_max]
    pdd_100 = np.interp(100.0, depth, pdd)
    assert 60.0 <= pdd_100 <= 72.0, f"PDD(10 cm) = {pdd_100:.1f}% (6 MV 10x10 is about 67%)"
    # Fall-off beyond dmax is monotone and close to exponential: log-dose is nearly linear.
    tail = (depth > 40) & (depth < 180)
    assert np.all(np.diff(dose[tail]) < 0)
    coef = np.polyfit(depth[tail], np.log(dose[tail]), 1)
    resid = np.log(dose[tail]) - np.polyval(coef, depth[tail])
    assert np.max(np.abs(resid)) < 0.03


def test_absolute_calibration(pdd_10x10):
    """1 cGy/MU at dmax for a 10 x 10 field at SSD 100 cm."""
    _, dose, _ = pdd_10x10
    assert dose.max() == pytest.approx(0.01, rel=0.02)


def test_inverse_square_between_ssds(water):
    """Same field and depth at SSD 90 and 100 cm: the ratio is the inverse-square ratio."""
    e100 = open_engine(water, 100.0, iso_y=-DEPTH_HALF_MM)
    e90 = open_engine(water, 100.0, iso_y=-DEPTH_HALF_MM + 100.0)  # isocentre 10 cm deep: SSD 90 cm
    ys = np.array([-50.0, 0.0, 50.0])
    d100 = e100.dose_cube_host().ravel()[axis_index(water, ys)]
    d90 = e90.dose_cube_host().ravel()[axis_index(water, ys)]
    depth = ys + DEPTH_HALF_MM
    expected = ((1000.0 + depth) / (900.0 + depth)) ** 2
    np.testing.assert_allclose(d90 / d100, expected, rtol=0.01)


def test_penumbra_width(pdd_10x10, water):
    """80-20 % penumbra of a 10 x 10 field at 10 cm depth within the 6 MV range (3-9 mm)."""
    eng = pdd_10x10[2]
    g = water.grid
    x = np.arange(0.0, 80.0, 0.5)
    pts = np.stack([x, np.full_like(x, 0.0), np.zeros_like(x)], axis=-1)  # y = 0: 100 mm deep
    prof = np.asarray(eng.dose_at_points(pts))
    prof = prof / prof[0]
    x80 = np.interp(-0.8, -prof, x)
    x20 = np.interp(-0.2, -prof, x)
    width = x20 - x80
    assert 3.0 <= width <= 9.0, f"80-20 penumbra {width:.1f} mm"
    # The 50 % point sits at the geometric edge projected to that depth (divergence): 50 * 1.1 mm.
    x50 = np.interp(-0.5, -prof, x)
    assert x50 == pytest.approx(55.0, abs=1.5)
    assert g is water.grid


def test_field_size_output(water):
    """Output at 10 cm depth grows with field size (phantom scatter)."""
    y = np.array([0.0])  # 100 mm deep
    out = {}
    for f in (50.0, 100.0, 150.0):
        eng = open_engine(water, f)
        out[f] = float(eng.dose_at_voxels(axis_index(water, y))[0])
    assert out[50.0] < out[100.0] < out[150.0]
    assert 0.85 <= out[50.0] / out[100.0] <= 0.99
    assert 1.01 <= out[150.0] / out[100.0] <= 1.10


def test_linearity_in_fluence(water, rng):
    eng = open_engine(water, 100.0)
    nv, nu = eng.geometry[0].fluence_grid.shape_vu
    f1 = rng.random((nv, nu)).astype(np.float32)
    f2 = rng.random((nv, nu)).astype(np.float32)
    eng.set_fluences([f1])
    d1 = eng.dose_cube_host()
    eng.set_fluences([f2])
    d2 = eng.dose_cube_host()
    eng.set_fluences([2.5 * f1 + f2])
    d3 = eng.dose_cube_host()
    np.testing.assert_allclose(d3, 2.5 * d1 + d2, atol=1e-5 * d3.max())


def test_opposed_beams_symmetric(water):
    eng = DoseEngine(water, [Beam(gantry_deg=0.0), Beam(gantry_deg=180.0)])
    eng.set_fluences([eng.open_field(b, (-50, 50), (-50, 50)) for b in range(2)])
    y = water.grid.axis_mm("y")
    y = y[np.abs(y) < DEPTH_HALF_MM - 1]
    d = eng.dose_cube_host().ravel()[axis_index(water, y)]
    np.testing.assert_allclose(d, d[::-1], rtol=0.01)


@pytest.mark.parametrize("hu, sign", [(-700.0, +1), (1000.0, -1)])
def test_heterogeneity_behind_slab(hu, sign):
    """Behind a lung slab the dose is higher, behind bone lower, than in water at the same geometric depth."""
    slab = (-60.0, 0.0)  # 40-100 mm deep
    water = water_phantom(width_mm=120.0)
    het = water_phantom(width_mm=120.0, slab=slab, slab_hu=hu)
    y = np.array([30.0, 50.0])  # 130 and 150 mm deep, behind the slab
    dw = open_engine(water, 100.0).dose_cube_host().ravel()[axis_index(water, y)]
    dh = open_engine(het, 100.0).dose_cube_host().ravel()[axis_index(het, y)]
    ratio = dh / dw
    assert np.all(sign * (ratio - 1.0) > 0.05), ratio


def test_rotation_invariance():
    """A phantom rotated with the gantry gets the same dose (rotated)."""
    base = water_phantom(width_mm=140.0, depth_mm=140.0)
    g = base.grid
    z, y, x = (g.axis_mm(a) for a in "zyx")
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    ct = np.array(base.ct_hu)
    ct[(np.abs(X - 20) < 15) & (np.abs(Y + 20) < 15) & (np.abs(Z) < 30)] = -700.0  # off-axis lung block
    p0 = Patient(g, ct, base.structures)
    # Rotate the patient by +90 degrees about z, (x, y) -> (-y, x), so that what gantry 0
    # saw from -y, gantry 90 sees from +x. The grid is square and symmetric about 0, so
    # new[j', i'] = old[n-1-i', j'], which is np.rot90(k=-1) over (y, x).
    n = ct.shape[1]
    probe = np.arange(n * n).reshape(n, n)
    assert np.rot90(probe, k=-1)[3, 5] == probe[n - 1 - 5, 3]
    ct_rot = np.rot90(ct, k=-1, axes=(1, 2))
    body_rot = np.rot90(base.structures[0].mask, k=-1, axes=(1, 2))
    p1 = Patient(g, ct_rot, (Structure("BODY", "external", body_rot, g),))
    e0 = DoseEngine(p0, [Beam(gantry_deg=0.0)])
    e0.set_fluences([e0.open_field(0, (-40, 40), (-40, 40))])
    e1 = DoseEngine(p1, [Beam(gantry_deg=90.0)])
    # At gantry 90 the BEV axes are rotated with the gantry: the same (u, v) field.
    e1.set_fluences([e1.open_field(0, (-40, 40), (-40, 40))])
    d0 = e0.dose_cube_host()
    d1 = np.rot90(e1.dose_cube_host(), k=1, axes=(1, 2))  # back to the original frame
    assert np.abs(d1 - d0).max() < 0.01 * d0.max()
