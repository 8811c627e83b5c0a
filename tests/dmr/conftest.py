"""Fixtures and helpers shared by the DMR tests."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

import ids_engine.dmr._repair as repair_module
import ids_engine.session as session_module
from ids_engine.dmr import MoveIsodoseSurface
from ids_engine.dmr._resolve import ResolveContext
from ids_engine.dmr._side_effects import UnaskedRise, unasked_rises
from ids_engine.session import DMROptions, Session


@pytest.fixture
def ring_as_found(monkeypatch):
    """Requests resolved with the beside-guard ring as it was when the side-effect repair
    tests' drags were found (no inner ring: ``ResolveContext.guard_ring_in_max_mm`` = inf).
    The inner ring changes a surface drag's guards, and with them which repair stage is the
    one that takes its far rise under the line; line drags are unchanged by it."""
    monkeypatch.setattr(session_module, "ResolveContext", functools.partial(ResolveContext, guard_ring_in_max_mm=np.inf))


@pytest.fixture
def lp_calls(monkeypatch):
    """The LP repair's results (``lp_far_repair``'s, the calls made), in call order."""
    calls = []
    real = repair_module.lp_far_repair

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(repair_module, "lp_far_repair", spy)
    return calls


@pytest.fixture(scope="module")
def fresh(request):
    """A fresh coarse horseshoe session per test module, with the report line and the repair's
    cap lowered to the module's ``REPORT_PCT`` and ``CAP_PCT`` (a session shared with other
    modules carries the round-off of their undos, and the repair tests' outcomes are
    sensitive to it)."""
    m = request.module
    s = Session.from_phantom("horseshoe", "coarse", prescription_gy=60.0,
                             dmr_options=DMROptions(report_rise_pct=m.REPORT_PCT, max_rise_pct=m.CAP_PCT))
    yield s
    s.close()


def set_repair(monkeypatch, s: Session, **changes) -> None:
    """Change the session's repair settings (``Session.repair_settings``, fields of
    :class:`~ids_engine.dmr._repair.RepairSettings`) for this test only."""
    monkeypatch.setattr(s, "repair_settings", dataclasses.replace(s.repair_settings, **changes))


def run_with_each(s: Session, req, monkeypatch, name: str, values, calls: list | None = None) -> list:
    """Run ``req`` once with each value of the repair setting ``name`` (a field of
    ``s.repair_settings``), undoing it each time (undo restores the dose bit for bit:
    asserted). Returns, in order, (result, dose after it, what ``calls`` collected during it)."""
    before = s.dose()
    out = []
    for v in values:
        set_repair(monkeypatch, s, **{name: v})
        if calls is not None:
            calls.clear()
        res = s.run(req)
        out.append((res, s.dose(), list(calls) if calls is not None else []))
        s.undo()
        s.clear_redo()
        np.testing.assert_array_equal(s.dose(), before)
    return out


def far_unasked(s: Session, res, before: np.ndarray, after: np.ndarray, *, floor_pct: float = 0.5,
                target_hi_gy: float | None = None) -> UnaskedRise:
    """Every far voxel's unasked rise of a drag ``res`` on the whole cube (``before`` ->
    ``after``), as the session's report defines it; voxels that rose less than ``floor_pct``
    of Rx are left out; ``target_hi_gy``: target voxels only where they end above it."""
    rx = s.prescription_gy
    rise = (after - before).ravel()
    cand = np.flatnonzero(rise > floor_pct / 100.0 * rx)
    r = res.request
    if isinstance(r, MoveIsodoseSurface):
        drag = (np.asarray(r.start_zyx, float), np.asarray(r.end_zyx, float), None)
    else:  # a line drag on a z slice
        drag = (np.array([r.slice_index, *r.start_rc], float), np.array([r.slice_index, *r.end_rc], float), 0)
    g = s.patient.grid
    return unasked_rises(cand, rise[cand], shape_zyx=g.shape_zyx, spacing_mm_zyx=g.spacing_mm_zyx,
                         feature_voxels=res.feature_voxels, before_at=lambda f: before.ravel()[np.asarray(f)],
                         target_mask=s.target_mask, oar_mask=s.oar_mask, drag=drag, target_hi_gy=target_hi_gy)


def assert_nothing_given_up(plain, fixed, fixed_dose: np.ndarray, rx: float, *, feature: bool = True) -> None:
    """A repair (``fixed``, against the same request without it, ``plain``) gave up nothing
    recovery keeps: no new conflict other than a side effect, none larger; and (``feature``)
    the request's own voxels still got what was asked."""
    def kept(r):
        return {c.name: c.worst_gy for c in r.conflicts if c.kind != "rise"}

    for name, gy in kept(fixed).items():
        assert gy <= kept(plain).get(name, 1e-3 * rx) + 1e-6, name
    if feature:
        fv = fixed.feature_voxels
        assert np.all(fixed_dose.ravel()[fv] >= fixed.feature_lo - 1e-3 * rx)
        assert np.all(fixed_dose.ravel()[fv] <= fixed.feature_hi + 1e-3 * rx)
