"""A DMR solve's matrix read out on the device: every beam's part of every column at the rows,
in one launch per dose level and one device read (:func:`device_delta_matrix`).

The host path (``ReadOuts.delta_matrix``) convolves each beam's stack of patches by FFT and
samples the result at the rows. Here the same numbers come from the ``delta_rows`` kernel
(``kernels/deltas.py``: a direct sum over the kernel's support; its NumPy twin is the host
path's FFT read-out, so the counting backend reproduces the NumPy backend bit for bit). The
host still stacks the patches, gathers the rows' look-ups in each beam's levels from the
engine's kept ones (``ReadOuts._rows_of_beams``: each level voxel is looked up in every beam
once, :class:`~ids_engine.dose._readout._LevelTables`, and a step's rows, drawn from the watch
again and again, are a gather), packs them into one upload per dtype, and reads one array
back, then adds the parts in the host path's order (the coarse block sums and that addition are
compiled loops where numba is installed, :mod:`~ids_engine.kernels._cpu_readout`: NumPy's
float32 additions in NumPy's order).

Cost per read (held by ``tests/dose/test_device_budgets.py``): two copies to the device (the
float32 and the int32 tables), three launches (the zeroed output, one ``delta_rows`` per
level) and one device-to-host read.
"""

from __future__ import annotations

import numpy as np

from ids_engine import backend
from ids_engine.kernels import _cpu
from ids_engine.kernels._cpu_readout import add_beam_parts, block_sum
from ids_engine.kernels.deltas import SLOT_FIELDS, delta_rows

from ._uploads import _Uploads

__all__ = ["device_delta_matrix"]

_LEVELS = ("fine", "coarse")


