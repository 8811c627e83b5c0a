"""The dose engine and the DMR session run the same on both backends (the GPU case skips without a device)."""

from __future__ import annotations

import numpy as np

from ids_engine import backend
from ids_engine.dmr import EraseSpot, MoveIsodoseSurface, RecoveryOptions, SetVoxelDose
from ids_engine.dose import DoseEngine, FluencePatch
from ids_engine.model import Beam
from ids_engine.session import Session

from .test_physics import water_phantom


def _engine_run():
    p = water_phantom(width_mm=80.0, depth_mm=100.0, spacing_mm=2.5)
    eng = DoseEngine(p, [Beam(gantry_deg=g) for g in (0.0, 90.0)])
    eng.set_fluences([eng.open_field(b, (-20, 20), (-20, 20)) for b in range(2)])
    eng.apply_patches([FluencePatch(1, 20, 20, np.full((9, 7), 0.3, np.float32))])
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0]])
    return eng.dose_cube_host(), backend.asnumpy(eng.dose_at_points(pts))


def test_engine_same_on_both_backends(xp_name, monkeypatch):
    cube, pts = _engine_run()
    assert backend.backend_name() == xp_name
    assert cube.max() > 0
    if xp_name == "cupy":  # pragma: no cover - GPU only: compare with the NumPy twin
        monkeypatch.setenv("IDS_BACKEND", "numpy")
        backend.reset_backend()
        ref_cube, ref_pts = _engine_run()
        np.testing.assert_allclose(cube, ref_cube, atol=2e-4 * ref_cube.max())
        np.testing.assert_allclose(pts, ref_pts, rtol=1e-3)


def test_session_request_same_on_both_backends(xp_name):
    s = Session.from_phantom("horseshoe", "coarse", n_beams=5, prescription_gy=60.0)
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    m = (int(c[0]), int(np.flatnonzero(oar[c[0], :, c[2]]).min()), int(c[2]))
    res = s.run(SetVoxelDose(m, 36.0), recovery_steps=5)
    assert abs(res.after_modification_gy[0] - 36.0) < 0.5
    # (up to 5 steps, and the request touch-up's solves when the best state missed the voxel)
    assert res.recovery_steps <= 5 + RecoveryOptions().touchup_steps
    # A joint request (modify_joint, compensation columns, the batched matrix) and an erase.
    ptv = s.patient.structure("PTV").mask
    k, i = m[0] + 4, m[2]  # a slice 16 mm from the voxel request
    j0 = int(np.flatnonzero(ptv[k, :, i]).min())
    prof, level = s.dose()[k, :, i], 0.95 * 60.0
    jj = [j for j in range(0, j0 + 3) if prof[j] < level <= prof[j + 1]][-1]
    jc = jj + (level - prof[jj]) / (prof[jj + 1] - prof[jj])  # the 95 % crossing on that column
    res = s.run(MoveIsodoseSurface(level, (k, jc, i), (k, jc - 1.5, i), radius_mm=6.0), recovery_steps=3)
    assert res.voxels.size > 0 and res.patches
    res = s.run(EraseSpot((k, j0 + 1, i), 6.0, 0.95 * 60.0, 1.0 * 60.0, structure="PTV"), recovery_steps=3)
    assert np.isfinite(backend.asnumpy(s.engine.dose_cube())).all()


def _delta_matrix_run():
    p = water_phantom(width_mm=80.0, depth_mm=100.0, spacing_mm=2.5)
    eng = DoseEngine(p, [Beam(gantry_deg=g) for g in (0.0, 90.0)])
    eng.set_fluences([eng.open_field(b, (-20, 20), (-20, 20)) for b in range(2)])
    cols = [[FluencePatch(0, 20, 20, np.full((9, 7), 0.3, np.float32))],
            [FluencePatch(1, 25, 18, np.full((5, 5), -0.2, np.float32)), FluencePatch(0, 30, 30, np.ones((4, 6), np.float32))]]
    rows = eng.body_index[::97]
    return backend.asnumpy(eng.delta_matrix(cols, rows))


def test_delta_matrix_same_on_both_backends(xp_name, monkeypatch):
    g = _delta_matrix_run()
    assert np.abs(g).max() > 0
    if xp_name == "cupy":  # pragma: no cover - GPU only: the batched FFT path against the NumPy twin
        monkeypatch.setenv("IDS_BACKEND", "numpy")
        backend.reset_backend()
        np.testing.assert_allclose(g, _delta_matrix_run(), atol=1e-4 * np.abs(g).max())
