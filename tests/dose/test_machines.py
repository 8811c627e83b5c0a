"""The engine with imported matRad photon machines (synthetic here; the real generic machine
when IDS_MATRAD_DATA points to matRad's data folder)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ids_engine.dose import DoseEngine
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
