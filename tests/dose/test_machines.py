"""The engine with imported matRad photon machines (synthetic here; the real generic machine
when IDS_MATRAD_DATA points to matRad's data folder)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ids_engine.dose import DoseEngine, calibrate, central_axis_ssd_mm
from ids_engine.io import read_matrad_machine
from ids_engine.model import Beam

from ..io.test_matrad import _machine_vars, write_mat
from .test_physics import DEPTH_HALF_MM, axis_index, water_phantom


def _pdd_and_penumbra(machine):
    p = water_phantom(width_mm=160.0)
    eng = DoseEngine(p, [Beam(isocentre_mm_xyz=(0.0, -DEPTH_HALF_MM, 0.0))], machine)
    eng.set_fluences([eng.open_field(0, (-50, 50), (-50, 50))])
    y = p.grid.axis_mm("y")
    y = y[(y > -DEPTH_HALF_MM) & (y < DEPTH_HALF_MM)]
    dose = eng.dose_cube_host().ravel()[axis_index(p, y)]
    depth = y + DEPTH_HALF_MM
    x = np.arange(0.0, 80.0, 0.5)
    prof = np.asarray(eng.dose_at_points(np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=-1)))
    prof = prof / prof[0]
    pen = np.interp(-0.2, -prof, x) - np.interp(-0.8, -prof, x)
    return depth, dose, pen


def test_synthetic_matrad_machine_in_the_engine(tmp_path):
    m = read_matrad_machine(write_mat(tmp_path / "photons.mat", _machine_vars(), "v5"))
    depth, dose, pen = _pdd_and_penumbra(m)
    # Calibrated: 1 cGy/MU at dmax for 10 x 10 at SSD 100 cm, whatever the machine's own scale.
    assert dose.max() == pytest.approx(0.01, rel=0.02)
    assert 5.0 <= depth[np.argmax(dose)] <= 30.0
    assert np.all(np.diff(dose[depth > 60]) < 0)
    assert 1.0 <= pen <= 12.0


@pytest.mark.skipif(not os.environ.get("IDS_MATRAD_DATA"), reason="IDS_MATRAD_DATA is not set (matRad data folder)")
def test_real_matrad_generic_photons():
    m = read_matrad_machine(Path(os.environ["IDS_MATRAD_DATA"]) / "machines" / "photons_Generic.mat")
    depth, dose, pen = _pdd_and_penumbra(m)
    assert 10.0 <= depth[np.argmax(dose)] <= 20.0
    assert 60.0 <= np.interp(100.0, depth, 100 * dose / dose.max()) <= 72.0
    assert 3.0 <= pen <= 9.0


# ------------------------------------------------------------ kernels per SSD, per beam
def _matrad_rule(ssds, beam_ssd):
    """matRad_PhotonPencilBeamSVDEngine.initBeam: [~, ix] = min(abs([machine.data.kernel.SSD] - SSD))."""
    return float(ssds[int(np.argmin(np.abs(np.asarray(ssds) - beam_ssd)))])


def _single_set(machine, ssd_mm):
    """The machine restricted to its kernel set at ``ssd_mm`` (SSD-independent), same calibration."""
    i = machine.kernel_ssds_mm.index(ssd_mm)
    return replace(machine, kernels_per_mm2=machine.kernel_sets_per_mm2[i], kernel_ssds_mm=(),
                   kernel_sets_per_mm2=None, kernel_ssd_mm=None)


def test_reader_keeps_every_ssd_kernel_set(tmp_path):
    m = read_matrad_machine(write_mat(tmp_path / "photons.mat", _machine_vars(), "v5"))
    assert m.kernel_ssds_mm == (900.0, 1000.0)
    assert m.kernel_sets_per_mm2.shape == (2, 3, m.kernel_radius_mm.size)
    # Default set: nearest 950 mm, a tie, which matRad's min (and argmin) gives to the first.
    assert m.kernel_ssd_mm == 900.0 == m.meta["kernel_ssd_mm"]
    np.testing.assert_array_equal(m.kernels_per_mm2, m.kernel_sets_per_mm2[0])
    assert m.for_ssd(950.0) is m
    assert m.for_ssd(851.0).kernel_ssd_mm == 900.0
    np.testing.assert_array_equal(m.for_ssd(851.0).kernels_per_mm2, m.kernel_sets_per_mm2[0])
    assert m.for_ssd(1200.0).kernel_ssd_mm == 1000.0
    # The two sets differ (sharper primary at 900 mm in this synthetic machine, both blurred
    # by the 5 mm FWHM source penumbra).
    assert m.kernel_sets_per_mm2[0, 0, 0] > 1.2 * m.kernel_sets_per_mm2[1, 0, 0]


def test_kernel_set_chosen_per_beam_from_central_axis_ssd(tmp_path):
    """A gantry-0 and a gantry-90 beam on a box 200 mm deep (y) and 60 mm wide (x): SSDs 900
    and 970 mm; matRad's rule gives the 900 and the 1000 mm kernels, and the gantry-90 dose
    is that of the 1000 mm set alone, not that of the 900 mm set."""
    m = calibrate(read_matrad_machine(write_mat(tmp_path / "photons.mat", _machine_vars(), "v5"), ssd_mm=900.0))
    assert m.kernel_ssd_mm == 900.0
    p = water_phantom(width_mm=60.0)  # x, z in (-30, 30) mm; y in (-100, 100) mm
    beams = [Beam(gantry_deg=0.0), Beam(gantry_deg=90.0)]
    eng = DoseEngine(p, beams, m)
    ssds = [g.ssd_mm for g in eng.geometry]
    assert ssds == [pytest.approx(900.0, abs=1e-6), pytest.approx(970.0, abs=1e-6)]
    assert [g.kernel_ssd_mm for g in eng.geometry] == [_matrad_rule(m.kernel_ssds_mm, s) for s in ssds] == [900.0, 1000.0]
    assert eng.describe()["kernel_ssd_mm"] == [900.0, 1000.0]

    def lateral_dose(machine):
        e = DoseEngine(p, [Beam(gantry_deg=90.0)], machine)
        e.set_fluences([e.open_field(0, (-20, 20), (-20, 20))])
        return e.dose_cube_host()

    eng.set_fluences([np.zeros(eng.geometry[0].fluence_grid.shape_vu, np.float32),
                      eng.open_field(1, (-20, 20), (-20, 20))])
    d = eng.dose_cube_host()
    d1000, d900 = lateral_dose(_single_set(m, 1000.0)), lateral_dose(_single_set(m, 900.0))
    np.testing.assert_allclose(d, d1000, atol=1e-6 * d.max())
    # The sets' primaries differ in width (2.5 vs 2.0 mm): the penumbra moves by a clear margin.
    assert np.abs(d - d900).max() > 0.03 * d.max()
    # The gantry-0 beam keeps the 900 mm set.
    eng.set_fluences([eng.open_field(0, (-20, 20), (-20, 20)), np.zeros(eng.geometry[1].fluence_grid.shape_vu, np.float32)])
    e900 = DoseEngine(p, [Beam(gantry_deg=0.0)], _single_set(m, 900.0))
    e900.set_fluences([e900.open_field(0, (-20, 20), (-20, 20))])
    np.testing.assert_allclose(eng.dose_cube_host(), e900.dose_cube_host(), atol=1e-6 * d.max())


@pytest.mark.parametrize(("gantry", "iso", "expected"), [
    (0.0, (0.0, 0.0, 0.0), 900.0),
    (180.0, (0.0, 0.0, 0.0), 900.0),
    (90.0, (0.0, 0.0, 0.0), 970.0),
    (270.0, (0.0, 0.0, 0.0), 970.0),
    (0.0, (0.0, -150.0, 0.0), 1050.0),  # isocentre in air in front of the box: traced beyond it
    (0.0, (0.0, 50.0, 0.0), 850.0),
    (0.0, (45.0, 0.0, 0.0), None),  # the axis misses the box
])
def test_central_axis_ssd_against_geometry(gantry, iso, expected):
    p = water_phantom(width_mm=60.0)
    dens = p.relative_electron_density() * p.body_mask()
    got = central_axis_ssd_mm(dens, p.grid, Beam(gantry_deg=gantry, isocentre_mm_xyz=iso))
    assert got == (pytest.approx(expected, abs=1e-6) if expected is not None else None)


def test_lung_threshold_and_default_machine():
    """matRad's skin is the first voxel above 0.05 relative electron density; a machine with
    one kernel set has no SSD choice."""
    p = water_phantom(width_mm=60.0, slab=(-100.0, -80.0), slab_hu=-700.0)  # 20 mm of lung at the surface
    dens = p.relative_electron_density() * p.body_mask()
    assert central_axis_ssd_mm(dens, p.grid, Beam()) == pytest.approx(900.0, abs=1e-6)
    dens[:, :, :] = np.where(dens < 0.5, 0.04, dens)  # below the threshold: not the surface
    assert central_axis_ssd_mm(dens, p.grid, Beam()) == pytest.approx(920.0, abs=1e-6)
    eng = DoseEngine(p, [Beam()])
    assert eng.geometry[0].ssd_mm == pytest.approx(900.0, abs=1e-6)
    assert eng.geometry[0].kernel_ssd_mm is None and eng.geometry[0].machine is eng.machine
