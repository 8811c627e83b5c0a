"""The dose engine, its read-outs and a whole DMR request on a device backend, against NumPy.

``device_backend`` runs each test on the device-cost counting backend (NumPy underneath,
CuPy's semantics on top: a host/device mix or an implicit host conversion raises as in CuPy)
and, on a GPU, on CuPy. The NumPy reference is built in the same module with
``IDS_BACKEND=numpy`` (the backend is reset in between); engines are built once per module and
per backend, and every test first sets its own fluences.

The two sides differ by float32 round-off only: the NumPy engine convolves with ``scipy.fft``,
the device engine with ``xp.fft`` (``numpy.fft`` under the counting backend, cuFFT on a GPU),
and sums in other orders (``atomicAdd`` on a GPU).
"""

from __future__ import annotations


import numpy as np
import pytest

from ids_engine import backend
from ids_engine.dmr import SetVoxelDose
from ids_engine.dmr._tpi import tpi_maps
from ids_engine.dose import DoseEngine, FluencePatch, influence_matrix
from ids_engine.model import Beam
from ids_engine.phantoms import PHANTOMS
from ids_engine.planning import conformal_aperture, equispaced_beams

from tests.conftest import use_backend

from .test_influence import _beamlets_in
from .test_physics import water_phantom

# Tolerances (float32, CONVENTIONS item 13): rtol, and atol as a fraction of the reference's
# largest magnitude (values near zero carry the round-off of the large ones).
TOL = {
    "dose": dict(rtol=1e-5, atol=1e-5),  # dose cubes, level buffers, convolved maps (FFT round-off)
    "read": dict(rtol=1e-5, atol=1e-5),  # dose_at_voxels, dose_at_points, delta read-outs
    "host": dict(rtol=1e-6, atol=1e-7),  # computed on the host from the same host copies (TPI)
    "dij": dict(rtol=1e-5, atol=1e-6),  # influence matrix entries
    "session": dict(rtol=1e-4, atol=1e-4),  # after a whole request (modify + recovery + undo)
}


def _close(got, ref, kind: str) -> None:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=TOL[kind]["rtol"], atol=TOL[kind]["atol"] * scale)


def _device_array_type(name: str):
    if name == "cupy":  # pragma: no cover - GPU only
        import cupy

        return cupy.ndarray
    from ids_engine._devicecost import DeviceArray

    return DeviceArray


def _host(a) -> np.ndarray:
    out = backend.asnumpy(a)
    assert isinstance(out, np.ndarray)
    return out


# ----------------------------------------------------------------------------- engines
class _Engines:
    """One engine per backend for one patient and beam set, built on first use."""

    def __init__(self, patient, beams) -> None:
        self.patient, self.beams, self._built = patient, beams, {}

    def __call__(self, name: str) -> DoseEngine:
        if name not in self._built:
            with use_backend(name):
                self._built[name] = DoseEngine(self.patient, self.beams)
                assert self._built[name].describe()["backend"] == name
        return self._built[name]


@pytest.fixture(scope="module")
def horseshoe_engines():
    p = PHANTOMS["horseshoe"](resolution="coarse")
    return _Engines(p, equispaced_beams(5, p.targets[0].centroid_xyz()))


@pytest.fixture(scope="module")
def fluences(horseshoe_engines):
    """Modulated conformal fields (host), one per beam: seeded, so both sides get the same."""
    eng = horseshoe_engines("numpy")
    rng = np.random.default_rng(7)
    target = eng.patient.targets[0]
    maps = []
    for g in eng.geometry:
        ap = conformal_aperture(g.beam, eng.patient, target, 8.0).astype(np.float32)
        maps.append(ap * (0.5 + rng.random(ap.shape)).astype(np.float32) * np.float32(1500.0))
    return maps


def _pair(engines, name, fluences):
    """The NumPy and the device engine, both set to ``fluences`` (full dose)."""
    ref, dev = engines("numpy"), engines(name)
    assert [g.fluence_grid.shape_vu for g in ref.geometry] == [g.fluence_grid.shape_vu for g in dev.geometry]
    ref.set_fluences(fluences)
    dev.set_fluences(fluences)
    return ref, dev