def _packed_kernels(eng, name: str):
    """Every beam's lateral kernels of level ``name`` in one device array and each beam's
    offset in it (built once per set of beams: one concatenation on the device)."""
    cache = eng.__dict__.setdefault("_packed_kernel_cache", {})
    token = tuple(eng.geometry)
    got = cache.get(name)
    if got is None or len(got[0]) != len(token) or any(a is not b for a, b in zip(got[0], token)):
        levels = [getattr(g, name) for g in eng.geometry]
        sizes = np.array([lvl.kernels.size for lvl in levels], np.int64)
        offsets = np.zeros(len(levels), np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        flat = eng.xp.concatenate([lvl.kernels.reshape(-1) for lvl in levels])
        got = cache[name] = (token, flat, offsets)
    return got[1], got[2]


def _level_tables(eng, name: str, slots: list, nb, idx: np.ndarray, up: _Uploads):
    """One level's ``delta_rows`` arguments (upload keys, scalars) for the slots
    ``(beam, stack on this level, r0, c0, columns)`` whose beam has components there."""
    _, ker_off = _packed_kernels(eng, name)
    level_index = idx if name == "fine" else nb.coarse_unique()[0]
    ok_tab, v_tab, u_tab, w_tab = eng._rows_of_beams(nb, [b for b, *_ in slots], name, level_index)
    nc = int(w_tab.shape[1])
    # The slots table and the planes (slot, patch) in one pass over the slots.
    table, planes = [], []
    data_off = col_off = 0
    for s, (b, st, r0, c0, _) in enumerate(slots):
        m_s, h, w = st.shape
        kh, kw = getattr(eng.geometry[b], name).kernels.shape[1:]
        table.append((data_off, m_s, h, w, r0, c0, ker_off[b], kh, kw, col_off))
        planes.extend((s, p) for p in range(m_s))
        data_off += m_s * h * w
        col_off += m_s
    if data_off >= 2**31:  # the kernel's offsets are int32
        raise ValueError(f"delta_rows: {data_off} stacked patch cells exceed the kernel's int32 offsets")
    keys = {
        "stacks": up.add(np.concatenate([st.reshape(-1) for _, st, *_ in slots])),
        "slots": up.add(np.array(table, np.int32).reshape(len(slots), len(SLOT_FIELDS))),
        "planes": up.add(np.array(planes, np.int32).reshape(col_off, 2)),
        "colmap": up.add(np.concatenate([cols for *_, cols in slots]).astype(np.int32)),
        "v_tab": up.add(v_tab),
        "u_tab": up.add(u_tab),
        "w_tab": up.add(w_tab),
        "ok_tab": up.add(ok_tab.astype(np.int32)),
    }
    return keys, {"m": int(level_index.shape[0]), "nc": nc}


def device_delta_matrix(eng, columns, flat_index) -> tuple[np.ndarray, np.ndarray]:
    """``eng.delta_matrix(columns, flat_index, beam_parts=True)`` read on the device:
    ``(joint (n, K), parts (n beams, n, K))`` float32 host arrays, bit for bit the host path's
    on the counting backend (the same parts added in the same order) and equal to it up to
    float32 round-off on a GPU."""
    idx = eng._host_index(flat_index)
    n, ncol = int(idx.shape[0]), len(columns)
    out = np.zeros((ncol, n), np.float32)
    parts = np.zeros((len(eng.geometry), ncol, n), np.float32)
    if not (ncol and n):
        return out.T, parts.transpose(0, 2, 1)
    nb = eng._neighbours(idx)
    beams = list(eng._beam_stacks(columns))
    # Per level, the slots: (beam, its stack on the level, origin cell, the stack's columns).
    slots = {name: [] for name in _LEVELS}
    beam_cols = []  # each beam's stack's columns (int64)
    for b, stack, R0, C0, sel in beams:
        geo = eng.geometry[b]
        f = geo.coarse_fluence_factor
        cols = np.arange(sel.start, sel.stop, dtype=np.int64) if isinstance(sel, slice) else sel
        beam_cols.append(cols)
        if geo.fine.components:
            slots["fine"].append((b, stack, R0 * f, C0 * f, cols))
        if geo.coarse.components:
            slots["coarse"].append((b, block_sum(stack, f), R0, C0, cols))
    up = _Uploads()
    args = {name: _level_tables(eng, name, s, nb, idx, up) for name, s in slots.items() if s}
    if not args:
        return out.T, parts.transpose(0, 2, 1)
    _, inv = nb.coarse_unique()
    nb_keys = {"coarse": (up.add(inv.reshape(8, n).astype(np.int32)), up.add(nb.cw)),
               "fine": (up.add(np.zeros(1, np.int32)), up.add(np.zeros(1, np.float32)))}
    sent = up.send(eng.xp)
    s_max = max(len(s) for s in slots.values())
    dev = eng.xp.zeros((len(_LEVELS), s_max, ncol, n), np.float32)
    for li, name in enumerate(_LEVELS):
        if name not in args:
            continue
        keys, scal = args[name]
        v = {k: _Uploads.view(sent, key) for k, key in keys.items()}
        ik, wk = nb_keys[name]
        delta_rows(dev[li, : len(slots[name])], v["stacks"], v["slots"], v["planes"], v["colmap"],
                   _packed_kernels(eng, name)[0], v["v_tab"], v["u_tab"], v["w_tab"], v["ok_tab"],
                   _Uploads.view(sent, ik), _Uploads.view(sent, wk), n=n, K=ncol,
                   n_nb=8 if name == "coarse" else 0, **scal)
    host = backend.asnumpy(dev)
    # The host path's order: per beam, its fine part then its coarse part, into the joint
    # columns and into the beam's own part.
    at = {name: {b: s for s, (b, *_) in enumerate(slots[name])} for name in _LEVELS}
    if _cpu.HAVE_NUMBA:  # the same additions in one compiled pass
        order, q = [], 0
        for (b, *_), c in zip(beams, beam_cols):
            order.extend((b, li, at[name][b], q, q + c.shape[0]) for li, name in enumerate(_LEVELS) if b in at[name])
            q += c.shape[0]
        add_beam_parts(host, np.array(order, np.int64).reshape(-1, 5), np.concatenate(beam_cols), out, parts)
    else:
        for b, _, _, _, sel in beams:
            for li, name in enumerate(_LEVELS):
                s = at[name].get(b)
                if s is not None:
                    got = host[li, s, sel]
                    out[sel] += got
                    parts[b, sel] += got
    if nb.outside.size:  # outside the body: 0 (the host path's bits)
        out[:, nb.outside] = 0
        parts[:, :, nb.outside] = 0
    return out.T, parts.transpose(0, 2, 1)
