"""The default 6 MV model against typical clinical 6 MV water data (SSD 100 cm), through the
engine: see :func:`ids_engine.model.default_6mv` for the targets and their source."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import DoseEngine
from ids_engine.model import Beam
from ids_engine.phantoms import water_box

STEP_MM = 0.25


@pytest.fixture(scope="module")
def water_ssd100():
    """The water phantom (2 mm voxels) with the isocentre on its anterior surface: SSD 100 cm."""
    p = water_box("clinical", size_mm=(240.0, 250.0, 240.0))  # wide enough for 20 x 20
    surface_y = p.meta["anterior_surface_y_mm"]
    eng = DoseEngine(p, [Beam(isocentre_mm_xyz=(0.0, surface_y, 0.0))])
    return p, surface_y, eng


def _axis(eng, p, surface_y, field_mm):
    """Point doses every 0.25 mm and voxel doses on the central axis: (depth, dose) twice."""
    half = field_mm / 2.0
    eng.set_fluences([eng.open_field(0, (-half, half), (-half, half))])
    depth = np.arange(0.0, 240.0, STEP_MM)
    pts = np.stack([np.zeros_like(depth), surface_y + depth, np.zeros_like(depth)], axis=-1)
    dose = np.asarray(eng.dose_at_points(pts), dtype=np.float64)
    y = p.grid.axis_mm("y")
    y = y[(y > surface_y) & (y < surface_y + 240.0)]
    kji = p.grid.nearest_index(np.stack([np.zeros_like(y), y, np.zeros_like(y)], axis=-1))
    vox = eng.dose_cube_host()[tuple(kji.T)].astype(np.float64)
    return depth, dose, y - surface_y, vox


def test_default_6mv_depth_dose_10x10_ssd100(water_ssd100):
    p, surface_y, eng = water_ssd100
    depth, dose, vdepth, vox = _axis(eng, p, surface_y, 100.0)
    d_max = depth[np.argmax(dose)]
    pdd = 100.0 * dose / dose.max()
    pdd10, pdd20 = np.interp(100.0, depth, pdd), np.interp(200.0, depth, pdd)
    assert 13.0 <= d_max <= 17.0, f"dmax {d_max} mm"
    assert 66.5 <= pdd10 <= 67.5, f"PDD(10 cm) {pdd10:.2f} %"
    assert 85.5 <= np.interp(50.0, depth, pdd) <= 87.5
    # Beam quality: TPR20,10 = 1.2661 PDD20,10 - 0.0595 (IAEA TRS-398) near 0.67 for 6 MV.
    assert 0.66 <= 1.2661 * pdd20 / pdd10 - 0.0595 <= 0.69
    # The voxel dose (2 mm voxels, centres 1, 3, ... mm deep) tells the same.
    vpdd = 100.0 * vox / vox.max()
    assert 66.5 <= np.interp(100.0, vdepth, vpdd) <= 67.5
    assert 13.0 <= vdepth[np.argmax(vox)] <= 17.0
    # Calibration: 1 cGy/MU at dmax of this field.
    assert dose.max() == pytest.approx(0.01, rel=2e-3)


def test_default_6mv_field_size_dependence(water_ssd100):
    """PDD(10 cm) rises with field size (phantom scatter) as for clinical 6 MV beams, about
    63 % (5 x 5) and 70.5 % (20 x 20); the phantom scatter factor at dmax about 0.975 and 1.025."""
    p, surface_y, eng = water_ssd100
    u = eng.geometry[0].fluence_grid.u_mm()
    assert u.min() < -100.0 and u.max() > 100.0  # the 20 x 20 field is not clipped
    res = {}
    for field in (50.0, 100.0, 200.0):
        depth, dose, _, _ = _axis(eng, p, surface_y, field)
        res[field] = (dose.max(), np.interp(100.0, depth, 100.0 * dose / dose.max()))
    assert 62.0 <= res[50.0][1] <= 64.0
    assert 69.5 <= res[200.0][1] <= 71.5
    assert 0.96 <= res[50.0][0] / res[100.0][0] <= 0.99
    assert 1.01 <= res[200.0][0] / res[100.0][0] <= 1.04
