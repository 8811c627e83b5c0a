"""Leaf sequencing: exact decompositions, valid MLC shapes, minimal MU, clear refusals."""

import numpy as np
import pytest

from ids_engine.deliver import (
    SequencingError,
    aperture_fluence,
    complexity,
    decompose,
    sequence_beam,
    sequence_fluence,
    sequence_plan,
)
from ids_engine.model import MLC, Beam, FluenceGrid, default_mlc


def _sum(segs, n_cols, n_rows):
    out = np.zeros((n_rows, n_cols), np.int64)
    for s in segs:
        out += s.weight * s.matrix(n_cols)
    return out


def _icc_ok(left, right):
    return bool(np.all(left[:-1] <= right[1:]) and np.all(left[1:] <= right[:-1]))


# ------------------------------------------------------------------ integer decompositions
def test_complexity_by_hand():
    # Row sums of positive steps: [1, 3, 2] -> 1 + 2 = 3; [2, 2, 0] -> 2; [0, 4, 0, 4] -> 8.
    assert complexity([[1, 3, 2], [2, 2, 0]]) == 3
    assert complexity([[0, 4, 0, 4]]) == 8
    assert complexity(np.zeros((2, 3), int)) == 0


def test_engel_hand_checked_small_maps():
    # A uniform field is one segment of its value.
    segs = decompose(np.full((3, 4), 5))
    assert len(segs) == 1 and segs[0].weight == 5
    assert np.array_equal(segs[0].left, [0, 0, 0]) and np.array_equal(segs[0].right, [4, 4, 4])
    # A pyramid row [1, 2, 3, 2, 1]: complexity 3, nested intervals of weight 1 each.
    a = np.array([[1, 2, 3, 2, 1]])
    segs = decompose(a)
    assert sum(s.weight for s in segs) == 3 and len(segs) == 3
    assert np.array_equal(_sum(segs, 5, 1), a)
    # Two rows: [[1, 3, 2], [2, 2, 0]]: complexity 3, so 3 MU; the first segment takes weight 2
    # ([1:3) of row 0 and [0:2) of row 1), the rest is row 0's [0, 1, 0] -> the sum is exact.
    a = np.array([[1, 3, 2], [2, 2, 0]])
    segs = decompose(a)
    assert np.array_equal(_sum(segs, 3, 2), a)
    assert sum(s.weight for s in segs) == 3
    assert segs[0].weight == 2 and len(segs) == 2


@pytest.mark.parametrize("method", ["engel", "sweep"])
def test_random_maps_exact_and_minimal_mu(method, rng):
    for _ in range(60):
        a = rng.integers(0, 9, size=(int(rng.integers(1, 9)), int(rng.integers(1, 12))))
        segs = decompose(a, method=method)
        assert np.array_equal(_sum(segs, a.shape[1], a.shape[0]), a)
        # Interdigitation allowed: both reach the lower bound max_i sum_j max(0, a_ij - a_i,j-1).
        assert sum(s.weight for s in segs) == complexity(a)
        assert all(s.weight >= 1 for s in segs)


def test_engel_needs_fewer_segments_than_the_sweep(rng):
    n_engel = n_sweep = 0
    for _ in range(40):
        a = rng.integers(0, 6, size=(6, 10))
        n_engel += len(decompose(a, method="engel"))
        n_sweep += len(decompose(a, method="sweep"))
    assert n_engel < 0.8 * n_sweep


def test_no_interdigitation_sweep(rng):
    # Row 0 open only at the right, row 1 only at the left: one segment would interdigitate,
    # so 2 MU are needed instead of complexity 1.
    a = np.array([[0, 0, 1], [1, 0, 0]])
    segs = decompose(a, method="sweep", interdigitation=False)
    assert np.array_equal(_sum(segs, 3, 2), a)
    assert complexity(a) == 1 and sum(s.weight for s in segs) == 2
    for s in segs:
        assert _icc_ok(s.left, s.right)
    for _ in range(60):
        a = rng.integers(0, 6, size=(int(rng.integers(2, 8)), int(rng.integers(1, 10))))
        segs = decompose(a, method="sweep", interdigitation=False)
        assert np.array_equal(_sum(segs, a.shape[1], a.shape[0]), a)
        assert sum(s.weight for s in segs) >= complexity(a)
        for s in segs:
            assert _icc_ok(s.left, s.right)


def test_decompose_refuses_bad_matrices():
    with pytest.raises(SequencingError, match=">= 0"):
        decompose(np.array([[1, -1]]))
    with pytest.raises(SequencingError, match="whole numbers"):
        decompose(np.array([[1.5, 1.0]]))
    with pytest.raises(SequencingError, match="interdigitation"):
        decompose(np.array([[1, 1]]), method="engel", interdigitation=False)
    assert decompose(np.zeros((2, 2), int)) == []


