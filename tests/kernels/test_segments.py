"""accumulate_segments: the NumPy twin against a slow float64 reference, the counting backend
(one launch, the twin's result) and CuPy against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine._devicecost import counting, devicecost
from ids_engine.kernels.pencil import accumulate_segments, accumulate_segments_numpy

# Tolerances per dtype (CONVENTIONS item 13).
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6)}

N_DOSE = 900


def _reference(n_dose, vox, u, v, weights, maps, seg_first, seg_start, seg_patch, patch_box):
    """Slow float64 reference: loops over segments, their voxels, components and corners; a
    corner outside its window's valid box counts as zero."""
    out = np.zeros(n_dose, np.float64)
    nc = maps.shape[1]
    for s in range(len(seg_start)):
        p = int(seg_patch[s])
        o_r, o_c, r_lo, r_hi, c_lo, c_hi = (int(x) for x in patch_box[p])
        for k in range(int(seg_first[s + 1]) - int(seg_first[s])):
            i = int(seg_start[s]) + k
            fv, fu = float(v[i]) - o_r, float(u[i]) - o_c
            r0, c0 = int(np.floor(fv)), int(np.floor(fu))
            tv, tu = fv - r0, fu - c0
            acc = 0.0
            for c in range(nc):
                for dr, wr in ((0, 1 - tv), (1, tv)):
                    for dc, wc in ((0, 1 - tu), (1, tu)):
                        r, cc = o_r + r0 + dr, o_c + c0 + dc  # on the level grid
                        if r_lo <= r < r_hi and c_lo <= cc < c_hi:
                            acc += float(weights[c, i]) * wr * wc * float(maps[p, c, r - o_r, cc - o_c])
            out[vox[i]] += acc
    return out


def _case(rng, n_level=1000, nc=2, n_windows=4, mh=14, mw=17):
    """Level arrays on a 32 x 36 level grid, windows of (mh, mw) at different origins with
    valid boxes inside them (some strictly smaller, one empty), and segments: several disjoint
    ranges per window, overlapping the ranges of other windows (a voxel gets several windows),
    with empty segments among them (first and last included)."""
    # Repeated voxel indices (beams concatenated) as well as positions read by several windows.
    vox = rng.integers(0, N_DOSE, n_level).astype(np.int32)
    # Positions inside, on the edges of and outside the windows.
    v = rng.uniform(-3.0, 35.0, n_level).astype(np.float32)
    u = rng.uniform(-3.0, 39.0, n_level).astype(np.float32)
    weights = rng.random((nc, n_level)).astype(np.float32)
    # Non-zero everywhere in the windows: a corner wrongly read outside the valid box shows.
    maps = (rng.random((n_windows, nc, mh, mw)) + 0.5).astype(np.float32)
    boxes = []
    for p in range(n_windows):
        o_r, o_c = int(rng.integers(-2, 20)), int(rng.integers(-2, 20))
        if p == 0:
            box = (o_r, o_c, o_r, o_r + mh, o_c, o_c + mw)  # the whole window
        elif p == n_windows - 1:
            box = (o_r, o_c, o_r + 5, o_r + 5, o_c + 2, o_c + 9)  # no valid rows
        else:
            lr, hr, lc, hc = (int(x) for x in rng.integers(1, 4, 4))
            box = (o_r, o_c, o_r + lr, o_r + mh - hr, o_c + lc, o_c + mw - hc)
        boxes.append(box)
    patch_box = np.asarray(boxes, np.int32)

    starts, lengths, patches = [0], [0], [0]  # an empty segment first
    for p in range(n_windows):
        cuts = np.sort(rng.choice(np.arange(1, n_level), size=8, replace=False))
        bounds = np.concatenate([[0], cuts, [n_level]])
        for k in range(len(bounds) - 1):
            if rng.random() < 0.6:  # this window reads this range
                starts.append(int(bounds[k]))
                lengths.append(int(bounds[k + 1] - bounds[k]))
                patches.append(p)
            if rng.random() < 0.2:
                starts.append(int(bounds[k]))
                lengths.append(0)
                patches.append(p)
    starts.append(n_level)
    lengths.append(0)
    patches.append(n_windows - 1)  # an empty segment last
    order = rng.permutation(len(starts))  # segments of all windows interleaved
    seg_start = np.asarray(starts, np.int32)[order]
    seg_patch = np.asarray(patches, np.int32)[order]
    seg_first = np.concatenate([[0], np.cumsum(np.asarray(lengths)[order])]).astype(np.int32)
    return vox, u, v, weights, maps, seg_first, seg_start, seg_patch, patch_box


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accumulate_segments_numpy_twin_against_reference(seed):
    rng = np.random.default_rng(seed)
    case = _case(rng)
    vox, seg_first, seg_patch = case[0], case[5], case[7]
    # The case does what it says: empty segments, voxels read by several windows.
    assert (np.diff(seg_first) == 0).sum() >= 2
    reads = np.zeros(N_DOSE, int)
    for s in np.flatnonzero(np.diff(seg_first) > 0):
        start = int(case[6][s])
        np.add.at(reads, vox[start : start + int(seg_first[s + 1] - seg_first[s])], 1)
    assert reads.max() >= 3 and len(np.unique(seg_patch)) >= 3
    ref = _reference(N_DOSE, *case)
    got = accumulate_segments_numpy(np.zeros(N_DOSE, np.float32), *case)
    assert got.dtype == np.float32
    assert np.count_nonzero(ref) > 100  # many voxels inside some valid box
    np.testing.assert_allclose(got, ref, **TOL[np.float32])