def _patches(eng, rng) -> list[FluencePatch]:
    """Several patches: two overlapping in one beam (opposite signs), one in the grid's corner
    at the far edge, one at the near edge, one reaching outside the field."""
    shapes = [g.fluence_grid.shape_vu for g in eng.geometry]
    nv0, nu0 = shapes[0]
    nv2, nu2 = shapes[2]
    r = lambda h, w, s=1.0: (500.0 * s * rng.random((h, w))).astype(np.float32)  # noqa: E731
    return [
        FluencePatch(0, nv0 // 2 - 6, nu0 // 2 - 8, r(13, 11, 3.0)),
        FluencePatch(0, nv0 // 2, nu0 // 2 - 2, -r(9, 15, 2.0)),  # overlaps the one above
        FluencePatch(2, nv2 - 7, nu2 - 5, r(7, 5, 4.0)),  # the far corner of the fluence grid
        FluencePatch(3, 0, 10, r(6, 9, 2.0)),  # the first row of the grid
        FluencePatch(4, shapes[4][0] // 2 - 3, shapes[4][1] // 3, -r(5, 5)),
    ]


def _query_voxels(eng, rng, n=400) -> np.ndarray:
    """Flat CT indices: body voxels, a few outside the body, and repeats."""
    body = eng.body_index
    inside = rng.choice(body, n, replace=False)
    outside = rng.choice(np.flatnonzero(~eng.body_mask.ravel()), 10, replace=False)
    return np.concatenate([inside, outside, inside[:5]]).astype(np.int64)


# ----------------------------------------------------------------------------- state
def test_engine_state_lives_on_the_device(device_backend, horseshoe_engines, fluences):
    _, dev = _pair(horseshoe_engines, device_backend, fluences)
    arr = _device_array_type(device_backend)
    assert dev.xp is backend.xp()
    for a in (dev.dose_fine, dev.dose_coarse, dev._fluence_buf, *dev._maps_buf.values()):
        assert isinstance(a, arr) and a.dtype == np.float32
    for name, la in dev._levels.items():
        assert isinstance(la.vox, arr) and la.vox.dtype == np.int32, name
        for a in (la.u_cells, la.v_cells, la.weights):
            assert isinstance(a, arr) and a.dtype == np.float32, name
        assert la.spectra and all(isinstance(s, arr) for s in la.spectra.values()), name
    for b, st in enumerate(dev._state):
        assert isinstance(dev.fluence(b), arr) and isinstance(st.fluence_host, np.ndarray)
        assert all(isinstance(m, arr) for m in st.maps.values())
    assert isinstance(dev.dose_cube(), arr)
    assert isinstance(dev.dose_at_voxels(dev.body_index[:10]), arr)


# ----------------------------------------------------------------------------- dose
def test_full_dose_matches_numpy(device_backend, horseshoe_engines, fluences):
    ref, dev = _pair(horseshoe_engines, device_backend, fluences)
    cube = dev.dose_cube_host()
    assert cube.max() > 10.0
    _close(cube, ref.dose_cube_host(), "dose")
    _close(_host(dev.dose_fine), ref.dose_fine, "dose")
    _close(_host(dev.dose_coarse), ref.dose_coarse, "dose")
    for name in dev._maps_buf:  # the last element is the sink of what falls outside every map
        _close(_host(dev._maps_buf[name])[:-1], ref._maps_buf[name][:-1], "dose")
    for b in range(dev.n_beams):
        np.testing.assert_array_equal(_host(dev.fluence(b)), fluences[b])
        np.testing.assert_array_equal(dev.fluence_host(b), fluences[b])


def test_apply_patches_matches_numpy_and_a_full_recompute(device_backend, horseshoe_engines, fluences):
    ref, dev = _pair(horseshoe_engines, device_backend, fluences)
    patches = _patches(dev, np.random.default_rng(11))
    before = dev.dose_cube_host()
    for eng in (ref, dev):
        eng.apply_patches(patches[:3])  # two calls: the overlapping pair and the corner, then the rest
        eng.apply_patches(patches[3:])
    cube = dev.dose_cube_host()
    assert np.abs(cube - before).max() > 0.1
    _close(cube, ref.dose_cube_host(), "dose")
    for name in dev._maps_buf:  # the last element is the sink of what falls outside every map
        _close(_host(dev._maps_buf[name])[:-1], ref._maps_buf[name][:-1], "dose")
    for b in range(dev.n_beams):
        np.testing.assert_allclose(_host(dev.fluence(b)), ref.fluence_host(b), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dev.fluence_host(b), ref.fluence_host(b), rtol=1e-6, atol=1e-6)
    # The incremental result equals a full recompute of the same fluence on the device.
    dev.recompute()
    _close(dev.dose_cube_host(), cube, "dose")


def test_dose_at_voxels_matches_numpy(device_backend, horseshoe_engines, fluences):
    ref, dev = _pair(horseshoe_engines, device_backend, fluences)
    idx = _query_voxels(dev, np.random.default_rng(3))
    got = dev.dose_at_voxels(idx)
    assert isinstance(got, _device_array_type(device_backend))
    got = _host(got)
    _close(got, ref.dose_at_voxels(idx), "read")
    _close(got, dev.dose_cube_host().ravel()[idx], "read")
    assert np.all(got[400:410] == 0)  # outside the body


def test_delta_at_voxels_and_delta_matrix_match_numpy(device_backend, horseshoe_engines, fluences):
    ref, dev = _pair(horseshoe_engines, device_backend, fluences)
    rng = np.random.default_rng(5)
    patches = _patches(dev, rng)
    idx = _query_voxels(dev, rng)
    got = dev.delta_at_voxels(patches, idx)
    assert isinstance(got, np.ndarray) and np.abs(got).max() > 0.01
    _close(got, ref.delta_at_voxels(patches, idx), "read")
    cols = [patches[:2], [patches[2]], [patches[3], patches[4]], []]
    mat = dev.delta_matrix(cols, idx)
    assert isinstance(mat, np.ndarray) and mat.shape == (idx.size, len(cols))
    _close(mat, ref.delta_matrix(cols, idx), "read")
    _close(mat[:, 0], dev.delta_at_voxels(patches[:2], idx), "read")
    # What the patches would add is what applying them adds on the device.
    d0 = _host(dev.dose_at_voxels(idx))
    dev.apply_patches(patches)
    diff = _host(dev.dose_at_voxels(idx)) - d0
    np.testing.assert_allclose(diff, got, atol=TOL["read"]["atol"] * float(d0.max()))


def test_dose_at_points_matches_numpy(device_backend, horseshoe_engines, fluences):
    ref, dev = _pair(horseshoe_engines, device_backend, fluences)
    rng = np.random.default_rng(9)
    g = dev.grid
    lo = np.asarray(g.origin_mm_xyz)
    hi = lo + (np.asarray(g.shape_zyx[::-1]) - 1) * np.asarray(g.spacing_mm_zyx[::-1])
    pts = np.concatenate([rng.uniform(lo, hi, (300, 3)), [hi + 20.0, lo - 20.0]])  # two outside the grid
    got = dev.dose_at_points(pts)
    assert isinstance(got, _device_array_type(device_backend))
    got = _host(got)
    assert got.max() > 10.0
    _close(got, ref.dose_at_points(pts), "read")
    assert np.all(got[-2:] == 0)


def test_tpi_maps_match_numpy(device_backend, horseshoe_engines):
    ref, dev = horseshoe_engines("numpy"), horseshoe_engines(device_backend)
    for s in ref.patient.structures:
        got, want = tpi_maps(dev, s.mask), tpi_maps(ref, s.mask)
        assert len(got) == dev.n_beams
        for a, b in zip(got, want):
            assert isinstance(a, np.ndarray) and a.dtype == np.float32
            _close(a, b, "host")
        assert sum(float(a.sum()) for a in got) > 0


# ----------------------------------------------------------------------------- influence matrix
@pytest.fixture(scope="module")
def water_engines():
    p = water_phantom(width_mm=48.0, depth_mm=48.0, spacing_mm=3.0)
    return _Engines(p, [Beam(gantry_deg=0.0), Beam(gantry_deg=90.0)])


def test_influence_matrix_matches_numpy(device_backend, water_engines):
    import scipy.sparse as sp

    ref, dev = water_engines("numpy"), water_engines(device_backend)
    masks = _beamlets_in(ref, 8.0)
    want = influence_matrix(ref, beamlet_masks=masks, cutoff_mm=12.0)
    got = influence_matrix(dev, beamlet_masks=masks, cutoff_mm=12.0)
    assert not isinstance(got.matrix, sp.spmatrix)  # built on the device
    assert got.shape == want.shape and got.matrix.nnz > 0
    np.testing.assert_array_equal(got.voxels, want.voxels)
    np.testing.assert_array_equal(got.beamlets, want.beamlets)
    host = got.matrix.get()
    assert isinstance(host, sp.spmatrix) and host.dtype == np.float32
    assert abs(host.nnz - want.matrix.nnz) <= 1e-3 * want.matrix.nnz
    _close(host.toarray(), want.matrix.toarray(), "dij")
    # The product with a device vector runs on the device and gives the NumPy product.
    w = np.random.default_rng(1).random(want.shape[1]).astype(np.float32)
    prod = got.matrix @ backend.to_device(w)
    assert isinstance(prod, _device_array_type(device_backend))
    _close(_host(prod), want.matrix @ w, "dij")
    # The tail offset comes from the device engine; with it the matrix gives NumPy's engine dose.
    off = got.tail_offset(dev, w)
    assert isinstance(off, _device_array_type(device_backend))
    _close(_host(got.dose(backend.to_device(w), off)), want.dose(w, want.tail_offset(ref, w)), "read")


def test_two_level_influence_matrix_matches_numpy(device_backend, water_engines):
    """Without a cutoff (the two-level form F + U C) the device matrix's products run on the
    device and give NumPy's, both ways, and its host copy is NumPy's matrix."""
    from ids_engine.dose._influence import TwoLevelMatrix

    ref, dev = water_engines("numpy"), water_engines(device_backend)
    masks = _beamlets_in(ref, 8.0)
    want = influence_matrix(ref, beamlet_masks=masks, cutoff_mm=None)
    got = influence_matrix(dev, beamlet_masks=masks, cutoff_mm=None)
    assert isinstance(got.matrix, TwoLevelMatrix) and got.matrix.xp is not np  # built on the device
    assert got.shape == want.shape and got.matrix.nnz == want.matrix.nnz
    rng = np.random.default_rng(2)
    w = rng.random(want.shape[1]).astype(np.float32)
    y = rng.random(want.shape[0]).astype(np.float32)
    prod = got.matrix @ backend.to_device(w)
    back = got.matrix.T @ backend.to_device(y)
    assert isinstance(prod, _device_array_type(device_backend))
    assert isinstance(back, _device_array_type(device_backend))
    _close(_host(prod), want.matrix @ w, "dij")
    _close(_host(back), want.matrix.T @ y, "dij")
    host = got.matrix.get()
    assert isinstance(host, TwoLevelMatrix) and host.xp is np
    _close(host.toarray(), want.matrix.toarray(), "dij")
    # The engine's dose from the device matrix, to round-off (no tail to correct).
    off = got.tail_offset(dev, w)
    assert float(np.abs(_host(off)).max()) <= 2e-5 * float((want.matrix @ w).max())


# ----------------------------------------------------------------------------- session
def _request_run(name: str):
    """A coarse horseshoe session on backend ``name``: SetVoxelDose with 4 recovery steps, then undo."""
    from ids_engine.session import Session

    with use_backend(name):
        s = Session.from_phantom("horseshoe", "coarse", n_beams=5, prescription_gy=60.0)
        before = s.dose()
        oar = s.patient.structure("OAR").mask
        c = np.argwhere(oar).mean(axis=0).round().astype(int)
        m = (int(c[0]), int(np.flatnonzero(oar[c[0], :, c[2]]).min()), int(c[2]))
        res = s.run(SetVoxelDose(m, 36.0), recovery_steps=4)
        after = s.dose()
        s.undo()
        undone = s.dose()
        s.close()
        return s, before, res, after, undone


def test_session_request_matches_numpy(device_backend):
    s, before, res, after, undone = _request_run(device_backend)
    assert isinstance(s.engine.dose_fine, _device_array_type(device_backend))
    _, before_r, res_r, after_r, undone_r = _request_run("numpy")
    _close(before, before_r, "dose")
    assert abs(res.after_modification_gy[0] - 36.0) < 0.5
    assert res.recovery_steps == res_r.recovery_steps >= 1
    assert res.best_step == res_r.best_step
    for f in ("before_gy", "after_modification_gy", "final_gy", "requested_gy"):
        _close(getattr(res, f), getattr(res_r, f), "session")
    np.testing.assert_array_equal(res.voxels, res_r.voxels)
    # The same patches (beam, position, size), with the same values to round-off.
    assert [(p.beam, p.row0, p.col0, p.shape) for p in res.patches] == \
        [(p.beam, p.row0, p.col0, p.shape) for p in res_r.patches]
    for p, q in zip(res.patches, res_r.patches):
        _close(_host(p.delta), _host(q.delta), "session")
    _close(after, after_r, "session")
    # Undo takes the plan back to where it was (round-off of the added and subtracted patches).
    _close(undone, undone_r, "session")
    _close(undone, before, "session")
