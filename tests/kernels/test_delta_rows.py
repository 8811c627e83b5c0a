"""delta_rows: the NumPy twin against a slow float64 direct-sum reference, the twin against the
host path of a real engine (``ReadOuts.delta_matrix``, bit for bit), the counting backend (one
launch, the twin's result, nothing copied), the refusals, and CuPy against NumPy. The CUDA
body itself is run on the CPU in ``test_cuda_on_host.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ids_engine._devicecost import counting, devicecost
from ids_engine.kernels.deltas import SLOT_FIELDS, delta_rows, delta_rows_numpy

from .test_cuda_on_host import host_kernels, kernels_on_host  # noqa: F401 (host_kernels: a fixture)

# The twin convolves by FFT: float32 round-off relative to the largest value read out.
REL_TOL = 1e-5
UNTOUCHED = np.float32(-7.0)  # out's fill: a column without a plane keeps it


# --------------------------------------------------------------------------- random cases
def _case(rng, n_nb: int, nc: int = 2):
    """Three slots with different stacks (planes, h, w), origins (one negative) and kernel
    sizes; planes mapped to non-consecutive columns, one plane left out of the launch; level
    voxels on and around the stacks' maps, some far off them, some not in the level, some with
    non-finite positions; with ``n_nb`` neighbours per CT row (0: the rows are the level
    voxels). Returns the arguments of :func:`delta_rows` as a dict."""
    specs = [  # (planes, h, w, r0, c0, kh)
        (2, 6, 4, 10, 3, 5),
        (3, 5, 7, -2, 12, 7),
        (1, 3, 3, 20, 20, 9),
    ]
    colmaps = [[5, 1], [0, 7, 3], [8]]
    K = 9
    m = 70 if n_nb else 90
    n = 40 if n_nb else m
    stacks, kernels, slots, colmap = [], [], [], []
    for (m_s, h, w, r0, c0, kh), cols in zip(specs, colmaps):
        stack = (rng.random((m_s, h, w)) + 0.2).astype(np.float32)
        stack[0, 0, -1] = 0  # a zero cell, as a patch box's corner often is
        ker = rng.random((nc, kh, kh)).astype(np.float32)
        slots.append((sum(a.size for a in stacks), m_s, h, w, r0, c0, sum(a.size for a in kernels), kh, kh,
                      len(colmap)))
        stacks.append(stack.ravel())
        kernels.append(ker.ravel())
        colmap += cols
    S = len(specs)
    # On each slot's full convolution (rows r0 - hk .. r0 - hk + h + kh - 2) and two cells around it.
    v = np.stack([rng.uniform(r0 - kh // 2 - 3, r0 - kh // 2 + h + kh + 1, m) for _, h, _, r0, _, kh in specs])
    u = np.stack([rng.uniform(c0 - kh // 2 - 3, c0 - kh // 2 + w + kh + 1, m) for _, _, w, _, c0, kh in specs])
    v, u = v.astype(np.float32), u.astype(np.float32)
    v[:, :3] = np.floor(v[:, :3])  # on cell boundaries
    v[0, 3], u[1, 4], v[2, 5], u[0, 6] = np.nan, np.inf, -np.inf, np.nan
    v[1, 7], u[2, 8] = 1e5, -3e4  # far off every map, finite
    ok = (rng.random((S, m)) > 0.1).astype(np.int32)
    ok[:, 9] = 0
    w_tab = rng.random((S, nc, m)).astype(np.float32)
    if n_nb:
        nb_index = rng.integers(0, m, (n_nb, n)).astype(np.int32)
        nb_weight = rng.random((n_nb, n)).astype(np.float32)
    else:
        nb_index, nb_weight = np.zeros(1, np.int32), np.zeros(1, np.float32)
    planes = [(s, p) for s, spec in enumerate(specs) for p in range(spec[0])]
    planes.remove((1, 1))  # column 7 stays untouched
    return dict(out=np.full((S, K, n), UNTOUCHED, np.float32), stacks=np.concatenate(stacks),
                slots=np.asarray(slots, np.int32), planes=np.asarray(planes, np.int32),
                colmap=np.asarray(colmap, np.int32), kernels=np.concatenate(kernels), v_tab=v, u_tab=u,
                w_tab=w_tab, ok_tab=ok, nb_index=nb_index, nb_weight=nb_weight, n=n, m=m, K=K, nc=nc, n_nb=n_nb)


def _positional(case: dict) -> tuple:
    """The twin's positional arguments (the kernel's order, ``n_planes`` included)."""
    arrays = [case[k] for k in ("out", "stacks", "slots", "planes", "colmap", "kernels", "v_tab", "u_tab", "w_tab",
                                "ok_tab", "nb_index", "nb_weight")]
    return (*arrays, case["planes"].shape[0], case["n"], case["m"], case["K"], case["nc"], case["n_nb"])


def _reference(case: dict) -> np.ndarray:
    """Slow float64 reference: each plane's full convolution by a direct sum over the kernel's
    taps, the bilinear sample (corners off the full convolution count 0; a non-finite position
    or a voxel not in the level gives 0), the component sum, the neighbour sum. Entries not
    written keep ``UNTOUCHED``."""
    out = case["out"].astype(np.float64)
    nc, n, n_nb = case["nc"], case["n"], case["n_nb"]
    for s, p in case["planes"]:
        data_off, m_s, h, w, r0, c0, ker_off, kh, kw, col_off = (int(x) for x in case["slots"][s])
        plane = case["stacks"][data_off + p * h * w : data_off + (p + 1) * h * w].reshape(h, w).astype(np.float64)
        kers = case["kernels"][ker_off : ker_off + nc * kh * kw].reshape(nc, kh, kw).astype(np.float64)
        hk = (kw - 1) // 2
        full = np.zeros((nc, h + kh - 1, w + kw - 1))
        for c in range(nc):
            for a in range(kh):
                for b in range(kw):
                    full[c, a : a + h, b : b + w] += kers[c, a, b] * plane
        level = np.zeros(case["m"])
        for q in range(case["m"]):
            v, u = float(case["v_tab"][s, q]), float(case["u_tab"][s, q])
            if not case["ok_tab"][s, q] or not (math.isfinite(v) and math.isfinite(u)):
                continue
            R0, C0 = math.floor(v), math.floor(u)
            tv, tu = v - R0, u - C0
            for dr, wr in ((0, 1 - tv), (1, tv)):
                for dc, wc in ((0, 1 - tu), (1, tu)):
                    a, b = R0 + dr - (r0 - hk), C0 + dc - (c0 - hk)  # cell of the full convolution
                    if 0 <= a < full.shape[1] and 0 <= b < full.shape[2]:
                        level[q] += wr * wc * float(np.dot(case["w_tab"][s, :, q].astype(np.float64), full[:, a, b]))
        if n_nb == 0:
            rows = level
        else:
            rows = (level[case["nb_index"]] * case["nb_weight"].astype(np.float64)).sum(axis=0)
        out[s, case["colmap"][col_off + p]] = rows[:n]
    return out


@pytest.mark.parametrize("n_nb", [0, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_delta_rows_numpy_twin_against_the_direct_sum(seed, n_nb):
    case = _case(np.random.default_rng(seed), n_nb)
    ref = _reference(case)
    got = delta_rows_numpy(*_positional(case))
    assert got is case["out"] and got.dtype == np.float32
    written = ref != UNTOUCHED
    assert np.array_equal(got == UNTOUCHED, ~written)  # column 7 of slot 1 and unused columns kept
    assert not written[1, 7].any() and written[0, [5, 1]].all() and not written[0, 0].any()
    scale = np.abs(ref[written]).max()
    assert scale > 0 and np.count_nonzero(ref[written]) > 0.3 * written.sum()  # many read on the maps
    np.testing.assert_allclose(got[written], ref[written], rtol=0, atol=REL_TOL * scale)
    if n_nb == 0:  # a voxel not in the level, a non-finite or a far position: exactly 0
        for s, q in ((0, 9), (0, 3), (1, 4), (2, 5), (0, 6), (1, 7), (2, 8)):
            cols = case["colmap"][case["slots"][s, 9] + np.arange(case["slots"][s, 1])]
            assert np.all(got[s, cols[cols != 7], q] == 0)


def test_delta_rows_dispatches_numpy_arrays_to_the_twin(rng):
    case = _case(rng, 8)
    want = delta_rows_numpy(*_positional({**case, "out": case["out"].copy()}))
    got = delta_rows(**case)
    assert got is case["out"]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- the real host path
def _engine_tables(eng, columns, idx, name: str) -> tuple[dict, list[int]]:
    """The :func:`delta_rows` arguments of one level for ``eng.delta_matrix(columns, idx)``:
    one slot per beam with a patch, the stack built as ``ReadOuts.delta_matrix`` builds it
    (the coarse-aligned box, block-summed for the coarse level), the rows tables of
    ``_LevelRows.of`` (the CT voxels for the fine level, their distinct coarse neighbours for
    the coarse one). Returns the arguments and each slot's beam."""
    from ids_engine import backend
    from ids_engine.dose._readout import _LevelRows

    nb = eng._neighbours(idx)
    n = int(idx.shape[0])
    by_beam: dict[int, list] = {}
    for k, ps in enumerate(columns):
        for p in ps:
            by_beam.setdefault(int(p.beam), []).append((k, p.row0, p.col0, np.asarray(backend.asnumpy(p.delta))))
    if name == "coarse":
        uniq, inv = nb.coarse_unique()
        level_index, n_nb = uniq, 8
        nb_index, nb_weight = inv.reshape(8, n).astype(np.int32), np.ascontiguousarray(nb.cw)
    else:
        level_index, n_nb = idx, 0
        nb_index, nb_weight = np.zeros(1, np.int32), np.zeros(1, np.float32)
    stacks, kernels, slots, colmap, tabs, beams = [], [], [], [], [], []
    for b, items in sorted(by_beam.items()):
        geo = eng.geometry[b]
        lvl = getattr(geo, name)
        if not lvl.components:
            continue
        r0 = min(pr for _, pr, _, _ in items)
        c0 = min(pc for _, _, pc, _ in items)
        r1 = max(pr + d.shape[0] for _, pr, _, d in items)
        c1 = max(pc + d.shape[1] for _, _, pc, d in items)
        f = geo.coarse_fluence_factor
        R0, C0, R1, C1 = r0 // f, c0 // f, -(-r1 // f), -(-c1 // f)
        used = list(dict.fromkeys(k for k, *_ in items))
        stack = np.zeros((len(used), (R1 - R0) * f, (C1 - C0) * f), np.float32)
        for k, pr, pc, d in items:
            i = used.index(k)
            stack[i, pr - R0 * f : pr - R0 * f + d.shape[0], pc - C0 * f : pc - C0 * f + d.shape[1]] += \
                d.astype(np.float32, copy=False)
        if name == "coarse":
            m_s, hh, ww = stack.shape[0], stack.shape[1] // f, stack.shape[2] // f
            stack, sr0, sc0 = stack.reshape(m_s, hh, f, ww, f).sum(axis=(2, 4)), R0, C0
        else:
            sr0, sc0 = R0 * f, C0 * f
        rows = _LevelRows.of(lvl, level_index)
        ker = lvl.host.kernels
        slots.append((sum(a.size for a in stacks), stack.shape[0], stack.shape[1], stack.shape[2], sr0, sc0,
                      sum(a.size for a in kernels), ker.shape[1], ker.shape[2], len(colmap)))
        stacks.append(stack.ravel())
        kernels.append(np.ascontiguousarray(ker, np.float32).ravel())
        colmap += used
        tabs.append(rows)
        beams.append(b)
    S, m, nc = len(slots), int(level_index.shape[0]), int(tabs[0].weights.shape[0])
    planes = [(s, p) for s in range(S) for p in range(slots[s][1])]
    args = dict(out=np.zeros((S, len(columns), n), np.float32), stacks=np.concatenate(stacks),
                slots=np.asarray(slots, np.int32), planes=np.asarray(planes, np.int32),
                colmap=np.asarray(colmap, np.int32), kernels=np.concatenate(kernels),
                v_tab=np.stack([r.v for r in tabs]), u_tab=np.stack([r.u for r in tabs]),
                w_tab=np.stack([r.weights for r in tabs]), ok_tab=np.stack([r.ok for r in tabs]).astype(np.int32),
                nb_index=nb_index, nb_weight=nb_weight, n=n, m=m, K=len(columns), nc=nc, n_nb=n_nb)
    return args, beams