def test_accumulate_segments_corners_outside_the_valid_box_are_zero():
    # One window of ones, valid rows [3, 6) and columns [2, 5) on the level grid, origin (1, 1).
    maps = np.ones((1, 1, 6, 6), np.float32)
    patch_box = np.array([[1, 1, 3, 6, 2, 5]], np.int32)
    # (v, u): straddling the top edge, the left edge, both, inside, one row below the box.
    v = np.array([2.25, 4.0, 2.5, 4.5, 6.0], np.float32)
    u = np.array([3.0, 1.75, 1.5, 3.5, 3.0], np.float32)
    expected = np.array([0.25, 0.75, 0.25, 1.0, 0.0])
    n = len(v)
    weights = np.full((1, n), 2.0, np.float32)
    vox = np.arange(n, dtype=np.int32)
    seg = (np.array([0, n], np.int32), np.array([0], np.int32), np.array([0], np.int32))
    got = accumulate_segments_numpy(np.zeros(n, np.float32), vox, u, v, weights, maps, *seg, patch_box)
    np.testing.assert_allclose(got, 2.0 * expected, **TOL[np.float32])
    np.testing.assert_allclose(_reference(n, vox, u, v, weights, maps, *seg, patch_box), 2.0 * expected)


def test_accumulate_segments_counting_backend_is_one_launch_with_the_twins_result(rng):
    case = _case(rng)
    host = accumulate_segments_numpy(np.zeros(N_DOSE, np.float32), *case)
    dev = [devicecost.asarray(a) for a in case]
    dose = devicecost.zeros(N_DOSE, devicecost.float32)
    n_threads = int(case[5][-1])
    with counting() as c:
        out = accumulate_segments(dose, *dev, n_threads)
    assert out is dose
    assert (c.launches, c.syncs, c.h2d, c.d2h) == (1, 0, 0, 0)
    np.testing.assert_array_equal(dose.get(), host)


def test_accumulate_segments_without_threads_launches_nothing(rng):
    case = _case(rng)
    dev = [devicecost.asarray(a) for a in case]
    dose = devicecost.zeros(N_DOSE, devicecost.float32)
    no_segments = (devicecost.zeros(1, devicecost.int32), dev[6][:0], dev[7][:0])
    with counting() as c:
        accumulate_segments(dose, *dev[:5], *no_segments, dev[8], 0)
    assert c.launches == 0
    assert not dose.get().any()


@pytest.mark.gpu
def test_accumulate_segments_cuda_matches_numpy(rng):
    import cupy

    case = _case(rng, n_level=5000, n_windows=6)
    host = accumulate_segments_numpy(np.zeros(N_DOSE, np.float32), *case)
    dose = cupy.zeros(N_DOSE, cupy.float32)
    accumulate_segments(dose, *(cupy.asarray(a) for a in case), int(case[5][-1]))
    np.testing.assert_allclose(cupy.asnumpy(dose), host, **TOL[np.float32])
