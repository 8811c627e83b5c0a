"""Launch, sync and transfer budgets of the interactive loop (issue 10), counted on the
device-cost backend (what CuPy would do), so they hold without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine import backend
from ids_engine._devicecost import DeviceArray, counting
from ids_engine.dmr import SetVoxelDose
from ids_engine.dose import FluencePatch
from tests.conftest import use_backend

RX = 60.0
# (launches, syncs) per stage, issue 10's goals.
BUDGET = {"incremental_update": (20, 0), "dmr_step": (60, 2)}


@pytest.fixture(scope="module")
def counted_session():
    from ids_engine.session import Session

    with use_backend("devicecost"):
        yield Session.from_phantom("horseshoe", "coarse", prescription_gy=RX)


def _oar_rim_voxel(s) -> tuple[int, int, int]:
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    return (int(c[0]), j, int(c[2]))


def test_engine_state_lives_on_the_device(counted_session):
    eng = counted_session.engine
    for a in (eng.dose_fine, eng.dose_coarse, eng._fluence_buf, *eng._maps_buf.values(),
              *(la.vox for la in eng._levels.values()), *(la.weights for la in eng._levels.values())):
        assert isinstance(a, DeviceArray)


def test_incremental_update_of_nine_beams_is_a_handful_of_launches_and_no_sync(counted_session):
    eng = counted_session.engine
    patches = [FluencePatch(b, g.fluence_grid.shape_vu[0] // 2 - 12, g.fluence_grid.shape_vu[1] // 2 - 12,
                            np.full((25, 25), 0.01, np.float32)) for b, g in enumerate(eng.geometry)]
    eng.apply_patches(patches)  # first call for this window shape caches the kernel spectra
    with counting() as c:
        eng.apply_patches([FluencePatch(p.beam, p.row0, p.col0, -p.delta) for p in patches])
    launches, syncs = BUDGET["incremental_update"]
    assert c.launches <= launches, c.top("launches")
    # What it is now, per level an FFT, the product with the kernel spectra (every beam has a
    # window, so the spectra need no gather), an inverse FFT, the windows into the maps and the
    # segments into the dose; and the windows into the fluence.
    assert c.launches <= 11, c.top("launches")
    assert c.syncs == syncs and c.d2h == 0
    assert c.h2d <= 2  # the packed windows and the packed index tables
    # What is copied is the windows' zero-padded FFT stacks (float32, about 0.53 MB for these
    # 9 beams on both levels) and per-window tables, not an index per window element (the
    # maps' cells are found on the device from each window's box: an int32 index of every
    # element was another 1.1 MB here).
    assert c.h2d_bytes < 1_000_000, c.h2d_bytes


def test_a_dmr_step_stays_within_its_launch_and_sync_budget(counted_session):
    s = counted_session
    m = _oar_rim_voxel(s)
    # Recovery steps only: the side-effect check and its repair pass are budgeted below.
    with counting() as c0:
        s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=0, side_effects=False)
    s.undo()
    with counting() as c5:
        res = s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=5, side_effects=False)
    s.undo()
    steps = res.recovery_steps
    assert steps == 5
    launches, syncs = BUDGET["dmr_step"]
    assert (c5.launches - c0.launches) <= launches * steps, c5.top("launches")
    assert (c5.syncs - c0.syncs) <= syncs * steps, c5.top("syncs")


def test_the_side_effect_check_is_a_few_device_operations_and_reads_no_cube(counted_session):
    """Comparing the cube with the one before a request (the rise, the voxels above the
    threshold, their rise and the dose before at them): a few dozen launches, a few syncs, and
    only the far risers read back, not the cube. (The repair pass, when one runs, is recovery
    steps and is off here.)"""
    import dataclasses

    s = counted_session
    m = _oar_rim_voxel(s)
    old = s.options
    s.options = dataclasses.replace(old, side_effect_repair_steps=0)
    try:
        with counting() as off:
            s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=2, side_effects=False)
        s.undo()
        with counting() as on:
            res = s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=2)
        s.undo()
    finally:
        s.options = old
    assert [c for c in res.conflicts if c.kind == "rise"], "the check found nothing to read back: pick another case"
    cube_bytes = int(np.prod(s.patient.grid.shape_zyx)) * 4
    assert on.launches - off.launches <= 60, on.top("launches")
    assert on.syncs - off.syncs <= 4, on.top("syncs")
    assert on.d2h_bytes - off.d2h_bytes < cube_bytes / 10


def test_reading_the_dose_at_voxels_is_one_sync(counted_session):
    eng = counted_session.engine
    vox = np.random.default_rng(3).choice(eng.body_index, 500, replace=False)
    with counting() as c:
        d = eng.dose_at_voxels(vox)
    assert c.syncs == 0 and c.launches <= 6 and c.h2d == 2
    with counting() as c:
        backend.asnumpy(d)
    assert c.syncs == 1 and c.d2h == 1
    # The same voxels again (recovery reads its watch every step): the tables are on the
    # device already, nothing is copied; the values are the same.
    with counting() as c:
        again = eng.dose_at_voxels(vox.copy())
    assert c.h2d == 0 and c.syncs == 0 and c.launches <= 6
    np.testing.assert_array_equal(backend.asnumpy(again), backend.asnumpy(d))


def test_a_joint_solves_matrix_is_one_device_read_equal_to_the_host_path(counted_session):
    """A DMR joint solve's matrix with its beam parts (``delta_matrix(beam_parts=True)``) is
    read on the device: two copies up, three launches, one read back; on the counting
    backend equal bit for bit to the host path's read-out on the same engine."""
    eng = counted_session.engine
    vox = eng.body_index[:: max(1, eng.body_index.size // 400)]
    m = counted_session.modifier
    cols = [m.normalised_patches(int(v), raise_dose=sign > 0) for v, sign in ((vox[150], 1), (vox[200], -1), (vox[220], 1))]
    cols = [c for c in cols if c]
    assert len(cols) >= 2
    eng.delta_matrix(cols, vox, beam_parts=True)  # the beams' kernels are packed once
    with counting() as c:
        joint, parts = eng.delta_matrix(cols, vox, beam_parts=True)
    assert (c.launches, c.syncs, c.h2d, c.d2h) == (3, 1, 2, 1), c.top("launches")
    host_joint, host_parts = eng._host_delta_matrix(cols, vox, beam_parts=True)  # the host path, same engine
    np.testing.assert_array_equal(joint, host_joint)
    np.testing.assert_array_equal(parts, host_parts)
    assert np.abs(joint).max() > 0


def test_dmr_queries_are_answered_on_the_host(counted_session):
    """A patch's dose at voxels, a voxel's BEV position and the fluence under a patch: no
    device work (a joint solve's matrix with beam parts is read on the device, see above)."""
    eng = counted_session.engine
    vox = eng.body_index[:: max(1, eng.body_index.size // 200)]
    p = FluencePatch(0, 40, 40, np.full((10, 10), 0.05, np.float32))
    with counting() as c:
        eng.delta_at_voxels([p], vox)
        eng.delta_matrix([[p], [FluencePatch(1, 30, 30, np.ones((5, 5), np.float32))]], vox)
        eng.voxel_bev(2, vox[:10])
        eng.fluence_host(3)[10:20, 10:20].sum()
    assert (c.launches, c.syncs, c.h2d, c.d2h) == (0, 0, 0, 0)


def test_a_preview_copies_the_displayed_slices_and_dvh_counts_not_the_cube(counted_session):
    s = counted_session
    g = s.patient.grid
    centre = tuple(n // 2 for n in g.shape_zyx)
    s.display_readout(centre)  # the structures' indices go to the device once
    with counting() as c:
        r = s.display_readout(centre)
    cube_bytes = g.size * 4
    assert c.syncs == 2 and c.d2h == 2
    assert c.d2h_bytes < cube_bytes / 5, (c.d2h_bytes, cube_bytes)
    dose = s.dose()
    k, j, i = centre
    np.testing.assert_array_equal(r.axial_gy, dose[k])
    np.testing.assert_array_equal(r.coronal_gy, dose[:, j])
    np.testing.assert_array_equal(r.sagittal_gy, dose[:, :, i])
    assert r.max_gy == pytest.approx(float(dose.max()))


def test_device_dvh_matches_the_exact_dvh_to_one_bin(coarse_horseshoe_session):
    from ids_engine.evaluation import dvh

    s = coarse_horseshoe_session
    r = s.display_readout(tuple(n // 2 for n in s.patient.grid.shape_zyx))
    dose = s.dose()
    vcc = s.patient.grid.voxel_volume_cc
    for curve in r.dvhs:
        exact = dvh(curve.name, dose, s.patient.structure(curve.name).mask, vcc)
        assert curve.volume_cc == pytest.approx(exact.volume_cc)
        # Same 0.1 Gy bins from 0; a voxel on a bin edge may fall on either side (float32
        # binning on the device): each point of the curve lies between its neighbours' exact values.
        n = min(curve.dose_gy.size, exact.dose_gy.size) - 1
        ex = np.concatenate([[1.0], exact.volume_fraction[:n + 1], [0.0]])
        got = curve.volume_fraction[:n]
        assert np.all(got <= ex[:n] + 1e-9) and np.all(got >= ex[2 : n + 2] - 1e-9)
        assert np.mean(np.abs(got - exact.volume_fraction[:n])) < 1e-4


def test_every_uploaded_part_starts_aligned_for_cufft():
    """cuFFT refuses misaligned input: each part of a packed upload starts 256 bytes in."""
    from ids_engine.dose._engine import _Uploads

    up = _Uploads()
    keys = [up.add(np.ones(n, np.float32)) for n in (25, 7, 64, 1)] + [up.add(np.ones((3, 5), np.int32))]
    sent = up.send(np)
    for key, n in zip(keys, (25, 7, 64, 1, 15)):
        dtype, start, shape = key
        assert start % 64 == 0
        assert _Uploads.view(sent, key).size == n and np.all(_Uploads.view(sent, key) == 1)
