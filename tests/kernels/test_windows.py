"""add_windows: the NumPy twin against a slow reference (an index table and ``numpy.add.at``, as
the engine scattered the windows before), the counting backend (one launch, the twin's result,
nothing copied) and CuPy against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine._devicecost import counting, devicecost
from ids_engine.kernels.windows import add_windows, add_windows_numpy


def _case(rng, nc=2, fh=12, fw=16):
    """Three beams' maps of different shapes in one flat buffer (a sink cell after them, as
    the engine's), one window per beam: the whole window on the map, a window reaching off the
    map's top-left corner (valid box smaller), one reaching off the bottom-right; non-zero
    everywhere in the windows, so an element written outside its valid box shows."""
    shapes = [(20, 30), (15, 18), (40, 25)]
    bases = np.concatenate([[0], np.cumsum([nc * h * w for h, w in shapes])])
    maps = rng.random(int(bases[-1]) + 1).astype(np.float32)
    windows = (rng.random((3, nc, fh, fw)) + 0.5).astype(np.float32)
    boxes, info = [], []
    for p, (o_r, o_c) in enumerate([(3, 5), (-4, -6), (34, 15)]):
        mh, mw = shapes[p]
        boxes.append((o_r, o_c, max(o_r, 0), min(o_r + fh, mh), max(o_c, 0), min(o_c + fw, mw)))
        info.append((int(bases[p]), mh, mw))
    return maps, windows, np.asarray(boxes, np.int32), np.asarray(info, np.int32)


def _reference(maps, windows, boxes, info):
    """The flat index of every window element (the sink, the buffer's last cell, outside the
    valid box) and one ``numpy.add.at``."""
    out = maps.copy()
    p_, nc, fh, fw = windows.shape
    sink = out.size - 1
    index = np.full(windows.shape, sink, np.int64)
    for p in range(p_):
        o_r, o_c, r_lo, r_hi, c_lo, c_hi = (int(x) for x in boxes[p])
        base, mh, mw = (int(x) for x in info[p])
        for c in range(nc):
            for r in range(r_lo, r_hi):
                for col in range(c_lo, c_hi):
                    index[p, c, r - o_r, col - o_c] = base + (c * mh + r) * mw + col
    inside = index != sink
    np.add.at(out, index[inside], windows[inside])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_add_windows_numpy_twin_equals_the_indexed_scatter(seed):
    maps, windows, boxes, info = _case(np.random.default_rng(seed))
    assert (boxes[1, 2] > boxes[1, 0]) and (boxes[2, 3] < boxes[2, 0] + windows.shape[2])  # clipped boxes
    ref = _reference(maps, windows, boxes, info)
    got = add_windows_numpy(maps.copy(), windows, boxes, info)
    np.testing.assert_array_equal(got, ref)  # one float32 add per cell either way
    changed = got != maps
    assert changed[:-1].sum() == sum((b[3] - b[2]) * (b[5] - b[4]) for b in boxes) * windows.shape[1]
    assert not changed[-1]  # the sink is never written


def test_add_windows_counting_backend_is_one_launch_with_the_twins_result(rng):
    maps, windows, boxes, info = _case(rng)
    host = add_windows_numpy(maps.copy(), windows, boxes, info)
    dev_maps = devicecost.asarray(maps)
    dev = [devicecost.asarray(a) for a in (windows, boxes, info)]
    with counting() as c:
        out = add_windows(dev_maps, *dev)
    assert out is dev_maps
    assert (c.launches, c.syncs, c.h2d, c.d2h) == (1, 0, 0, 0)
    np.testing.assert_array_equal(dev_maps.get(), host)


def test_add_windows_of_no_window_launches_nothing(rng):
    maps, windows, boxes, info = _case(rng)
    dev_maps = devicecost.asarray(maps)
    with counting() as c:
        add_windows(dev_maps, devicecost.asarray(windows[:0]), devicecost.asarray(boxes[:0]),
                    devicecost.asarray(info[:0]))
    assert c.launches == 0
    np.testing.assert_array_equal(dev_maps.get(), maps)


@pytest.mark.gpu
def test_add_windows_cuda_matches_numpy(rng):
    import cupy

    maps, windows, boxes, info = _case(rng)
    host = add_windows_numpy(maps.copy(), windows, boxes, info)
    dev_maps = cupy.asarray(maps)
    add_windows(dev_maps, *(cupy.asarray(a) for a in (windows, boxes, info)))
    np.testing.assert_array_equal(cupy.asnumpy(dev_maps), host)
