"""The host side of a device update (``DoseEngine.apply_patches`` on the device-cost backend):
the fluence is added from the fine level's uploaded windows, and an update where every beam
has a window uses the kernel spectra without a gather; both give what the general path gives."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine import backend
from ids_engine._devicecost import counting
from ids_engine.dose import DoseEngine, FluencePatch
from ids_engine.dose._uploads import _Uploads
from ids_engine.phantoms import PHANTOMS
from ids_engine.planning import equispaced_beams
from tests.conftest import use_backend


@pytest.fixture(scope="module")
def device_engine():
    with use_backend("devicecost"):
        p = PHANTOMS["horseshoe"](resolution="coarse")
        yield DoseEngine(p, equispaced_beams(5, p.targets[0].centroid_xyz()))


def _patches(eng, beams, rng):
    """Two overlapping patches per beam (summed on the union of their boxes), one at a grid corner."""
    out = []
    for b in beams:
        nv, nu = eng.geometry[b].fluence_grid.shape_vu
        h, w = int(rng.integers(3, 12)), int(rng.integers(3, 12))
        r0, c0 = int(rng.integers(0, nv - h)), int(rng.integers(0, nu - w))
        out.append(FluencePatch(b, r0, c0, rng.random((h, w), dtype=np.float32)))
        out.append(FluencePatch(b, max(r0 - 2, 0), c0, rng.random((4, 5), dtype=np.float32)))
    out.append(FluencePatch(beams[0], 0, 0, rng.random((2, 3), dtype=np.float32)))
    return out


def _state(eng):
    return [backend.asnumpy(a).copy() for a in (eng._fluence_buf, eng.dose_fine, eng.dose_coarse,
                                                *eng._maps_buf.values())]


@pytest.mark.parametrize("beams", [(0, 1, 2, 3, 4), (1, 3)])
def test_device_fluence_equals_the_host_fluence_bit_for_bit(device_engine, beams):
    eng = device_engine
    eng.set_fluences([np.zeros(g.fluence_grid.shape_vu, np.float32) for g in eng.geometry])
    rng = np.random.default_rng(len(beams))
    for _ in range(3):
        eng.apply_patches(_patches(eng, beams, rng))
    flat = backend.asnumpy(eng._fluence_buf)
    for b in range(eng.n_beams):
        st = eng._state[b]
        shape = eng.geometry[b].fluence_grid.shape_vu
        device = flat[st.fluence_offset : st.fluence_offset + shape[0] * shape[1]].reshape(shape)
        np.testing.assert_array_equal(device, eng.fluence_host(b))
    assert flat[-1] == 0  # the sink is not written


def test_an_update_of_every_beam_equals_the_same_update_in_two_calls(device_engine):
    """Every beam in one call (the spectra as they are) against the same windows split into two
    calls (each gathering its beams' spectra): equal up to float32 round-off of the dose sums."""
    eng = device_engine
    zeros = [np.zeros(g.fluence_grid.shape_vu, np.float32) for g in eng.geometry]
    patches = _patches(eng, tuple(range(eng.n_beams)), np.random.default_rng(7))
    eng.set_fluences(zeros)
    with counting() as whole:
        eng.apply_patches(patches)
    one = _state(eng)
    eng.set_fluences(zeros)
    with counting() as split:
        eng.apply_patches([p for p in patches if p.beam < 2])
        eng.apply_patches([p for p in patches if p.beam >= 2])
    two = _state(eng)
    np.testing.assert_array_equal(one[0], two[0])  # the fluence: one add per element either way
    for a, b in zip(one[1:], two[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
    assert whole.launches == 11 and split.launches == 2 * 13  # the gathers: one per level and call


def test_an_upload_view_is_the_part_added():
    up = _Uploads()
    parts = [np.arange(5, dtype=np.int32), np.arange(12, dtype=np.float32).reshape(3, 4), np.array([7], np.int32),
             np.arange(6, dtype=np.int32).reshape(2, 1, 3)]
    keys = [up.add(a) for a in parts]
    sent = up.send(np)
    for a, key in zip(parts, keys):
        got = _Uploads.view(sent, key)
        assert got.shape == a.shape and got.dtype == a.dtype
        np.testing.assert_array_equal(got, a)
        assert np.shares_memory(got, sent[a.dtype])


def test_a_kept_segment_table_is_the_one_computed_again(device_engine):
    """The same windows again (a step undone and redone) reuse the level's table; it is
    read-only and equal to a fresh computation."""
    from ids_engine.dose._engine import _segment_rows

    eng = device_engine
    for name in ("fine", "coarse"):
        beams = np.arange(eng.n_beams, dtype=np.int32)
        boxes = np.array([(0, 0, 0, 9, 0, 9)] * eng.n_beams, np.int32)
        first = eng._segment_table(name, beams, boxes)
        again = eng._segment_table(name, beams.copy(), boxes.copy())
        assert all(a is b and not a.flags.writeable for a, b in zip(first, again))
        fresh = _segment_rows(eng._tile_tables(name)[0], beams, boxes)
        for a, b in zip(first, fresh):
            np.testing.assert_array_equal(a, b)
