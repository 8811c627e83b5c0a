"""The host work of a DMR step, made cheaper, gives the same results bit for bit: the normalised
patches of all beams built at once equal the one-beam-at-a-time construction, the compiled level
look-ups and row selection equal their NumPy references, on the coarse horseshoe's real geometry
and watch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ids_engine.dmr import SetVoxelDose, resolve
from ids_engine.dmr._recovery import RecoveryOptions, _Rows
from ids_engine.dose._engine import _LevelRows
from ids_engine.kernels import _cpu

RX = 60.0


@pytest.fixture
def s(shaping_session):
    return shaping_session


def _reference_patches(mod, voxel: int, raise_dose: bool, movable: bool = True):
    """Algorithm 1 lines 3-9 one beam at a time (the construction before the beams were batched)."""
    eng = mod.engine
    tissue = "oar" if raise_dose else "target"
    tpis, cp = mod.tpi[tissue], mod.cp_cells
    proj = []
    for geo in eng.geometry:
        h = geo.fine.host
        pos = int(h.position[int(voxel)])
        proj.append((float(h.u_cells[pos]), float(h.v_cells[pos])))
    tpi_at_m = []
    for b, (u, v) in enumerate(proj):
        t = tpis[b]
        tpi_at_m.append(t[min(max(int(math.floor(v / cp)), 0), t.shape[0] - 1),
                          min(max(int(math.floor(u / cp)), 0), t.shape[1] - 1)])
    mean_tpi = float(np.mean(tpi_at_m))
    mu = math.log(2.0) / mean_tpi if mean_tpi > 0 else 0.0
    sign = 1.0 if raise_dose else -1.0
    out = []
    for b, (u, v) in enumerate(proj):
        geo = eng.geometry[b]
        nv, nu = geo.fluence_grid.shape_vu
        pitch = geo.fluence_grid.pitch_mm
        half = int(math.ceil(mod.kernel_radius_mm / pitch))
        r0, c0 = max(int(math.floor(v)) - half, 0), max(int(math.floor(u)) - half, 0)
        r1, c1 = min(int(math.floor(v)) + half + 2, nv), min(int(math.floor(u)) + half + 2, nu)
        if r1 <= r0 or c1 <= c0:
            continue
        rr, cc = np.arange(r0, r1)[:, None], np.arange(c0, c1)[None, :]
        k = mod._machines[b].kernel_at(mod._comp, np.hypot(rr - v, cc - u) * pitch)
        a = k * np.exp(-mu * mod._tpi_cells(tissue, b)[r0:r1, c0:c1])
        if movable and not raise_dose:
            a = np.where(eng.fluence_host(b)[r0:r1, c0:c1] > 0, a, 0.0)
        if np.any(a > 0):
            out.append((b, r0, c0, (sign * a).astype(np.float32)))
    return out


def test_normalised_patches_equal_the_one_beam_at_a_time_construction(s):
    """Every beam's box, amplitudes and sign, bit for bit, raising and lowering, for voxels
    across the body (boxes clipped at the fluence grid's edge included)."""
    mod = s.modifier
    body = np.flatnonzero(np.asarray(s.engine.body_mask).reshape(-1))
    rng = np.random.default_rng(2)
    voxels = list(rng.choice(body, 40, replace=False)) + list(np.flatnonzero(s.target_mask.reshape(-1))[:5])
    n_patches = 0
    for v in voxels:
        for raise_dose, movable in ((True, True), (False, True), (False, False)):
            got = mod.normalised_patches(int(v), raise_dose, movable)
            ref = _reference_patches(mod, int(v), raise_dose, movable)
            assert [(p.beam, p.row0, p.col0) for p in got] == [(b, r0, c0) for b, r0, c0, _ in ref]
            for p, (_, _, _, a) in zip(got, ref):
                assert p.delta.dtype == np.float32 and np.array_equal(p.delta, a)
            n_patches += len(got)
    assert n_patches > 100


@pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")
def test_compiled_level_look_ups_equal_numpy(s, monkeypatch):
    """``_LevelRows.of`` (a DMR solve's per-beam look-ups at its rows): compiled and NumPy
    give the same flags, positions, weights and bounds, on both levels, voxels outside the
    level included."""
    rng = np.random.default_rng(4)
    for geo in s.engine.geometry[:3]:
        for lvl in (geo.fine, geo.coarse):
            size = lvl.host.position.size
            for n in (1, 50, 2000):
                idx = np.sort(rng.choice(size, n, replace=False)).astype(np.int64)
                got = _LevelRows.of(lvl, idx)
                with monkeypatch.context() as m:
                    m.setattr(_cpu, "HAVE_NUMBA", False)
                    ref = _LevelRows.of(lvl, idx)
                assert got.n == ref.n and got.bounds == ref.bounds
                for a, b in ((got.ok, ref.ok), (got.v, ref.v), (got.u, ref.u), (got.weights, ref.weights)):
                    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
                assert got.weights.flags.c_contiguous
            outside = np.flatnonzero(lvl.host.position < 0)[:5].astype(np.int64)
            if outside.size:
                assert _LevelRows.of(lvl, outside).bounds is None


@pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")
def test_row_selection_compiled_equals_numpy_on_a_real_watch(s, monkeypatch):
    """A recovery step's rows (near, priority, at-risk and capped voxels under the patches in
    any beam): the same rows with the compiled loops as with NumPy, for clusters of 1-8
    voxels across the watch."""
    ptv = s.patient.structure("PTV").mask
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    m = (int(c[0]), int(np.flatnonzero(oar[c[0], :, c[2]]).min()), int(c[2]))
    watch = s.build_watch(resolve(SetVoxelDose(m, 0.55 * RX), s.resolve_context()))
    rows = _Rows(s.modifier, watch, RecoveryOptions(max_rows_capped=64))
    dose = s.dose().reshape(-1)[rows.vox].astype(np.float64)
    rng = np.random.default_rng(9)
    # A dose with some voxels off their band (cold target, hot tissue), as in a recovery.
    dose = dose * (1 + 0.05 * rng.standard_normal(dose.size))
    viol = watch.violation(dose)
    n_capped_ranked = 0
    for _ in range(12):
        cols = rng.choice(rows.vox.size, int(rng.integers(1, 9)), replace=False).astype(np.int64)
        got = rows.select(cols, dose, viol)
        with monkeypatch.context() as mp:  # every compiled host loop off: the NumPy references
            mp.setattr(_cpu, "HAVE_NUMBA", False)
            ref = rows.select(cols, dose, viol)
        assert np.array_equal(got, ref)
        n_capped_ranked += int(np.count_nonzero(rows.capped[got]))
    assert n_capped_ranked > 0
    assert ptv.any()


def test_kept_patch_bases_follow_the_fluence_and_the_tpi_maps(s):
    """The plan-independent part of a voxel's patches is kept between calls: lowering patches
    still leave out the amplitudes at zero fluence of the plan as it is now (after a request),
    and new TPI maps are used as soon as they replace the old ones."""
    mod = s.modifier
    ptv = np.flatnonzero(s.target_mask.reshape(-1))
    voxels = [int(v) for v in ptv[:: max(1, ptv.size // 12)]]

    def same(v, raise_dose):
        got = mod.normalised_patches(v, raise_dose)
        ref = _reference_patches(mod, v, raise_dose)
        return [(p.beam, p.row0, p.col0) for p in got] == [r[:3] for r in ref] \
            and all(np.array_equal(p.delta, r[3]) for p, r in zip(got, ref))

    for v in voxels:
        assert same(v, False) and same(v, True)
    c = np.argwhere(s.patient.structure("OAR").mask).mean(axis=0).round().astype(int)
    s.run(SetVoxelDose((int(c[0]), int(c[1]), int(c[2])), 0.3 * RX))  # lowers fluence (undone by the fixture)
    assert all(same(v, False) for v in voxels)
    old = mod.tpi
    before = mod.normalised_patches(voxels[0], True)[0].delta
    try:
        mod.tpi = {k: [t + 1.0 for t in ts] for k, ts in old.items()}  # (a scale would cancel in eq. 3)
        assert all(same(v, False) and same(v, True) for v in voxels)
        assert not np.array_equal(mod.normalised_patches(voxels[0], True)[0].delta, before)
    finally:
        mod.tpi = old