@pytest.fixture(scope="module")
def engine_case(coarse_horseshoe_session):
    """The coarse horseshoe engine, two columns of normalised patches (raising the dose at two
    target voxels: a patch in every beam each) and 1500 CT voxels: the target voxels, body
    voxels around them and a few outside the body."""
    s = coarse_horseshoe_session
    eng = s.engine
    target = np.flatnonzero(s.target_mask.reshape(-1))
    columns = [s.modifier.normalised_patches(int(v), raise_dose=True) for v in target[[0, target.size // 2]]]
    assert all(len(c) == len(eng.geometry) for c in columns)
    rng = np.random.default_rng(7)
    body = np.flatnonzero(np.asarray(eng.body_mask).reshape(-1))
    outside = np.flatnonzero(~np.asarray(eng.body_mask).reshape(-1))
    idx = np.concatenate([target[[0, target.size // 2]], rng.choice(target, 500, replace=False),
                          rng.choice(body, 980, replace=False), rng.choice(outside, 18, replace=False)])
    idx = np.unique(idx)
    return eng, columns, idx


def test_delta_rows_twin_is_the_host_path_bit_for_bit(engine_case):
    """Per beam and level the twin gives what ``_level_delta_rows`` (and, for the coarse level,
    the 8-neighbour combine) adds; summed per beam, fine then coarse, and masked to the body,
    the two launches give ``ReadOuts.delta_matrix`` bit for bit."""
    from ids_engine.dose._readout import _LevelRows, _level_delta_rows

    eng, columns, idx = engine_case
    n = idx.shape[0]
    parts = {}
    for name in ("fine", "coarse"):
        args, beams = _engine_tables(eng, columns, idx, name)
        assert args["planes"].shape[0] == 2 * len(eng.geometry)  # both columns in every beam
        parts[name] = (delta_rows(**args), beams, args)

    # One beam's fine part, and one beam's coarse part with the combine, as the host computes them.
    out, beams, args = parts["fine"]
    b = beams[0]
    _, m_s, h, w, r0, c0 = (int(x) for x in args["slots"][0, :6])
    stack = args["stacks"][: m_s * h * w].reshape(m_s, h, w)
    want = _level_delta_rows(eng.geometry[b].fine, stack, r0, c0, _LevelRows.of(eng.geometry[b].fine, idx))
    np.testing.assert_array_equal(out[0], want)
    out, beams, args = parts["coarse"]
    s = len(beams) // 2
    b = beams[s]
    data_off, m_s, h, w, r0, c0 = (int(x) for x in args["slots"][s, :6])
    stack = args["stacks"][data_off : data_off + m_s * h * w].reshape(m_s, h, w)
    nb = eng._neighbours(idx)
    uniq, inv = nb.coarse_unique()
    dc = _level_delta_rows(eng.geometry[b].coarse, stack, r0, c0, _LevelRows.of(eng.geometry[b].coarse, uniq))
    want = np.zeros((m_s, n), np.float32)
    want += (dc[:, inv].reshape(m_s, 8, n) * nb.cw[None]).sum(axis=1)
    np.testing.assert_array_equal(out[s], want)
    assert np.count_nonzero(want) > 0.5 * want.size

    # The whole read-out: per beam, the fine part then the coarse part (the host's order).
    total = np.zeros((len(columns), n), np.float32)
    fine, fine_beams, _ = parts["fine"]
    coarse, coarse_beams, _ = parts["coarse"]
    assert fine_beams == coarse_beams == list(range(len(eng.geometry)))
    for s in range(len(fine_beams)):
        total += fine[s]
        total += coarse[s]
    total = np.where(nb.in_body[None, :], total, np.float32(0))
    host = eng.delta_matrix(columns, idx)
    assert np.count_nonzero(host) > 0.5 * host.size
    np.testing.assert_array_equal(total.T, host)


def test_delta_rows_cuda_body_on_the_host_reads_the_engine_as_the_host_path_does(engine_case, host_kernels,
                                                                                monkeypatch):
    """The CUDA source, compiled for the CPU (see ``test_cuda_on_host.py``), on the real engine's
    tables: both levels agree with the host path's FFT read-out to float32 round-off (the
    conventions of the stack's origin, the kernel's centre, the fractional cells and the
    neighbours are the host's)."""
    eng, columns, idx = engine_case
    for name in ("fine", "coarse"):
        args, _ = _engine_tables(eng, columns, idx, name)
        want = delta_rows(**{**args, "out": args["out"].copy()})
        dev = {k: devicecost.asarray(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
        with kernels_on_host(monkeypatch, host_kernels) as launched:
            delta_rows(**dev)
        assert len(launched) == 1
        got = dev["out"].get()
        scale = np.abs(want).max()
        assert scale > 0 and np.count_nonzero(want) > 0.2 * want.size
        np.testing.assert_allclose(got, want, rtol=0, atol=REL_TOL * scale, err_msg=name)


# --------------------------------------------------------------------------- device backends
def test_delta_rows_counting_backend_is_one_launch_with_the_twins_result(rng):
    case = _case(rng, 8)
    want = delta_rows_numpy(*_positional({**case, "out": case["out"].copy()}))
    dev = {k: devicecost.asarray(v) if isinstance(v, np.ndarray) else v for k, v in case.items()}
    with counting() as c:
        out = delta_rows(**dev)
    assert out is dev["out"]
    assert (c.launches, c.syncs, c.h2d, c.d2h) == (1, 0, 0, 0)
    np.testing.assert_array_equal(out.get(), want)


def test_delta_rows_of_no_plane_launches_nothing(rng):
    case = _case(rng, 0)
    dev = {k: devicecost.asarray(v) if isinstance(v, np.ndarray) else v for k, v in case.items()}
    dev["planes"] = devicecost.asarray(case["planes"][:0])
    with counting() as c:
        delta_rows(**dev)
    assert c.launches == 0
    assert np.all(dev["out"].get() == UNTOUCHED)


@pytest.mark.parametrize("change, error, match", [
    (dict(out=np.zeros((3, 9, 40), np.float64)), TypeError, "out must be float32"),
    (dict(out=np.zeros((3, 8, 40), np.float32)), ValueError, r"out must have shape \(3, 9, 40\)"),
    (dict(out=np.zeros((3, 40, 9), np.float32).transpose(0, 2, 1)), ValueError, "out must be C-contiguous"),
    (dict(stacks=np.zeros((2, 3), np.float32)), ValueError, "stacks must be 1-D"),
    (dict(slots=np.zeros((3, 9), np.int32)), ValueError, r"slots must have shape \(3, 10\)"),
    (dict(slots=np.zeros((3, 10), np.int64)), TypeError, "slots must be int32"),
    (dict(planes=np.zeros((4, 3), np.int32)), ValueError, r"planes must have shape \(any, 2\)"),
    (dict(colmap=[0, 1]), TypeError, "colmap must be an array"),
    (dict(kernels=np.zeros(4, np.float64)), TypeError, "kernels must be float32"),
    (dict(v_tab=np.zeros((3, 69), np.float32)), ValueError, r"v_tab must have shape \(3, 70\)"),
    (dict(u_tab=np.zeros((2, 70), np.float32)), ValueError, r"u_tab must have shape \(3, 70\)"),
    (dict(w_tab=np.zeros((3, 70), np.float32)), ValueError, r"w_tab must have shape \(3, 2, 70\)"),
    (dict(ok_tab=np.zeros((3, 70), bool)), TypeError, "ok_tab must be int32"),
    (dict(nb_index=np.zeros((8, 40), np.int64)), TypeError, "nb_index must be int32"),
    (dict(nb_weight=np.zeros((7, 40), np.float32)), ValueError, r"nb_weight must have shape \(8, 40\)"),
    (dict(n_nb=0), ValueError, r"m \(70\) must equal n \(40\)"),
    (dict(nc=-1), ValueError, "negative size"),
])
def test_delta_rows_refuses_bad_arguments(rng, change, error, match):
    case = {**_case(rng, 8), **change}
    with pytest.raises(error, match=match):
        delta_rows(**case)


def test_delta_rows_refuses_empty_dummies_on_the_fine_level(rng):
    case = {**_case(rng, 0), "nb_index": np.zeros(0, np.int32)}
    with pytest.raises(ValueError, match="one-element nb_index"):
        delta_rows(**case)


def test_slot_fields_are_the_kernels_column_order():
    # The .cu file reads slot[0..9] by position; its header lists them in this order.
    from ids_engine.kernels._cuda import CUDA_DIR

    header = (CUDA_DIR / "delta_rows.cu").read_text()
    assert "(" + ", ".join(SLOT_FIELDS).replace("m,", "m_s,") + ")" in " ".join(header.replace("//", " ").split())


@pytest.mark.gpu
@pytest.mark.parametrize("n_nb", [0, 8])
def test_delta_rows_cuda_matches_numpy(rng, n_nb):
    import cupy

    case = _case(rng, n_nb)
    host = delta_rows_numpy(*_positional({**case, "out": case["out"].copy()}))
    dev = {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in case.items()}
    got = cupy.asnumpy(delta_rows(**dev))
    written = host != UNTOUCHED
    np.testing.assert_array_equal(got == UNTOUCHED, ~written)
    np.testing.assert_allclose(got[written], host[written], rtol=0, atol=REL_TOL * np.abs(host[written]).max())
