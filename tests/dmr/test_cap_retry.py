"""The soft cap on far tissue for isodose drags (``DMROptions.drag_max_rise_pct``) and the
capped-row retry of a joint solve (``RecoveryOptions.cap_retry_rows``), on the coarse horseshoe."""

from __future__ import annotations

import dataclasses

import numpy as np

from ids_engine import backend
from ids_engine.dmr import MoveIsodoseLine, SetVoxelDose, resolve
from ids_engine.dmr._recovery import RecoveryOptions, _Rows

RX = 60.0
DRAG = MoveIsodoseLine("z", 18, 48.0, (18.69424170710446, 56.11804616625049), (18.053872854645444, 57.22719755429408))


def _rim(s):
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    return (int(c[0]), int(np.flatnonzero(oar[c[0], :, c[2]]).min()), int(c[2]))


def test_a_drag_caps_far_tissue_lower_than_a_set_voxel_request(shaping_session):
    """Far target and normal-tissue voxels get the soft cap "before + drag_max_rise_pct" for a
    drag and "before + max_rise_pct" for a set-voxel request (its far rise keeps the target
    covered); the lower of the two when max_rise_pct is the smaller."""
    s = shaping_session
    old = s.options
    try:
        for opts, drag_pct in ((old, old.drag_max_rise_pct), (dataclasses.replace(old, max_rise_pct=2.0), 2.0)):
            s.options = opts
            for req, pct in ((DRAG, drag_pct), (SetVoxelDose(_rim(s), 0.55 * RX), opts.max_rise_pct)):
                w = s.build_watch(resolve(req, s.resolve_context()))
                capped = w.cap < w.hi
                assert capped.sum() > 100
                before = backend.asnumpy(s.engine.dose_at_voxels(w.voxels[capped])).astype(np.float64)
                np.testing.assert_allclose(w.cap[capped] - before, pct / 100.0 * RX, atol=1e-4)
    finally:
        s.options = old
    assert old.drag_max_rise_pct < old.max_rise_pct


def test_a_step_over_the_soft_cap_is_solved_again_and_journaled_whole(shaping_session):
    """A joint solve blind to the soft cap (its capped rows removed) pushes far voxels over it;
    with the retry, the step is solved again with them as rows: their summed excess over the
    cap is lower, the request's voxels still move the asked way, and the patches returned
    (first step, its take-back, the retry) replay to the same dose (the journal needs them all)."""
    s = shaping_session
    old = s.options
    eng = s.engine
    snap = eng.snapshot()
    got = {}
    try:
        s.options = dataclasses.replace(old, max_rise_pct=1.5, drag_max_rise_pct=1.5)
        resolved = resolve(DRAG, s.resolve_context())
        watch = s.build_watch(resolved)
        for k in (0, 64):
            rs = _Rows(s.modifier, watch, RecoveryOptions(cap_retry_rows=k))
            dose = backend.asnumpy(eng.dose_at_voxels(rs.vox)).astype(np.float64)
            ci = np.searchsorted(rs.vox, resolved.voxels)
            rows = rs.select(ci, dose, watch.violation(dose))
            blind = rows[~rs.capped[rows]]
            sign = np.sign(resolved.target_gy - dose[ci])
            patches, res = rs.solve(s.modifier, blind, ci, sign, dose)
            after = backend.asnumpy(eng.dose_at_voxels(rs.vox)).astype(np.float64)
            cube = s.dose()
            eng.restore(snap)
            eng.apply_patches(patches)
            np.testing.assert_allclose(s.dose(), cube, atol=1e-4)
            eng.restore(snap)
            got[k] = (len(patches), after, float(np.mean(sign * (after[ci] - dose[ci]))), rs)
    finally:
        s.options = old
        eng.restore(snap)
    n0, after0, moved0, rs = got[0]
    n1, after1, moved1, _ = got[64]
    over = rs.capped & (after0 > rs.hi_solve + 0.3)
    assert over.sum() >= 3  # the blind step did push capped voxels over their cap
    assert n1 > n0  # taken back and solved again
    excess = lambda a: float(np.maximum(a - rs.hi_solve, 0.0)[over].sum())  # noqa: E731
    assert excess(after1) < excess(after0)
    assert moved1 > 0.8 * moved0 > 0


def test_a_rejected_retry_puts_the_first_step_back_and_journals_every_patch(shaping_session, monkeypatch):
    """When the retry's solve is rejected, the first step stands: the engine ends where the
    first step took it (up to the round-off of a take-back and a re-apply), no amplitude below
    zero, and the patches returned (step, take-back, step again) replay to the engine's dose."""
    from ids_engine.dmr import _recovery

    s = shaping_session
    old = s.options
    eng = s.engine
    snap = eng.snapshot()
    first = []
    orig = _recovery._Rows._solve

    def solve_then_reject(self, *a, **kw):
        if not first:  # the step itself
            out = orig(self, *a, **kw)
            first.append(out[1])
            return out
        first.append(None)  # the retry: rejected, the plan untouched
        return [], dataclasses.replace(first[0], accepted=False, patches=[])

    try:
        s.options = dataclasses.replace(old, max_rise_pct=1.5, drag_max_rise_pct=1.5)
        resolved = resolve(DRAG, s.resolve_context())
        watch = s.build_watch(resolved)
        rs = _Rows(s.modifier, watch, RecoveryOptions(cap_retry_rows=64))
        dose = backend.asnumpy(eng.dose_at_voxels(rs.vox)).astype(np.float64)
        ci = np.searchsorted(rs.vox, resolved.voxels)
        rows = rs.select(ci, dose, watch.violation(dose))
        blind = rows[~rs.capped[rows]]
        sign = np.sign(resolved.target_gy - dose[ci])
        monkeypatch.setattr(_recovery._Rows, "_solve", solve_then_reject)
        patches, res = rs.solve(s.modifier, blind, ci, sign, dose)
        assert len(first) == 2, "the blind step should have pushed capped voxels over and been retried"
        assert res is first[0] and res.accepted
        after = backend.asnumpy(eng.dose_at_voxels(rs.vox)).astype(np.float64)
        np.testing.assert_allclose(after, res.watch_after_gy, atol=1e-3)
        assert min(float(eng.fluence_host(b).min()) for b in range(eng.n_beams)) >= 0.0
        cube = s.dose()
        eng.restore(snap)
        eng.apply_patches(patches)
        np.testing.assert_allclose(s.dose(), cube, atol=1e-4)
    finally:
        s.options = old
        eng.restore(snap)


def test_drag_previews_skip_the_retry_and_committed_drags_take_it(shaping_session, monkeypatch):
    """A drag preview (``side_effects=False``: one step, a sketch the release replaces) solves
    without the capped-row retry; the committed drag and an erase retry; a set-voxel request
    never does."""
    from ids_engine.dmr import _recovery

    s = shaping_session
    seen = []
    orig = _recovery._Rows.solve

    def spy(self, *a, **kw):
        seen.append(self.opts.cap_retry_rows)
        return orig(self, *a, **kw)

    monkeypatch.setattr(_recovery._Rows, "solve", spy)
    for kwargs, want in ((dict(recovery_steps=1, max_voxels=4, side_effects=False), 0), ({}, 64)):
        seen.clear()
        s.run(DRAG, **kwargs)
        s.undo()
        assert seen and set(seen) == {want}
    seen.clear()
    s.run(SetVoxelDose(_rim(s), 0.55 * RX), recovery_steps=3)
    s.undo()
    assert seen and set(seen) == {0}