# ------------------------------------------------------------------ fluence maps to apertures
def _aligned_grid():
    """0.5 mm cells whose edges fall on the 5 mm leaf boundaries and 2.5 mm bixels:
    u from -20 to 20 mm, v from -10 to 10 mm (the default MLC's 5 mm pairs 28-31)."""
    return FluenceGrid((40, 80), 0.5, (-19.75, -9.75))


def _block_fluence(levels, grid, step_mu):
    """A fluence constant on 5 mm (v) x 2.5 mm (u) blocks starting at (-20, -10) mm."""
    f = np.zeros(grid.shape_vu)
    rows = ((grid.v_mm() + 10) // 5).astype(int)
    cols = ((grid.u_mm() + 20) // 2.5).astype(int)
    f[:] = levels[rows[:, None], cols[None, :]] * step_mu
    return f


def test_segments_reproduce_an_aligned_fluence_exactly(rng):
    mlc = MLC(transmission=0.0)
    grid = _aligned_grid()
    levels = rng.integers(0, 5, size=(4, 16))
    levels[1, 3] = 10  # the peak sets the step: 10 levels of 2 MU
    f = _block_fluence(levels, grid, 2.0)
    sf = sequence_fluence(f, grid, mlc, levels=10, min_mu=0.0, bixel_mm=2.5)
    assert sf.step_mu == pytest.approx(2.0)
    assert np.array_equal(sf.matrix.pairs, [28, 29, 30, 31])
    # The leaf matrix starts at the first nonzero column; the levels are exactly the blocks'.
    nz = np.nonzero(levels.any(axis=0))[0]
    assert np.array_equal(sf.levels, levels[:, nz[0] : nz[-1] + 1])
    delivered = sum(m * aperture_fluence(ap, mlc, grid) for ap, m in zip(sf.apertures, sf.mu))
    np.testing.assert_allclose(delivered, f, atol=1e-4)
    assert sf.mu.sum() == pytest.approx(2.0 * complexity(levels))


@pytest.mark.parametrize("interdigitation", [True, False])
def test_apertures_are_valid_mlc_shapes(interdigitation, rng):
    mlc = MLC(min_gap_mm=1.0, interdigitation=interdigitation, transmission=0.0)
    grid = _aligned_grid()
    levels = rng.integers(0, 4, size=(4, 16))
    levels[:, :3] = 0
    levels[2, :] = 0  # a closed pair in the middle of the field
    f = _block_fluence(levels, grid, 1.0)
    sf = sequence_fluence(f, grid, mlc, levels=3, min_mu=0.0)
    assert sf.method == ("engel" if interdigitation else "sweep")
    for ap in sf.apertures:
        gap = ap.leaf_x2_mm - ap.leaf_x1_mm
        assert np.all(gap >= mlc.min_gap_mm - 1e-9)
        assert ap.jaw_x_mm[0] <= ap.jaw_x_mm[1] and ap.jaw_y_mm[0] <= ap.jaw_y_mm[1]
        if not interdigitation:
            assert _icc_ok(ap.leaf_x1_mm, ap.leaf_x2_mm)
        # Nothing is open outside the jaws except closed pairs' minimum gaps.
        open_ = gap > mlc.min_gap_mm + 1e-9
        assert np.all(ap.leaf_x1_mm[open_] >= ap.jaw_x_mm[0] - 1e-9)
        assert np.all(ap.leaf_x2_mm[open_] <= ap.jaw_x_mm[1] + 1e-9)
    delivered = sum(m * aperture_fluence(ap, mlc, grid) for ap, m in zip(sf.apertures, sf.mu))
    if interdigitation:  # closed gaps hidden under the jaws: exact
        np.testing.assert_allclose(delivered, f, atol=1e-4)
    else:  # closed gaps in the field leak at most min_gap / 2.5 mm bixel of a segment each
        assert np.abs(delivered - f).max() <= sf.mu.sum() * (mlc.min_gap_mm / 0.5) + 1e-6


def test_min_mu_and_fractions():
    grid = _aligned_grid()
    levels = np.zeros((4, 16), int)
    levels[1, 4:10] = [1, 2, 3, 4, 5, 6]
    f = _block_fluence(levels, grid, 1.0)  # peak 6 MU
    sf = sequence_fluence(f, grid, default_mlc(), levels=6, min_mu=0.0)
    assert len(sf.segments) >= 1 and sf.mu.min() == pytest.approx(1.0)
    # 3 MU minimum per segment: the step grows to 3 MU (2 levels), every segment >= 3 MU.
    sf = sequence_fluence(f, grid, default_mlc(), levels=6, min_mu=3.0)
    assert sf.step_mu == pytest.approx(3.0) and sf.mu.min() >= 3.0 - 1e-9
    # Two fractions: segment MU are per fraction, half the course's.
    one = sequence_fluence(f, grid, default_mlc(), levels=6, min_mu=0.0)
    two = sequence_fluence(f, grid, default_mlc(), levels=6, min_mu=0.0, fractions=2)
    assert two.mu.sum() == pytest.approx(one.mu.sum() / 2)


def test_sequence_beam_and_plan_refusals():
    grid = FluenceGrid((20, 40), 1.0, (-19.5, -9.5))  # cell edges on whole mm
    beam = Beam(name="B1", gantry_deg=0.0, isocentre_mm_xyz=(0, 0, 0), fluence_grid=grid)
    f = np.zeros(grid.shape_vu)
    f[5:15, 10:30] = 3.0
    sb = sequence_beam(beam, f, levels=3, min_mu=0.0)
    assert len(sb.segments) == 1 and sb.mu == pytest.approx(3.0)
    plan = sequence_plan([beam, beam], [f, 2 * f], default_mlc(), min_mu=0.0, prescription_gy=2.0)
    assert [b.mu for b in plan.beams] == pytest.approx([3.0, 6.0])
    bad = f.copy()
    bad[7, 7] = -0.1
    with pytest.raises(SequencingError, match="beam 'B1'.*negative"):
        sequence_beam(beam, bad)
    bad[7, 7] = np.nan
    with pytest.raises(SequencingError, match="beam 'B1'.*not finite"):
        sequence_beam(beam, bad)
    with pytest.raises(SequencingError, match="shape"):
        sequence_beam(beam, f[:-1])
    # A 4-pair MLC of 5 mm covers Y_b -10..10 mm: a 20 mm tall field at -10..10 fits, 40 mm does not.
    small = MLC(leaf_widths_mm=(5.0,) * 4, max_field_mm=(30.0, 20.0))
    tall = FluenceGrid.centred((20, 40), 1.0)
    g = np.zeros(tall.shape_vu)
    g[:, 5:15] = 1.0
    with pytest.raises(SequencingError, match="Y_b .* beyond what MLC"):
        sequence_fluence(g, tall, small)
    broad = FluenceGrid.centred((60, 10), 1.0)  # X_b -30..30 mm, the field is 30 mm wide
    with pytest.raises(SequencingError, match="X_b .* beyond the largest field"):
        sequence_fluence(np.ones(broad.shape_vu), broad, small)
    with pytest.raises(SequencingError, match="no-interdigitation"):
        sequence_fluence(f, grid, MLC(interdigitation=False), method="engel")
    with pytest.raises(SequencingError, match="2 beams but 1"):
        sequence_plan([beam, beam], [f])
    nogrid = Beam(name="B2", gantry_deg=0.0, isocentre_mm_xyz=(0, 0, 0))
    with pytest.raises(SequencingError, match="no fluence grid"):
        sequence_beam(nogrid, f)


def test_pair_sampling_of_an_open_field_off_the_leaf_boundaries():
    # An open field of 7 MU on a 1 mm grid whose edges (Y_b -7.5..7.5) cut pairs 28 and 31 in half.
    grid = FluenceGrid((30, 40), 1.0, (-19.5, -15.0))
    f = np.zeros(grid.shape_vu)
    v = grid.v_mm()
    f[(v >= -7) & (v <= 7), 10:30] = 7.0  # cells -7.5..7.5 mm
    mean = sequence_fluence(f, grid, default_mlc(), levels=10, min_mu=0.0, bixel_mm=1.0)
    # The mean over the half-covered pairs is half the field: two levels, two segments.
    assert mean.matrix.values_mu[0].max() == pytest.approx(3.5) and len(mean.segments) == 2
    assert mean.mu.sum() == pytest.approx(7.0)
    # Along the pairs' centre lines the field is binary: one segment of 7 MU, pairs 28-31 open.
    centre = sequence_fluence(f, grid, default_mlc(), levels=10, min_mu=0.0, bixel_mm=1.0, pair_sampling="centre")
    assert len(centre.segments) == 1 and centre.mu[0] == pytest.approx(7.0)
    ap = centre.apertures[0]
    assert np.array_equal(np.nonzero(ap.leaf_x2_mm - ap.leaf_x1_mm > 1)[0], [28, 29, 30, 31])
    assert ap.leaf_x1_mm[29] == pytest.approx(-10.0) and ap.leaf_x2_mm[29] == pytest.approx(10.0)
    with pytest.raises(SequencingError, match="pair_sampling"):
        sequence_fluence(f, grid, default_mlc(), pair_sampling="edge")
