"""The device runs' segment table of an update (``DoseEngine._segment_table``, two strided
slices of the level's tile table per window, merged in one pass) holds exactly the voxel ranges
of each window that the NumPy runs walk (``Level.ranges`` merged by ``_merge_ranges``)."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import DoseEngine
from ids_engine.dose._engine import LEVELS, _merge_ranges, _window_box
from ids_engine.phantoms import PHANTOMS
from ids_engine.planning import equispaced_beams


@pytest.fixture(scope="module")
def engine():
    p = PHANTOMS["horseshoe"](resolution="coarse")
    return DoseEngine(p, equispaced_beams(5, p.targets[0].centroid_xyz()))


def _windows(eng, name, rng, n=12):
    """(beams, boxes) of ``n`` windows as _plan_level makes them: beams repeated and in any
    order, windows inside the map, across each edge and corner, one cell wide, a whole map."""
    la = eng._levels[name]
    beams, boxes = [], []
    for i in range(n):
        b = int(rng.integers(eng.n_beams))
        mh, mw = getattr(eng.geometry[b], name).map_shape
        h, w = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        if i == 0:
            h, w = mh, mw
        row0 = int(rng.integers(-h + 1, mh + 1)) if i else la.half
        col0 = int(rng.integers(-w + 1, mw + 1)) if i else la.half
        box = _window_box(row0, col0, (h, w), la.half, (mh, mw))
        if box is None:
            continue
        beams.append(b)
        boxes.append(box)
    return np.asarray(beams, np.int32), np.asarray(boxes, np.int32).reshape(-1, 6)


def _per_window(eng, name, beams, boxes):
    out = []
    for p, b in enumerate(beams):
        lvl = getattr(eng.geometry[int(b)], name)
        _, _, r_lo, r_hi, c_lo, c_hi = (int(x) for x in boxes[p])
        for s, e in _merge_ranges([(s + lvl.base, e + lvl.base) for s, e in lvl.ranges(r_lo, r_hi - 1, c_lo, c_hi - 1)]):
            out.append((s, e, p))
    return out


@pytest.mark.parametrize("name", LEVELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_table_holds_each_windows_merged_ranges_in_order(engine, name, seed):
    beams, boxes = _windows(engine, name, np.random.default_rng(seed))
    want = _per_window(engine, name, beams, boxes)
    assert len(want) > len(beams)  # windows with several ranges, so merging and order matter
    seg_first, seg_start, seg_patch = engine._segment_table(name, beams, boxes)
    assert seg_first.dtype == seg_start.dtype == seg_patch.dtype == np.int32
    got = [(int(s), int(s + seg_first[k + 1] - seg_first[k]), int(seg_patch[k])) for k, s in enumerate(seg_start)]
    assert got == want
    assert seg_first[0] == 0 and np.all(np.diff(seg_first) > 0)


def test_segment_table_of_windows_without_voxels_is_empty(engine):
    # A one-cell box in the map's far corner, beyond every voxel's tile: no range.
    name = "fine"
    la = engine._levels[name]
    for b, g in enumerate(engine.geometry):
        lvl = getattr(g, name)
        mh, mw = lvl.map_shape
        box = np.array([[mh - 1 - la.half, mw - 1 - la.half, mh - 1, mh, mw - 1, mw]], np.int32)
        if not _per_window(engine, name, np.array([b], np.int32), box):
            seg_first, seg_start, seg_patch = engine._segment_table(name, np.array([b], np.int32), box)
            assert seg_first.tolist() == [0] and seg_start.size == 0 and seg_patch.size == 0
            return
    pytest.skip("every beam has voxels under its far corner")
