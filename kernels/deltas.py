"""The dose change that stacks of fluence patches would cause at CT voxels, read on one level.

``delta_rows(out, stacks, slots, planes, colmap, kernels, v_tab, u_tab, w_tab, ok_tab, nb_index, nb_weight, *, n, m, K, nc, n_nb)``
    For every plane ``(s, p)`` listed in ``planes`` (patch ``p`` of slot ``s``, a slot being
    one beam's stack of patches on a level's fluence grid) and every CT row ``i``::

        out[s, colmap[col_off_s + p], i] = sum_j nb_weight[j, i] * L_s,p(nb_index[j, i])

    (``n_nb == 0``: ``L_s,p(i)``), where ``L_s,p(q)`` is the plane convolved with the slot's
    lateral kernels, sampled bilinearly at level voxel ``q``'s fractional fluence cell and
    weighted by its depth components (0 where the voxel is not in the slot's level). A DMR
    solve's matrix, one launch per level (fine: ``n_nb == 0``; coarse: the 8 trilinear
    neighbours of each CT voxel), without convolving whole maps. NumPy twin:
    :func:`delta_rows_numpy`, the host path's FFT read-out
    (:func:`ids_engine.dose._readout._level_delta_compute`), so the counting backend gives the
    NumPy backend's values bit for bit; CUDA: ``cuda/delta_rows.cu``, one thread per (plane,
    row), a direct sum over the stack cells under the kernel (equal to the twin up to float32
    round-off).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ids_engine._devicecost import register_raw_kernel
from ids_engine.backend import array_module
from ids_engine.kernels._cuda import CudaKernel

__all__ = ["SLOT_FIELDS", "delta_rows", "delta_rows_numpy"]

# The columns of the slots table, in order (one row per slot, int32).
SLOT_FIELDS = ("data_off", "m", "h", "w", "r0", "c0", "ker_off", "kh", "kw", "col_off")


def _slot_rows(v, u, weights, ok):
    """The read-out tables of one slot in the form the host path takes (``_LevelRows``'s
    fields): ``ok`` as bool, ``weights`` contiguous, and ``bounds``, the floors of the least and
    greatest ``v`` and ``u`` over the voxels in the level with finite ``v`` and ``u`` (None if
    there are none), as ``_LevelRows.of`` computes them."""
    from ids_engine.dose._readout import level_bounds

    ok = np.asarray(ok) != 0
    bounds = level_bounds(ok, v, u)
    return SimpleNamespace(n=int(v.shape[0]), ok=ok, v=v, u=u, weights=np.ascontiguousarray(weights, np.float32),
                           bounds=bounds)


def delta_rows_numpy(out, stacks, slots, planes, colmap, kernels, v_tab, u_tab, w_tab, ok_tab, nb_index, nb_weight,
                     n_planes, n, m, K, nc, n_nb):
    """NumPy twin of :func:`delta_rows` (arguments as the kernel's, scalars positional; the
    arrays may be flat): per slot, the host path's read-out of the whole stack
    (:func:`ids_engine.dose._readout._level_delta_compute`: a batched FFT over the window the
    samples read), then per CT row the level voxel's value or the float32 sum over its
    neighbours in order (as :func:`ids_engine.kernels._cpu.combine_neighbours`), written to the
    columns of the planes listed. Bit for bit what ``ReadOuts.delta_matrix`` adds for the slot's
    beam and level, less the final body mask."""
    from ids_engine.dose._readout import _level_delta_compute

    n_planes, n, m, K, nc, n_nb = (int(x) for x in (n_planes, n, m, K, nc, n_nb))
    slots = np.asarray(slots).reshape(-1, len(SLOT_FIELDS))
    planes = np.asarray(planes).reshape(-1, 2)[:n_planes]
    colmap = np.asarray(colmap).reshape(-1)
    s_count = slots.shape[0]
    view = out.reshape(s_count, K, n)  # a view: out is C-contiguous
    v_tab, u_tab = np.asarray(v_tab).reshape(s_count, m), np.asarray(u_tab).reshape(s_count, m)
    w_tab, ok_tab = np.asarray(w_tab).reshape(s_count, nc, m), np.asarray(ok_tab).reshape(s_count, m)
    if n_nb:
        nb_index = np.asarray(nb_index).reshape(n_nb, n)
        nb_weight = np.asarray(nb_weight).reshape(n_nb, n)
    for s in np.unique(planes[:, 0]) if n_planes else ():
        s = int(s)
        data_off, m_s, h, w, r0, c0, ker_off, kh, kw, col_off = (int(x) for x in slots[s])
        stack = stacks[data_off : data_off + m_s * h * w].reshape(m_s, h, w)
        level = SimpleNamespace(host=SimpleNamespace(kernels=kernels[ker_off : ker_off + nc * kh * kw].reshape(nc, kh, kw)),
                                half=(kw - 1) // 2)
        rows = _slot_rows(v_tab[s], u_tab[s], w_tab[s], ok_tab[s])
        # Without numba the host samples by NumPy, whose int cast of a non-finite position
        # warns; that sample's corners are all off the map, so it reads 0 either way.
        with np.errstate(invalid="ignore"):
            dc = _level_delta_compute(level, stack, r0, c0, rows, None)  # (m_s, m)
        ps = planes[planes[:, 0] == s, 1].astype(np.int64)
        cols = colmap[col_off + ps]
        if n_nb == 0:
            view[s, cols] = dc[ps]
            continue
        d = dc[ps]
        acc = d[:, nb_index[0]] * nb_weight[0]
        for j in range(1, n_nb):
            acc += d[:, nb_index[j]] * nb_weight[j]
        view[s, cols] = acc
    return out


def _delta_rows_twin(grid, block, args) -> None:
    delta_rows_numpy(*args)


register_raw_kernel("delta_rows", _delta_rows_twin)

# One thread per (plane, CT row); see cuda/delta_rows.cu.
_DELTA_ROWS = CudaKernel(
    "delta_rows.cu",
    "delta_rows",
    (
        "float* out",
        "const float* stacks",
        "const int* slots",
        "const int* planes",
        "const int* colmap",
        "const float* kernels",
        "const float* v_tab",
        "const float* u_tab",
        "const float* w_tab",
        "const int* ok_tab",
        "const int* nb_index",
        "const float* nb_weight",
        "int n_planes",
        "int n",
        "int m",
        "int K",
        "int nc",
        "int n_nb",
    ),
)


def _check(name: str, a, dtype, shape=None, ndim=None) -> None:
    """Refuse an argument of the wrong dtype or shape, naming it (``None`` in ``shape``: any)."""
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise TypeError(f"delta_rows: {name} must be an array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"delta_rows: {name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"delta_rows: {name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if shape is not None and (len(a.shape) != len(shape)
                              or any(want is not None and got != want for got, want in zip(a.shape, shape))):
        want = "(" + ", ".join("any" if x is None else str(x) for x in shape) + ")"
        raise ValueError(f"delta_rows: {name} must have shape {want}, got {tuple(a.shape)}")


def delta_rows(out, stacks, slots, planes, colmap, kernels, v_tab, u_tab, w_tab, ok_tab, nb_index, nb_weight, *,
               n: int, m: int, K: int, nc: int, n_nb: int):
    """Write the dose change (Gy) of every listed patch plane at every CT row of one level.

    Parameters
    ----------
    out : (S, K, n) float32, C-contiguous; ``out[s, colmap[col_off_s + p], i]`` is written
        (not added to) for every plane ``(s, p)`` in ``planes`` and row ``i``; the rest is not
        touched (the caller zero-fills). Returned.
    stacks : (N,) float32 patch stacks packed: slot ``s``'s ``(m_s, h_s, w_s)`` stack (fluence
        per patch cell, on the level's fluence grid) row-major from ``data_off_s``.
    slots : (S, 10) int32 per slot: ``data_off, m, h, w, r0, c0, ker_off, kh, kw, col_off``
        (:data:`SLOT_FIELDS`): (r0, c0) is the level fluence cell of the stack's [0, 0]; the
        slot's lateral kernels are ``(nc, kh, kw)`` float32 at ``ker_off`` in ``kernels``
        (square, odd: half width ``(kw - 1) // 2``); patch ``p``'s column is
        ``colmap[col_off + p]``.
    planes : (P, 2) int32: the (slot, patch) of each plane to read out.
    colmap : (C,) int32 output columns (< K), indexed by ``col_off + p``.
    kernels : (Nk,) float32 lateral kernels packed (Gy per unit fluence, on the level grid).
    v_tab, u_tab : (S, m) float32 fractional fluence row and column (level cells) of the
        level voxels in each slot's beam.
    w_tab : (S, nc, m) float32 depth-component weights of the level voxels.
    ok_tab : (S, m) int32, 1 where the level voxel is in the slot's level (0: it adds 0).
    nb_index, nb_weight : (n_nb, n) int32 level voxel and float32 weight of each CT row's
        neighbours (the coarse level's 8 trilinear neighbours); with ``n_nb == 0`` CT row
        ``i`` is level voxel ``i`` (the fine level: ``m == n``) and any int32 / float32 arrays
        of at least one element may be passed.
    n, m, K, nc, n_nb : CT rows, level voxels, output columns, components, neighbours per row.

    Notes
    -----
    The shapes and dtypes are checked here; the table contents (offsets, indices) are not
    (that would read the device): on a GPU an index out of range reads or writes out of bounds.
    """
    n, m, K, nc, n_nb = (int(x) for x in (n, m, K, nc, n_nb))
    if min(n, m, K, nc, n_nb) < 0:
        raise ValueError(f"delta_rows: negative size among n={n}, m={m}, K={K}, nc={nc}, n_nb={n_nb}")
    if n_nb == 0 and m != n:
        raise ValueError(f"delta_rows: with n_nb == 0 each CT row is a level voxel, so m ({m}) must equal n ({n})")
    _check("out", out, np.float32, ndim=3)
    s_count = int(out.shape[0])
    _check("out", out, np.float32, (s_count, K, n))
    if not out.flags.c_contiguous:
        raise ValueError("delta_rows: out must be C-contiguous (it is written in place)")
    _check("stacks", stacks, np.float32, ndim=1)
    _check("slots", slots, np.int32, (s_count, len(SLOT_FIELDS)))
    _check("planes", planes, np.int32, (None, 2))
    _check("colmap", colmap, np.int32, ndim=1)
    _check("kernels", kernels, np.float32, ndim=1)
    _check("v_tab", v_tab, np.float32, (s_count, m))
    _check("u_tab", u_tab, np.float32, (s_count, m))
    _check("w_tab", w_tab, np.float32, (s_count, nc, m))
    _check("ok_tab", ok_tab, np.int32, (s_count, m))
    if n_nb:
        _check("nb_index", nb_index, np.int32, (n_nb, n))
        _check("nb_weight", nb_weight, np.float32, (n_nb, n))
    else:
        _check("nb_index", nb_index, np.int32)
        _check("nb_weight", nb_weight, np.float32)
        if nb_index.size == 0 or nb_weight.size == 0:
            raise ValueError("delta_rows: with n_nb == 0 pass one-element nb_index and nb_weight (they are not read)")
    n_planes = int(planes.shape[0])
    xp = array_module(out, stacks, slots, planes, colmap, kernels, v_tab, u_tab, w_tab, ok_tab, nb_index, nb_weight)
    if xp is np:
        return delta_rows_numpy(out, stacks, slots, planes, colmap, kernels, v_tab, u_tab, w_tab, ok_tab, nb_index,
                                nb_weight, n_planes, n, m, K, nc, n_nb)
    total = n_planes * n
    if total == 0:
        return out
    threads = 256
    _DELTA_ROWS.launch(
        ((total + threads - 1) // threads,),
        (threads,),
        out=out,
        stacks=stacks,
        slots=slots,
        planes=planes,
        colmap=colmap,
        kernels=kernels,
        v_tab=v_tab,
        u_tab=u_tab,
        w_tab=w_tab,
        ok_tab=ok_tab,
        nb_index=nb_index,
        nb_weight=nb_weight,
        n_planes=n_planes,
        n=n,
        m=m,
        K=K,
        nc=nc,
        n_nb=n_nb,
    )
    return out
