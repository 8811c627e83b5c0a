"""What a request (a drag preview above all) reuses instead of rebuilding gives the same results
bit for bit: the watch built on the session's geometry-only base (target, OAR, normal-tissue
sample) equals the union marked on the grid; its row tables taken from the base's equal a
fresh build and select the same voxels (numba and NumPy); the watch's dose read as base plus
extra voxels, and remembered per plan-state version, equals a direct read and is read again
after any change (a request, an undo); two previews of one drag from the same plan state give
the same dose, and undo brings the state back exactly. Coarse horseshoe."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ids_engine import backend
from ids_engine.dmr import MoveIsodoseLine, SetVoxelDose, resolve
from ids_engine.dmr._recovery import (RecoveryOptions, Watch, WatchBase, _composed_dose, _Rows, _watch_dose,
                                      compose_watch)
from ids_engine.kernels import _cpu

RX = 60.0


@pytest.fixture
def s(shaping_session):
    return shaping_session


def _rim_voxel(s) -> tuple[int, int, int]:
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    return int(c[0]), j, int(c[2])


def _drag(s, mm: float = 4.0) -> MoveIsodoseLine:
    """The 95 % line where it first crosses the column through the OAR's rim voxel (the
    target's anterior edge), dragged ``mm`` outwards (as bench_device_cost's drag)."""
    k, _, i = _rim_voxel(s)
    d = s.dose()[k, :, i]
    level = 0.95 * RX
    above = np.flatnonzero(d >= level)
    assert above.size and above[0] > 0
    y1 = int(above[0])
    y = y1 - (d[y1] - level) / (d[y1] - d[y1 - 1])
    sp = s.patient.grid.spacing_mm_zyx[1]
    return MoveIsodoseLine("z", k, level, (float(y), float(i)), (float(y - mm / sp), float(i)))


def _hash(s) -> str:
    return hashlib.sha256(np.ascontiguousarray(s.dose(), np.float32).tobytes()).hexdigest()


def _plain(watch: Watch) -> Watch:
    """The same watch without its base (what a fresh build sees)."""
    return Watch(watch.voxels, watch.lo, watch.hi, watch.goal, watch.weight, watch.group, watch.names, watch.kinds,
                 watch.cap, watch.floor)


def test_compose_watch_equals_the_union_marked_on_the_grid(rng):
    size = 20_000
    base = WatchBase(np.sort(rng.choice(size, 3000, replace=False)))
    for _ in range(20):
        removed = rng.choice(base.voxels.size, rng.integers(0, 50), replace=False)
        others = [rng.choice(size, rng.integers(0, 40)) for _ in range(rng.integers(0, 4))]
        if others and rng.random() < 0.5:  # some of the others are removed base voxels again
            others.append(base.voxels[removed[: 5]])
        mark = np.zeros(size, bool)
        keep = np.ones(base.voxels.size, bool)
        keep[removed] = False
        mark[base.voxels[keep]] = True
        for o in others:
            mark[o] = True
        allv, comp = compose_watch(base, removed, others)
        assert np.array_equal(allv, np.flatnonzero(mark))
        src = np.concatenate([base.voxels, comp.extra])
        assert np.array_equal(src[comp.source], allv)
        kept = comp.base_at >= 0
        assert np.array_equal(allv[comp.base_at[kept]], base.voxels[kept])
        assert np.array_equal(allv[comp.extra_at], comp.extra)
        assert not np.isin(comp.extra, base.voxels).any()
    for bad in ([-1], [base.voxels.size]):  # a base index out of range is refused, not wrapped
        with pytest.raises(ValueError, match="removed base indices"):
            compose_watch(base, bad, [])


def test_a_drag_watch_is_built_on_the_base_and_equals_the_union(s):
    r = resolve(_drag(s), s.resolve_context(4))
    w = s.build_watch(r)
    comp = w.__dict__.get("_composition")
    assert comp is not None and comp.base is s._watch_base().base
    assert comp.extra.size > 0  # the drag's own voxels and guards lie partly outside the base
    # The watch holds the target, the OAR, the far normal sample and the request's voxels.
    wb = s._watch_base()
    assert np.isin(wb.tvox, w.voxels).all() and np.isin(wb.ovox, w.voxels).all()
    assert np.isin(r.feature_voxels, w.voxels).all() and np.isin(r.guard_voxels, w.voxels).all()
    assert comp.removed.size and not np.isin(wb.base.voxels[comp.removed], w.voxels).any()


@pytest.mark.parametrize("numba", [True, False])
def test_rows_from_the_base_equal_a_fresh_build(s, monkeypatch, numba):
    if numba and not _cpu.HAVE_NUMBA:
        pytest.skip("numba not installed")
    monkeypatch.setattr(_cpu, "HAVE_NUMBA", numba)  # the one switch of every compiled host loop
    w = s.build_watch(resolve(_drag(s), s.resolve_context(4)))
    opts = RecoveryOptions()
    got = _Rows(s.modifier, w, opts)
    ref = _Rows(s.modifier, _plain(w), opts)
    assert getattr(got, "_split", None) is not None and getattr(ref, "_split", None) is None
    for name in ("index_zyx", "coords", "bev_u2", "bev_v2", "bev_w2", "hard", "always", "hi_solve", "capped"):
        assert np.array_equal(getattr(got, name), getattr(ref, name), equal_nan=True), name
    rng = np.random.default_rng(3)
    extra_at = got._split[4]
    dose = _watch_dose(s.engine, w)
    viol = w.violation(dose)
    for t in range(60):
        cols = rng.choice(w.voxels.size, int(rng.integers(1, 9)), replace=False)
        if t % 2:
            cols[: min(2, cols.size)] = rng.choice(extra_at, min(2, cols.size))
        cols = np.unique(cols)
        assert np.array_equal(got._under_patches(cols), ref._under_patches(cols))
        assert np.array_equal(got.select(cols, dose, viol), ref.select(cols, dose, viol))


def test_watch_dose_read_as_base_and_extra_equals_a_direct_read_and_follows_the_plan(s):
    eng = s.engine
    w = s.build_watch(resolve(_drag(s), s.resolve_context(4)))
    comp = w._composition
    direct = backend.asnumpy(eng.dose_at_voxels(w.voxels)).astype(np.float64)
    assert np.array_equal(_composed_dose(eng, comp), direct)
    assert np.array_equal(_watch_dose(eng, w), direct)
    got = _watch_dose(eng, w)
    got[:] = -1.0  # a copy: the remembered read is not changed through it
    assert np.array_equal(_watch_dose(eng, w), direct)
    # A request changes the plan: the remembered reads (the watch's and the base's) are stale.
    s.run(SetVoxelDose(_rim_voxel(s), 0.6 * RX), recovery_steps=2)
    now = backend.asnumpy(eng.dose_at_voxels(w.voxels)).astype(np.float64)
    assert not np.array_equal(now, direct)
    assert np.array_equal(_watch_dose(eng, w), now)
    assert np.array_equal(_composed_dose(eng, comp), now)
    # Undo restores the state and its version: the base's read of that state is valid again.
    s.undo()
    assert np.array_equal(_composed_dose(eng, comp), direct)
    assert np.array_equal(_watch_dose(eng, w), direct)
    # The base's dose kept for a state is the base's dose there, and only read at that state.
    e, db = comp.base.memo["dose"][eng.state_version]  # kept when the watch was built
    assert e is eng and np.array_equal(db, backend.asnumpy(eng.dose_at_voxels(comp.base.voxels)))


def _sequence(sess) -> list:
    """Dose hashes (and conflicts) along previews of a drag taken back, previews stacked as
    the viewer runs them (each on the last, ignoring its feature), undo, redo, a committed
    request and a preview after it."""
    out = []
    drag = _drag(sess)
    h0, v0 = _hash(sess), sess.engine.state_version
    for _ in range(2):
        r = sess.run(drag, recovery_steps=1, max_voxels=4, side_effects=False)
        out.append((_hash(sess), [c.message for c in r.conflicts]))
        sess.undo()
        assert _hash(sess) == h0 and sess.engine.state_version == v0  # the snapshot: exact
    ids = []
    for mm in (3.0, 4.0, 5.0):
        ids.append(sess.run(_drag(sess, mm), recovery_steps=1, max_voxels=4, side_effects=False,
                            ignore_features_of=tuple(ids)).id)
        out.append(_hash(sess))
    for _ in ids:
        sess.undo()
        out.append(_hash(sess))
    for _ in ids:
        sess.redo()
        out.append(_hash(sess))
    for _ in ids:
        sess.undo()
    r = sess.run(SetVoxelDose(_rim_voxel(sess), 0.6 * RX), recovery_steps=3)
    out.append((_hash(sess), r.recovery_steps, r.best_step))
    sess.run(_drag(sess), recovery_steps=1, max_voxels=4, side_effects=False)
    out.append(_hash(sess))
    return out


def test_previews_undo_redo_and_requests_equal_the_uncached_path(s, monkeypatch):
    """The same sequence on this session (caches on, some built by earlier tests at other plan
    states) and on a fresh one with every cache of this module switched off (watches built
    without a base: fresh row tables, direct dose reads): the same dose, bit for bit, at
    every point; two previews of one drag from the same state give the same dose."""
    from ids_engine import session as session_module
    from ids_engine.dmr import _recovery as recovery_module
    from ids_engine.session import Session

    got = _sequence(s)
    assert got[0] == got[1]  # a repeated preview equals the first
    fresh = Session.from_phantom("horseshoe", "coarse", prescription_gy=RX)
    monkeypatch.setattr(session_module, "attach_composition", lambda watch, comp: watch)
    monkeypatch.setattr(session_module, "_composed_dose",
                        lambda eng, comp, remember=False: backend.asnumpy(eng.dose_at_voxels(
                            np.concatenate([comp.base.voxels, comp.extra])[comp.source])).astype(np.float64))
    monkeypatch.setattr(session_module, "_remember_dose", lambda eng, watch, dose: None)
    monkeypatch.setattr(recovery_module, "_remember_dose", lambda eng, watch, dose: None)
    ref = _sequence(fresh)
    assert "_composition" not in fresh.build_watch(resolve(_drag(fresh), fresh.resolve_context(4))).__dict__
    assert got == ref
