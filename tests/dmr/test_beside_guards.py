"""The line 10 mm beside a surface drag is read (trilinearly) from voxels some 2 mm nearer the
drag than the guard ring's 9 mm (4 mm radius + 5 mm gap): those gap voxels from 8 mm on are
guards too, holding only their side of the level (survey row 367: unguarded, they carried the
line 1.2 mm)."""

from __future__ import annotations

import numpy as np

from ids_engine.dmr import MoveIsodoseLine, MoveIsodoseSurface
from ids_engine.dmr._resolve import ResolveContext, resolve

SHAPE = (9, 40, 40)
SP = (2.0, 2.0, 2.0)
LEVEL = 60.0


def _ctx(**kw):
    x = np.arange(SHAPE[2], dtype=float)
    dose = np.broadcast_to(100.0 - 2.0 * x, SHAPE).copy()  # 2 Gy per voxel; 60 Gy at x = 20
    return ResolveContext(SHAPE, SP, np.ones(SHAPE, bool), lambda f: dose.ravel()[np.asarray(f)],
                          lambda name: np.zeros(SHAPE, bool), 60.0, **kw)


def _band(res, zyx):
    f = int(np.ravel_multi_index(zyx, SHAPE))
    i = np.flatnonzero(res.guard_voxels == f)
    return (float(res.guard_lo[i[0]]), float(res.guard_hi[i[0]])) if i.size else None


def test_gap_voxels_that_carry_the_line_10_mm_beside_a_surface_drag_keep_their_side():
    req = MoveIsodoseSurface(level_gy=LEVEL, start_zyx=(4.0, 20.0, 20.0), end_zyx=(4.0, 20.0, 22.0), radius_mm=4.0)
    res = resolve(req, _ctx())
    # (4, 24, 19): 8.2 mm from the drag segment (in the gap below the 9 mm ring), 62 Gy: held
    # above the level, not within half its distance from it.
    lo, hi = _band(res, (4, 24, 19))
    assert lo == np.float64(LEVEL + 1e-3 * LEVEL) and hi == np.inf
    # (4, 25, 18): 10.8 mm, in the ring: within half its distance (64 Gy -> 62-66 Gy).
    assert _band(res, (4, 25, 18)) == (62.0, 66.0)
    # Nearer than 8 mm: not a guard (the drag's own fall-off).
    assert _band(res, (4, 23, 19)) is None
    # The ring as it was: the gap voxel is not held.
    assert _band(resolve(req, _ctx(guard_ring_in_max_mm=np.inf)), (4, 24, 19)) is None


def test_a_line_drag_keeps_its_guards_as_they_were():
    """A 6 mm wide line drag's ring starts at 8 mm already: nothing changes for it."""
    req = MoveIsodoseLine("z", 4, LEVEL, (20.0, 20.0), (20.0, 22.0))
    a, b = resolve(req, _ctx()), resolve(req, _ctx(guard_ring_in_max_mm=np.inf))
    np.testing.assert_array_equal(a.guard_voxels, b.guard_voxels)
    np.testing.assert_array_equal(a.guard_lo, b.guard_lo)
    np.testing.assert_array_equal(a.guard_hi, b.guard_hi)
