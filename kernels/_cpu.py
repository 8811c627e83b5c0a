"""Compiled CPU twins of hot NumPy kernels (numba, optional).

When numba is installed (the ``fast`` extra) the engine's NumPy path uses
:func:`accumulate_padded` for the bilinear read-out of a convolved fluence window at a
level's voxels fused with the add into the dose, the inner loop of every incremental update,
:func:`sample_weighted` for the read-out of a stack of patch responses at the rows of a
DMR solve (the component sum fused in; agrees with the NumPy path to float32 round-off), and
:func:`block_depth` for the radiological depth of rays (one loop per ray instead of a padded
(steps, rays) array; the same float32 operations in the same order, so the same result except
where the NumPy block's padding adds a sub-ulp sliver after a ray's last step);
the NumPy functions in :mod:`ids_engine.kernels.pencil` stay the reference (and the CUDA
kernel's twin), and the tests compare the two bit for bit (the same float32 operations in the same
order, no fast-math contraction). ``IDS_NUMBA=0`` turns them off.

The host work of a DMR step has compiled loops too, each the twin of NumPy code that stays the
reference where it is used (tests compare them): :func:`level_rows` (a solve's per-beam level
look-ups, ``_LevelRows.of``), :func:`mark_under_patches` and :func:`capped_distance2` (the
row selection's voxels under the columns' patches and the capped voxels' squared BEV
distances, ``_Rows.select``; the ``exp`` of the ranking stays in NumPy, whose float32 ``exp``
a compiled loop would not reproduce bit for bit), :func:`gather_bev` and :func:`sort_by_row`
(the watch's per-beam BEV tables and row order, ``_Rows.__init__``). They give the same rows
and the same floats as their references (unlike :func:`sample_weighted`, whose float32 sums
differ from NumPy's by round-off).

:func:`rfft2_padded` and :func:`irfft2_rows` are the host FFTs of a DMR solve's read-out
(``DoseEngine.delta_matrix``), small float32 stacks (about 50 x 50) a few hundred times a
request: they call SciPy's pocketfft binding directly (``scipy.fft`` adds about 15 us of
argument handling per call), and the inverse transforms only the rows that are read. Both
equal ``scipy.fft.rfft2`` / ``irfft2`` bit for bit (the same 1-D transforms in the same order
with the same scaling; tested); without the binding they call ``scipy.fft``.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

__all__ = ["HAVE_NUMBA", "accumulate_padded", "block_depth", "capped_distance2", "check_level_index",
           "combine_neighbours", "gather_bev", "irfft2_rows", "level_rows", "mark_under_patches",
           "patch_response_window", "remap_runs", "rfft2_padded", "row_starts", "sample_weighted", "sort_rows_by_u"]

try:  # SciPy's pocketfft binding (private: its signature is checked by tests/kernels/test_cpu_host.py)
    from scipy.fft._pocketfft import pypocketfft as _POCKETFFT
except ImportError:  # pragma: no cover - depends on the SciPy version
    _POCKETFFT = None

_KERNEL = None  # the compiled loops, when numba is installed
_SAMPLE = None
_GATHER_BEV = None
_DEPTH = None
_UNDER = None
_UNDER_U = None
_OR_RUNS = None
_REMAP_RUNS = None
_ROW_STARTS = None
_SORT_ROWS_U = None
_CAPPED = None
_LEVEL_ROWS = None
_LEVEL_TABLES = None  # _cpu_readout.level_tables' loop
_SORT_BY_ROW = None
_COMBINE = None
HAVE_NUMBA = False
if os.environ.get("IDS_NUMBA", "1") != "0":
    try:  # pragma: no cover - depends on the environment
        import numba
    except ImportError:  # pragma: no cover
        numba = None
    if numba is not None:
        HAVE_NUMBA = True

        @numba.njit(nogil=True, cache=True)
        def _accumulate_padded_nb(dose, vox, u, v, weights, flat, h, w, o_v, o_u):  # pragma: no cover - compiled
            nc = flat.shape[0]
            stride = w + 4
            for i in range(u.shape[0]):
                tv = v[i] - o_v
                tu = u[i] - o_u
                if tv < 0:
                    tv = np.float32(0)
                elif tv > h + 2:
                    tv = np.float32(h + 2)
                if tu < 0:
                    tu = np.float32(0)
                elif tu > w + 2:
                    tu = np.float32(w + 2)
                r = np.int32(tv)
                c = np.int32(tu)
                # As NumPy promotes them: float32 - int32 is float64, corner differences are
                # float32, the rest of each component's term float64 until it is added to the
                # float32 sum.
                fv = np.float64(tv) - np.float64(r)
                fu = np.float64(tu) - np.float64(c)
                i00 = r * stride + c
                acc = np.float32(0)
                for k in range(nc):
                    a = flat[k, i00]
                    top = np.float64(a) + fu * np.float64(flat[k, i00 + 1] - a)
                    b = flat[k, i00 + stride]
                    bottom = np.float64(b) + fu * np.float64(flat[k, i00 + stride + 1] - b)
                    top = top + fv * (bottom - top)
                    top = top * np.float64(weights[k, i])
                    acc = np.float32(np.float64(acc) + top)
                dose[vox[i]] += acc

        _KERNEL = _accumulate_padded_nb

        @numba.njit(nogil=True, cache=True)
        def _sample_weighted_nb(maps, v, u, o_v, o_u, weights, ok, k, out):  # pragma: no cover - compiled
            # ``out`` zero on entry. First every voxel's four corners (flat offsets in a map)
            # and bilinear weights, in a pass without branches (selects: the compiler makes it
            # SIMD; on a clinical request's read-outs of one map at ~500 voxels, measured 40 %
            # less time than a branchy pass over the voxels in the level), then the usable
            # voxels in order, then map by map over them: a map (a few KB) stays in the L1
            # cache while it is read, where a voxel's k nc maps are not. Each out[kk, i] gets
            # the same float32 sum as a running sum from 0 over the components in order (c
            # outer to the voxels): the same bits.
            nmaps, h, w = maps.shape
            nc = nmaps // k
            one = np.float32(1)
            zero = np.float32(0)
            o_v = np.float32(o_v)  # (float64 in: NumPy's np.float32 of it, one rounding)
            o_u = np.float32(o_u)
            hw = h * w
            flat = maps.reshape(nmaps * hw)
            n = v.shape[0]
            h32, w32 = np.int32(h), np.int32(w)
            h_last, w_last = np.int32(h - 1), np.int32(w - 1)
            z32, one32 = np.int32(0), np.int32(1)
            corner = np.empty((n, 4), np.int64)
            cw = np.empty((n, 4), np.float32)
            for i in range(n):
                fv = v[i] - o_v
                fu = u[i] - o_u
                r0 = np.int32(np.floor(fv))
                c0 = np.int32(np.floor(fu))
                tv = fv - np.float32(r0)
                tu = fu - np.float32(c0)
                r1 = r0 + one32
                c1 = c0 + one32
                r_in0 = (r0 >= z32) & (r0 < h32)
                r_in1 = (r1 >= z32) & (r1 < h32)
                c_in0 = (c0 >= z32) & (c0 < w32)
                c_in1 = (c1 >= z32) & (c1 < w32)
                w00 = (one - tv) * (one - tu)
                w01 = (one - tv) * tu
                w10 = tv * (one - tu)
                w11 = tv * tu
                cw[i, 0] = w00 if (r_in0 & c_in0) else zero
                cw[i, 1] = w01 if (r_in0 & c_in1) else zero
                cw[i, 2] = w10 if (r_in1 & c_in0) else zero
                cw[i, 3] = w11 if (r_in1 & c_in1) else zero
                ra = min(max(r0, z32), h_last)
                rb = min(max(r1, z32), h_last)
                ca = min(max(c0, z32), w_last)
                cb = min(max(c1, z32), w_last)
                corner[i, 0] = ra * w32 + ca
                corner[i, 1] = ra * w32 + cb
                corner[i, 2] = rb * w32 + ca
                corner[i, 3] = rb * w32 + cb
            vox = np.empty(n, np.int64)
            q = 0
            for i in range(n):  # the usable voxels, in order (written always, counted if ok)
                vox[q] = i
                q += ok[i]
            for kk in range(k):
                for c in range(nc):
                    base = (kk * nc + c) * hw
                    if q == n:  # every voxel usable: no indirection
                        for i in range(n):
                            val = (flat[base + corner[i, 0]] * cw[i, 0] + flat[base + corner[i, 1]] * cw[i, 1]
                                   + flat[base + corner[i, 2]] * cw[i, 2] + flat[base + corner[i, 3]] * cw[i, 3])
                            out[kk, i] += val * weights[c, i]
                    else:
                        for t in range(q):
                            i = vox[t]
                            val = (flat[base + corner[i, 0]] * cw[i, 0] + flat[base + corner[i, 1]] * cw[i, 1]
                                   + flat[base + corner[i, 2]] * cw[i, 2] + flat[base + corner[i, 3]] * cw[i, 3])
                            out[kk, i] += val * weights[c, i]

        _SAMPLE = _sample_weighted_nb

        @numba.njit(nogil=True, cache=True)
        def _gather_bev_nb(position, u_cells, v_cells, w0, vox, out_u, out_v, out_w, missing):  # pragma: no cover
            for j in range(vox.shape[0]):
                p = position[vox[j]]
                if p < 0:
                    out_u[j] = np.nan
                    out_v[j] = np.inf
                    out_w[j] = 0
                    missing[j] = True
                else:
                    out_u[j] = u_cells[p]
                    out_v[j] = v_cells[p]
                    out_w[j] = w0[p]
                    missing[j] = False

        _GATHER_BEV = _gather_bev_nb

        @numba.njit(nogil=True, cache=True)
        def _block_depth_nb(rho, ints, floats, out, start, stop):  # pragma: no cover - compiled
            one = np.float32(1)
            zero = np.float32(0)
            for r in range(start, stop):
                base, step_dom, sb, sc, last = ints[0, r], ints[1, r], ints[2, r], ints[3, r], ints[4, r]
                off_b, off_c = floats[0, r], floats[1, r]
                rate_b, rate_c = floats[2, r], floats[3, r]
                up_b, up_c = floats[4, r], floats[5, r]
                ir_b, ir_c = floats[6, r], floats[7, r]
                phi, dom_len, mm_per_voxel = floats[8, r], floats[9, r], floats[10, r]
                s0 = min(max(np.float32(0) + (phi - one), zero), dom_len)
                g_b, g_c = off_b + s0 * rate_b, off_c + s0 * rate_c
                f_b, f_c = np.floor(g_b), np.floor(g_c)
                i_b, i_c = np.int32(f_b), np.int32(f_c)
                acc = zero
                for j in range(last + 1):
                    s1 = min(max(np.float32(j + 1) + (phi - one), zero), dom_len)
                    g1_b, g1_c = off_b + s1 * rate_b, off_c + s1 * rate_c
                    f1_b, f1_c = np.floor(g1_b), np.floor(g1_c)
                    i1_b, i1_c = np.int32(f1_b), np.int32(f1_c)
                    flat_0 = base + j * step_dom + i_b * sb + i_c * sc
                    ds = s1 - s0
                    cross_b = min((f_b - g_b + up_b) * ir_b, ds)
                    cross_c = min((f_c - g_c + up_c) * ir_c, ds)
                    incr_b = min(max(i1_b - i_b, -1), 1) * sb
                    incr_c = min(max(i1_c - i_c, -1), 1) * sc
                    first = min(cross_b, cross_c)
                    second = max(cross_b, cross_c)
                    flat_mid = flat_0 + (incr_b if cross_b <= first else 0) + (incr_c if cross_c <= first else 0)
                    rho_0 = rho[flat_0]
                    rho_mid = rho[flat_mid]
                    rho_1 = rho[flat_0 + incr_b + incr_c]
                    acc += rho_1 * ds + first * (rho_0 - rho_mid) + second * (rho_mid - rho_1)
                    s0, g_b, g_c, f_b, f_c, i_b, i_c = s1, g1_b, g1_c, f1_b, f1_c, i1_b, i1_c
                out[r] = acc * mm_per_voxel

        _DEPTH = _block_depth_nb

        @numba.njit(nogil=True, cache=True)
        def _row_span_nb(rows, key_lo, key_hi):  # pragma: no cover - compiled
            # [searchsorted(rows, key_lo, "left"), searchsorted(rows, key_hi, "right")): the
            # table's entries whose BEV row lies in [key_lo, key_hi] (rows sorted).
            lo, hi = 0, rows.shape[0]
            while lo < hi:
                mid = (lo + hi) // 2
                if np.int64(rows[mid]) < key_lo:
                    lo = mid + 1
                else:
                    hi = mid
            a = lo
            lo, hi = a, rows.shape[0]
            while lo < hi:
                mid = (lo + hi) // 2
                if np.int64(rows[mid]) <= key_hi:
                    lo = mid + 1
                else:
                    hi = mid
            return a, lo

        @numba.njit(nogil=True, cache=True)
        def _cols_box_nb(bev_u2, bev_v2, b, cols):  # pragma: no cover - compiled
            # The columns' BEV box on beam b: (any finite v, v min, v max, any u, u min, u max).
            found = False
            v_min = np.float32(np.inf)
            v_max = np.float32(-np.inf)
            any_u = False
            u_min = np.float32(np.inf)
            u_max = np.float32(-np.inf)
            for j in range(cols.shape[0]):
                cv = bev_v2[b, cols[j]]
                if np.isfinite(cv):
                    found = True
                    v_min = min(v_min, cv)
                    v_max = max(v_max, cv)
                cu = bev_u2[b, cols[j]]
                if not np.isnan(cu):
                    any_u = True
                    u_min = min(u_min, cu)
                    u_max = max(u_max, cu)
            return found, v_min, v_max, any_u, u_min, u_max

        @numba.njit(nogil=True, cache=True)
        def _box_span_nb(rows, v_min, v_max, u_min, u_max, reach, reach32):  # pragma: no cover - compiled
            # The box grown by the reach: the span of the row table it covers and its float32
            # edges (v: float64 edges compared in float32, as NumPy does; u: float32).
            v_lo = np.float64(v_min) - reach
            v_hi = np.float64(v_max) + reach
            a, end = _row_span_nb(rows, np.int64(math.floor(v_lo)), np.int64(math.floor(v_hi)))
            return a, end, np.float32(v_lo), np.float32(v_hi), u_min - reach32, u_max + reach32

        @numba.njit(nogil=True, cache=True)
        def _under_patches_nb(bev_u2, bev_v2, order2, rows2, bu_sorted2, bv_sorted2, cols, reach,
                              mark):  # pragma: no cover - compiled
            reach32 = np.float32(reach)
            for b in range(bev_u2.shape[0]):
                found, v_min, v_max, any_u, u_min, u_max = _cols_box_nb(bev_u2, bev_v2, b, cols)
                if not found:
                    continue
                if not any_u:  # np.nanmin of all-NaN is NaN: no comparison holds
                    u_min = np.float32(np.nan)
                    u_max = np.float32(np.nan)
                # As NumPy computes them: the v edges in float64 (a Python float), compared in
                # float32 (NEP 50: the Python float is cast to the array's dtype); the u edges
                # in float32 (a float32 scalar minus a Python float).
                rows = rows2[b]
                a, end, v_lo32, v_hi32, u_lo32, u_hi32 = _box_span_nb(rows, v_min, v_max, u_min, u_max, reach, reach32)
                for i in range(a, end):
                    bv = bv_sorted2[b, i]
                    bu = bu_sorted2[b, i]
                    if bv >= v_lo32 and bv < v_hi32 and bu >= u_lo32 and bu <= u_hi32:
                        mark[order2[b, i]] = True

        _UNDER = _under_patches_nb

        @numba.njit(nogil=True, cache=True)
        def _whole_rows_nb(rows, bv_sorted):  # pragma: no cover - compiled
            # Whether every voxel of a row r in (-32000, 32000) lies in that whole row, r <= v <
            # r + 1 (a table from sort_by_row: its rows are floor(v), clipped to +-32000; a NaN
            # v, whose row NumPy's cast leaves undefined, fails).
            ok = True
            for i in range(rows.shape[0]):
                r = rows[i]
                if r > -32000 and r < 32000:
                    v = bv_sorted[i]
                    ok &= (v >= np.float32(r)) & (v < np.float32(r + 1))
            return ok

        @numba.njit(nogil=True, cache=True)
        def _sort_rows_by_u_nb(rows, order, bu_sorted, bv_sorted):  # pragma: no cover - compiled
            # Within each run of equal rows (the table sorted by row), order by u (stable), NaN
            # u (a voxel the beam misses) last in their order. Returns whether each row r in
            # (-32000, 32000) holds only voxels with r <= v < r + 1 (_whole_rows_nb).
            n = rows.shape[0]
            s = 0
            while s < n:
                e = s + 1
                while e < n and rows[e] == rows[s]:
                    e += 1
                if e - s > 1:
                    m = e - s
                    fin = np.empty(m, np.int64)
                    nan = np.empty(m, np.int64)
                    nf = 0
                    nn = 0
                    for i in range(m):
                        if np.isnan(bu_sorted[s + i]):
                            nan[nn] = i
                            nn += 1
                        else:
                            fin[nf] = i
                            nf += 1
                    perm = np.empty(m, np.int64)
                    if nf:
                        uf = np.empty(nf, np.float32)
                        for i in range(nf):
                            uf[i] = bu_sorted[s + fin[i]]
                        pf = np.argsort(uf, kind="mergesort")
                        for i in range(nf):
                            perm[i] = fin[pf[i]]
                    for i in range(nn):
                        perm[nf + i] = nan[i]
                    o = order[s:e].copy()
                    u = bu_sorted[s:e].copy()
                    v = bv_sorted[s:e].copy()
                    for i in range(m):
                        order[s + i] = o[perm[i]]
                        bu_sorted[s + i] = u[perm[i]]
                        bv_sorted[s + i] = v[perm[i]]
                s = e
            return _whole_rows_nb(rows, bv_sorted)

        _SORT_ROWS_U = _sort_rows_by_u_nb

        @numba.njit(nogil=True, cache=True)
        def _under_patches_u_nb(bev_u2, bev_v2, order2, rows2, bu_sorted2, bv_sorted2, cols, reach, whole,
                                starts, k_lo, mark):  # pragma: no cover - compiled
            # _under_patches_nb on tables whose rows are each sorted by u: per row, binary
            # searches for the row's end and the box's u range in it, then its voxels (the same
            # edges and the same exact filter, so the same voxels), marked at their table index
            # order2[b, i]. A row r strictly inside the box's v range (r > v_lo, r + 1 <= v_hi, in
            # float64) of a table whose rows are whole (whole[b], _whole_rows_nb) needs no v test:
            # r <= v < r + 1 there, and float32(v_lo) <= r, float32(v_hi) >= r + 1 (rounding to
            # nearest is monotone and r, r + 1 are float32 integers), so every voxel passes it.
            # With starts (_row_starts_nb, not empty) each row's span is read there, not searched
            # (the searches of the rows read a cache line each, most of a call's time when the
            # tables are not in cache).
            reach32 = np.float32(reach)
            n_keys = starts.shape[1] - 1
            k_hi = k_lo + n_keys - 1
            for b in range(bev_u2.shape[0]):
                found, v_min, v_max, any_u, u_min, u_max = _cols_box_nb(bev_u2, bev_v2, b, cols)
                if not found or not any_u:  # no column on this beam's grid, or no u: nothing passes
                    continue
                rows = rows2[b]
                bu_b = bu_sorted2[b]
                bv_b = bv_sorted2[b]
                order_b = order2[b]
                v_lo = np.float64(v_min) - reach  # (as _box_span_nb)
                v_hi = np.float64(v_max) + reach
                if n_keys > 0:
                    v_lo32, v_hi32, u_lo32, u_hi32 = np.float32(v_lo), np.float32(v_hi), u_min - reach32, u_max + reach32
                    key_lo = np.int64(math.floor(v_lo))
                    key_hi = np.int64(math.floor(v_hi))
                    a = 0 if key_lo <= k_lo else (rows.shape[0] if key_lo > k_hi else starts[b, key_lo - k_lo])
                    end = 0 if key_hi < k_lo else (rows.shape[0] if key_hi >= k_hi else starts[b, key_hi - k_lo + 1])
                else:
                    a, end, v_lo32, v_hi32, u_lo32, u_hi32 = _box_span_nb(rows, v_min, v_max, u_min, u_max, reach,
                                                                          reach32)
                whole_b = whole[b]
                p = a
                while p < end:
                    r = rows[p]
                    if n_keys > 0:
                        seg_end = starts[b, np.int64(r) - k_lo + 1]
                    else:
                        lo, hi = p, end
                        while lo < hi:  # the end of row r
                            mid = (lo + hi) // 2
                            if rows[mid] <= r:
                                lo = mid + 1
                            else:
                                hi = mid
                        seg_end = lo
                    lo, hi = p, seg_end
                    while lo < hi:  # the first u >= u_lo32 in row r
                        mid = (lo + hi) // 2
                        if bu_b[mid] < u_lo32:
                            lo = mid + 1
                        else:
                            hi = mid
                    first = lo
                    hi = seg_end
                    while lo < hi:  # then the first u > u_hi32 (or NaN, which sorts last)
                        mid = (lo + hi) // 2
                        if bu_b[mid] <= u_hi32:
                            lo = mid + 1
                        else:
                            hi = mid
                    rf = np.float64(r)
                    at = order_b[first:lo]
                    if whole_b and r > -32000 and r < 32000 and rf > v_lo and rf + 1.0 <= v_hi:
                        for i in range(at.shape[0]):
                            mark[at[i]] = True
                    else:
                        v_at = bv_b[first:lo]
                        for i in range(at.shape[0]):
                            bv = v_at[i]
                            if bv >= v_lo32 and bv < v_hi32:
                                mark[at[i]] = True
                    p = seg_end

        _UNDER_U = _under_patches_u_nb

        @numba.njit(nogil=True, cache=True)
        def _row_starts_nb(rows2, k_lo, starts):  # pragma: no cover - compiled
            # starts[b, j]: the first index of beam b's table whose row is >= k_lo + j.
            for b in range(rows2.shape[0]):
                rows = rows2[b]
                j = 0
                for i in range(rows.shape[0]):
                    key = np.int64(rows[i]) - k_lo
                    while j <= key:
                        starts[b, j] = i
                        j += 1
                while j < starts.shape[1]:
                    starts[b, j] = rows.shape[0]
                    j += 1

        _ROW_STARTS = _row_starts_nb

        @numba.njit(nogil=True, cache=True)
        def _or_runs_nb(src, runs, dst):  # pragma: no cover - compiled
            for k in range(runs.shape[0]):
                s0 = runs[k, 0]
                d0 = runs[k, 1]
                n = runs[k, 2]
                # Slices indexed from 0: no negative-index wrap per element, so LLVM vectorises
                # the loop (measured 25 times faster than indexing at d0 + j).
                d = dst[d0 : d0 + n]
                s = src[s0 : s0 + n]
                for j in range(n):
                    d[j] |= s[j]

        _OR_RUNS = _or_runs_nb

        @numba.njit(nogil=True, cache=True)
        def _remap_runs_nb(remap, out):  # pragma: no cover - compiled
            # One pass, the run's end written when it breaks (rarely: a predictable branch).
            n = remap.shape[0]
            k = 0
            is_open = False
            prev = np.int64(-1)
            for t in range(n):
                r = remap[t]
                if not (is_open and r == prev + 1):
                    if is_open:
                        out[k - 1, 2] = t - out[k - 1, 0]
                    is_open = r >= 0
                    if is_open:
                        out[k, 0] = t
                        out[k, 1] = r
                        k += 1
                prev = r
            if is_open:
                out[k - 1, 2] = n - out[k - 1, 0]
            return k

        _REMAP_RUNS = _remap_runs_nb

        @numba.njit(nogil=True, cache=True)
        def _nearest_d2_nb(bu_g, bv_g, cu_l, cv_l, m, bad, drow):  # pragma: no cover - compiled
            # One beam's row of capped_distance2: the least squared distance from each voxel
            # (bu_g, bv_g) to the m columns (cu_l, cv_l) on its grid, as NumPy's running minimum.
            inf32 = np.float32(np.inf)
            n = bu_g.shape[0]
            drow[:] = inf32
            if m == 0 or bad:  # NumPy: all +inf, or NaN everywhere (which ends as +inf)
                return
            for jj in range(m):
                cu = cu_l[jj]
                cv = cv_l[jj]
                for i in range(n):
                    du = bu_g[i] - cu
                    dv = bv_g[i] - cv
                    dj = du * du + dv * dv
                    if dj < drow[i]:
                        drow[i] = dj
            # A NaN term (the beam misses the voxel: u NaN) made NumPy's minimum NaN, and
            # NaN or an overflow ends as +inf.
            for i in range(n):
                if np.isnan(bu_g[i]) or np.isnan(bv_g[i]) or not np.isfinite(drow[i]):
                    drow[i] = inf32

        @numba.njit(nogil=True, cache=True)
        def _capped_d2_nb(bev_u2, bev_v2, bev_w2, capped, cols, d2_out, w_out):  # pragma: no cover - compiled
            n = capped.shape[0]
            cu_l = np.empty(cols.shape[0], np.float32)
            cv_l = np.empty(cols.shape[0], np.float32)
            bu_g = np.empty(n, np.float32)
            bv_g = np.empty(n, np.float32)
            for b in range(bev_u2.shape[0]):
                for i in range(n):
                    c = capped[i]
                    bu_g[i] = bev_u2[b, c]
                    bv_g[i] = bev_v2[b, c]
                    w_out[b, i] = bev_w2[b, c]
                # The columns on this beam's grid (one off it counts as an infinite distance).
                m = 0
                bad = False
                for j in range(cols.shape[0]):
                    cv = bev_v2[b, cols[j]]
                    if np.isfinite(cv):
                        cu_l[m] = bev_u2[b, cols[j]]
                        cv_l[m] = cv
                        bad = bad or np.isnan(cu_l[m])
                        m += 1
                _nearest_d2_nb(bu_g, bv_g, cu_l, cv_l, m, bad, d2_out[b])

        _CAPPED = _capped_d2_nb

        @numba.njit(nogil=True, cache=True)
        def _level_rows_nb(position, v_cells, u_cells, weights, level_index, ok, v, u, w, bounds):  # pragma: no cover
            found = False
            inf32 = np.float32(np.inf)
            v_min, v_max, u_min, u_max = inf32, -inf32, inf32, -inf32
            for i in range(level_index.shape[0]):
                pos = position[level_index[i]]
                here = pos >= 0
                p = pos if here else 0
                ok[i] = here
                vi = v_cells[p]
                ui = u_cells[p]
                v[i] = vi
                u[i] = ui
                for c in range(weights.shape[0]):
                    w[c, i] = weights[c, p]
                if here and np.isfinite(vi) and np.isfinite(ui):
                    found = True
                    v_min = min(v_min, vi)
                    v_max = max(v_max, vi)
                    u_min = min(u_min, ui)
                    u_max = max(u_max, ui)
            bounds[0], bounds[1], bounds[2], bounds[3] = v_min, v_max, u_min, u_max
            return found

        _LEVEL_ROWS = _level_rows_nb

        @numba.njit(nogil=True, cache=True)
        def _level_tables_nb(positions, v_cells, u_cells, weights, beams, level_index, ok, v, u, w, bounds,
                             found):  # pragma: no cover - compiled
            # _cpu_readout.level_tables: beams[s]'s look-up into row s, by _level_rows_nb itself.
            for s in range(beams.shape[0]):
                b = beams[s]
                found[s] = _level_rows_nb(positions[b], v_cells[b], u_cells[b], weights[b], level_index,
                                          ok[s], v[s], u[s], w[s], bounds[s])

        _LEVEL_TABLES = _level_tables_nb

        @numba.njit(nogil=True, cache=True)
        def _sort_by_row_nb(bu, bv, missing, order, rows, bu_sorted, bv_sorted, key):  # pragma: no cover
            n = bv.shape[0]
            k_min, k_max = 32767, -32768
            for i in range(n):
                if missing[i]:
                    k = 32767
                else:
                    f = np.floor(bv[i])
                    if np.isnan(f):
                        return False  # NumPy's float -> int16 cast of NaN: left to NumPy
                    k = np.int64(min(max(f, np.float32(-32000)), np.float32(32000)))
                key[i] = k
                k_min = min(k_min, k)
                k_max = max(k_max, k)
            if n == 0:
                return True
            # A counting sort: stable, so the same permutation as argsort(kind="stable").
            start = np.zeros(k_max - k_min + 2, np.int64)
            for i in range(n):
                start[key[i] - k_min + 1] += 1
            for j in range(1, start.shape[0]):
                start[j] += start[j - 1]
            for i in range(n):
                j = key[i] - k_min
                p = start[j]
                start[j] = p + 1
                order[p] = i
                rows[p] = key[i]
                bu_sorted[p] = bu[i]
                bv_sorted[p] = bv[i]
            return True

        _SORT_BY_ROW = _sort_by_row_nb

        @numba.njit(nogil=True, cache=True)
        def _combine_neighbours_nb(dc, inv, cw, out, sel):  # pragma: no cover - compiled
            n = cw.shape[1]
            for kk in range(dc.shape[0]):
                row = sel[kk]
                for i in range(n):
                    acc = dc[kk, inv[i]] * cw[0, i]
                    for j in range(1, cw.shape[0]):
                        acc += dc[kk, inv[j * n + i]] * cw[j, i]
                    out[row, i] += acc

        _COMBINE = _combine_neighbours_nb


def accumulate_padded(dose, vox, u, v, weights, flat, h: int, w: int, origin_vu) -> None:
    """``dose[vox] += `` the bilinear read-out of ``flat`` (see
    :func:`ids_engine.kernels.pencil.padded_window`) at ``(v, u)`` times ``weights``, summed
    over components, in one pass (``vox`` without repeats). Needs numba (``HAVE_NUMBA``)."""
    if _KERNEL is None:
        raise RuntimeError("accumulate_padded needs numba (pip install ids-engine[fast])")
    _KERNEL(dose, vox, u, v, weights, flat, np.int32(h), np.int32(w),
            np.float32(origin_vu[0] - 2), np.float32(origin_vu[1] - 2))


def _float32_c(a) -> np.ndarray:
    """``a`` as a C-contiguous float32 array: itself when it is one (checked for less than
    ``np.ascontiguousarray`` costs on the few hundred small read-outs of a request)."""
    if type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, np.float32)


def sample_weighted(maps, v, u, origin_vu, weights, ok, k: int) -> np.ndarray:
    """``(k, n)`` float32: the bilinear read-out of the stacked maps ``(k * nc, h, w)`` at
    fractional (row, col) ``(v, u)`` relative to ``origin_vu`` (each taken as
    ``np.float32(float(x))``; corners off the maps count 0), times ``weights`` ``(nc, n)``,
    summed over the ``nc`` components of each of the ``k`` patches; 0 where ``ok`` is False.
    The twin of ``sample_bilinear`` followed by the weighted component sum (agrees to float32
    round-off). Needs numba (``HAVE_NUMBA``)."""
    if _SAMPLE is None:
        raise RuntimeError("sample_weighted needs numba (pip install ids-engine[fast])")
    out = np.zeros((int(k), v.shape[0]), np.float32)
    _SAMPLE(_float32_c(maps), _float32_c(v), _float32_c(u), float(origin_vu[0]), float(origin_vu[1]),
            _float32_c(weights), ok if type(ok) is np.ndarray and ok.dtype == np.bool_ else np.asarray(ok, np.bool_),
            int(k), out)
    return out


def gather_bev(position, u_cells, v_cells, w0, vox, out_u, out_v, out_w) -> np.ndarray:
    """For level voxels ``vox`` (flat indices, (n,)): ``out_u``, ``out_v``, ``out_w`` ((n,)
    float32) = the level's ``u_cells``, ``v_cells`` and ``w0`` at ``position[vox]``, or NaN,
    +inf and 0 where ``position`` is -1 (not in the level), in one pass: what NumPy's
    ``np.where(pos < 0, nan, u_cells[pos])`` and its twins give. Returns ``pos < 0`` ((n,)
    bool). Needs numba (``HAVE_NUMBA``)."""
    if _GATHER_BEV is None:
        raise RuntimeError("gather_bev needs numba (pip install ids-engine[fast])")
    missing = np.empty(np.shape(vox)[0], np.bool_)
    _GATHER_BEV(position, u_cells, v_cells, w0, np.asarray(vox, np.int64), out_u, out_v, out_w, missing)
    return missing


def block_depth(rho_flat, ints, floats, out=None, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Radiological path (mm) of rays ``start:stop`` set up by ``kernels.raytrace._Rays``
    (``ints`` (5, m) int32, ``floats`` (11, m) float32) through the padded flat density,
    written into ``out`` (m,) float32 (a new array when None): the compiled twin of
    ``kernels.raytrace._block_depth``, one loop per ray (equal to it to a float32 ulp: the
    padded NumPy block can add a sub-ulp sliver after a ray's last step). Releases the GIL
    (threads can share the rays). Needs numba (``HAVE_NUMBA``)."""
    if _DEPTH is None:
        raise RuntimeError("block_depth needs numba (pip install ids-engine[fast])")
    m = ints.shape[1]
    if out is None:
        out = np.zeros(m, np.float32)
    _DEPTH(rho_flat, ints, floats, out, int(start), int(m if stop is None else stop))
    return out


def rfft2_padded(x: np.ndarray, fshape: tuple[int, int]) -> np.ndarray:
    """``scipy.fft.rfft2(x, fshape)`` of a float32 stack ``(..., h, w)`` zero-padded to
    ``fshape`` (``h <= fshape[0]``, ``w <= fshape[1]``): ``(..., fshape[0], fshape[1] // 2 + 1)``
    complex64, bit for bit."""
    from scipy import fft as sfft

    if x.dtype != np.float32:
        raise TypeError(f"rfft2_padded: float32 input expected, got {x.dtype}")
    if _POCKETFFT is None:  # pragma: no cover
        return sfft.rfft2(x, fshape)
    fshape = (int(fshape[0]), int(fshape[1]))
    if x.shape[-2:] == fshape and x.flags.c_contiguous:
        pad = x
    else:  # what scipy.fft's _fix_shape does: zeros, the data copied into the corner
        pad = np.zeros(x.shape[:-2] + fshape, np.float32)
        pad[..., : x.shape[-2], : x.shape[-1]] = x
    return _POCKETFFT.r2c(pad, (pad.ndim - 2, pad.ndim - 1), True, 0, None, 1)


def irfft2_rows(spec: np.ndarray, fshape: tuple[int, int], r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``scipy.fft.irfft2(spec, fshape)`` (``spec`` complex64
    ``(..., fshape[0], fshape[1] // 2 + 1)``): float32 ``(..., r1 - r0, fshape[1])``, bit for bit.

    pocketfft's 2-D inverse is the 1-D inverse along the rows' axis (unscaled) followed by
    the real inverse along the last axis, scaled by ``1 / (fshape[0] fshape[1])`` rounded from
    long double to float32 (its ``norm_fct``); here the second pass runs on rows ``r0:r1`` only
    (a DMR read-out needs about half of them).
    """
    from scipy import fft as sfft

    fshape = (int(fshape[0]), int(fshape[1]))
    if _POCKETFFT is None:  # pragma: no cover
        return np.ascontiguousarray(sfft.irfft2(spec, fshape)[..., r0:r1, :])
    if spec.dtype != np.complex64:
        raise TypeError(f"irfft2_rows: complex64 input expected, got {spec.dtype}")
    nd = spec.ndim
    if spec.shape[-2:] != (fshape[0], fshape[1] // 2 + 1):
        raise ValueError(f"irfft2_rows: spectrum shape {spec.shape[-2:]} does not match fshape {fshape}")
    cols = _POCKETFFT.c2c(spec, (nd - 2,), False, 0, None, 1)
    out = _POCKETFFT.c2r(cols[..., r0:r1, :], (nd - 1,), fshape[1], False, 0, None, 1)
    out *= _inverse_scale(fshape[0] * fshape[1])
    return out


@functools.lru_cache(maxsize=1024)
def _inverse_scale(n: int) -> np.float32:
    """pocketfft's ``norm_fct`` of an inverse transform of ``n`` points: ``1 / n`` in long
    double, rounded to float32 (computed once per size: long double arithmetic is slow)."""
    return np.float32(np.longdouble(1) / np.longdouble(n))


def patch_response_window(stack: np.ndarray, kspec: np.ndarray, fshape: tuple[int, int], rows: tuple[int, int],
                          cols: tuple[int, int]) -> np.ndarray:
    """Window ``[r0:r1, c0:c1]`` (``rows``, ``cols``) of the convolutions of a float32 stack
    ``(k, h, w)`` with kernels whose spectra ``kspec`` ``(nc, fshape[0], fshape[1] // 2 + 1)``
    complex64 are given: ``(k, nc, r1 - r0, c1 - c0)`` float32 (contiguous), bit for bit
    ``irfft2_rows(rfft2_padded(stack, fshape)[:, None] * kspec[None], fshape, r0, r1)[..., c0:c1]``
    in one call (a DMR solve's patch response: a few hundred small stacks a request, where the
    argument handling of the three calls cost more than the transforms)."""
    if _POCKETFFT is None or stack.dtype != np.float32 or stack.ndim != 3:  # pragma: no cover
        spec = rfft2_padded(np.asarray(stack, np.float32), fshape)[:, None] * kspec[None]
        return np.ascontiguousarray(irfft2_rows(spec, fshape, rows[0], rows[1])[..., cols[0] : cols[1]])
    k, h, w = stack.shape
    f0, f1 = fshape
    pad = np.zeros((k, f0, f1), np.float32)
    pad[:, :h, :w] = stack
    spec = _POCKETFFT.r2c(pad, (1, 2), True, 0, None, 1)[:, None] * kspec[None]
    _POCKETFFT.c2c(spec, (2,), False, 0, spec, 1)  # in place (pocketfft copies each line out and back)
    out = _POCKETFFT.c2r(spec[:, :, rows[0] : rows[1], :], (3,), f1, False, 0, None, 1)
    # The scale only on the columns kept (the same float32 product per element), into a new
    # contiguous array: one pass instead of scaling every column and then copying the window.
    win = out[..., cols[0] : cols[1]]
    res = np.empty(win.shape, np.float32)
    np.multiply(win, _inverse_scale(f0 * f1), out=res)
    return res


def mark_under_patches(bev_u2, bev_v2, order2, rows2, bu_sorted2, bv_sorted2, cols, reach_cells: float,
                       mark, u_sorted: bool = False, runs=None, whole_rows=None, row_starts=None) -> None:
    """Sets ``mark[i]`` for the watched voxels under the patches of columns ``cols``, in any
    beam: per beam ``b``, those whose BEV position (``bev_u2[b]``, ``bev_v2[b]``, fine
    fluence cells, (beams, n) float32, NaN / +inf where the beam misses the voxel) lies within
    ``reach_cells`` of the columns' box (v in ``[min - reach, max + reach)``, u in ``[min -
    reach, max + reach]``), found in the beam's voxels sorted by whole BEV row (``order2``
    (beams, n) int64, ``rows2`` the sorted int16 rows, ``bu_sorted2`` / ``bv_sorted2`` the
    positions in that order). The compiled twin of the per-beam loop in
    ``ids_engine.dmr._recovery._Rows.select`` (the same float32 / float64 edges as NumPy
    computes them: the same voxels, tested). With ``u_sorted`` (every row of every beam's
    table ordered by u, :func:`sort_rows_by_u`), each row is searched for the box's u range
    rather than scanned: the same voxels. With ``u_sorted`` only: ``whole_rows`` ((beams,)
    bool, what :func:`sort_rows_by_u` returned for each beam) skips the v test in the rows
    strictly inside the box where a beam's rows are whole (every voxel there passes it: the
    same voxels); ``runs`` ((k, 3) int64, :func:`remap_runs`) marks table index ``t`` at
    ``mark[d + t - s]`` for the run ``(s, d, length)`` holding it instead (none outside the
    runs: a watch's positions of its base's voxels); ``row_starts`` (:func:`row_starts` of
    ``rows2``) reads each row's span instead of searching the rows for it. Needs numba
    (``HAVE_NUMBA``)."""
    if _UNDER is None:
        raise RuntimeError("mark_under_patches needs numba (pip install ids-engine[fast])")
    cols = np.asarray(cols, np.int64)
    if u_sorted:
        beams = order2.shape[0]
        whole = np.zeros(beams, np.bool_) if whole_rows is None else np.asarray(whole_rows, np.bool_)
        if whole.shape != (beams,):
            raise ValueError("mark_under_patches: whole_rows needs one flag per beam")
        # Marked at the tables' indices (sequential reads of the tables, no index map per
        # voxel), then copied run by run: measured three times faster than mapping each voxel.
        table = mark if runs is None else np.zeros(order2.shape[1], np.bool_)
        starts, k_lo = (np.zeros((beams, 0), np.int64), 0) if row_starts is None else row_starts
        if row_starts is not None and (starts.ndim != 2 or starts.shape[0] != beams or starts.shape[1] < 2
                                       or np.any(starts[:, -1] != order2.shape[1])):
            raise ValueError(f"mark_under_patches: row_starts of shape {starts.shape} are not those of these "
                             f"{beams} x {order2.shape[1]} tables (row_starts(rows2))")
        if runs is not None:
            runs = np.asarray(runs, np.int64).reshape(-1, 3)
            if runs.size and (runs.min() < 0 or np.max(runs[:, 0] + runs[:, 2]) > table.shape[0]
                              or np.max(runs[:, 1] + runs[:, 2]) > mark.shape[0]):
                raise ValueError(f"mark_under_patches: runs reach past the {table.shape[0]} table voxels or "
                                 f"the {mark.shape[0]} marks (remap_runs of the watch's base positions)")
        _UNDER_U(bev_u2, bev_v2, order2, rows2, bu_sorted2, bv_sorted2, cols, float(reach_cells), whole,
                 starts, np.int64(k_lo), table)
        if runs is not None:
            _OR_RUNS(table, runs, mark)
    elif runs is not None or whole_rows is not None or row_starts is not None:
        raise ValueError("mark_under_patches: runs, whole_rows and row_starts need u_sorted tables")
    else:
        _UNDER(bev_u2, bev_v2, order2, rows2, bu_sorted2, bv_sorted2, cols, float(reach_cells), mark)


def row_starts(rows2) -> tuple[np.ndarray, int]:
    """``(starts, k_lo)``: where each row begins in each beam's row-sorted table (``rows2``,
    (beams, n) int16, each beam's rows ascending): ``starts[b, j]`` (int64, (beams, k_hi - k_lo
    + 2)) is the first index of beam ``b`` whose row is ``>= k_lo + j``, ``k_lo`` / ``k_hi`` the
    least and largest row of all beams (the ``row_starts`` of :func:`mark_under_patches`).
    Needs numba (``HAVE_NUMBA``)."""
    if _ROW_STARTS is None:
        raise RuntimeError("row_starts needs numba (pip install ids-engine[fast])")
    rows2 = np.asarray(rows2, np.int16)
    if not rows2.size:
        return np.zeros((rows2.shape[0], 0), np.int64), 0
    k_lo, k_hi = int(rows2.min()), int(rows2.max())
    starts = np.empty((rows2.shape[0], k_hi - k_lo + 2), np.int64)
    _ROW_STARTS(rows2, np.int64(k_lo), starts)
    return starts, k_lo


def remap_runs(remap) -> np.ndarray:
    """(k, 3) int64: the index map ``remap`` (int64, ``t -> remap[t]``, none where negative) as
    runs ``(s, d, length)``: ``remap[s + j] == d + j`` for ``j < length``, the runs in order of
    ``s``, each as long as it goes (the runs of :func:`mark_under_patches`). Needs numba
    (``HAVE_NUMBA``)."""
    if _REMAP_RUNS is None:
        raise RuntimeError("remap_runs needs numba (pip install ids-engine[fast])")
    remap = np.asarray(remap, np.int64)
    out = np.empty((remap.shape[0], 3), np.int64)
    k = _REMAP_RUNS(remap, out)
    return out[:k].copy()


def sort_rows_by_u(rows, order, bu_sorted, bv_sorted) -> bool:
    """Orders one beam's row-sorted table (``rows`` int16 ascending, with ``order``,
    ``bu_sorted``, ``bv_sorted`` in the same order, see :func:`sort_by_row`) by ``u`` within
    each row (stable), in place: then :func:`mark_under_patches` with ``u_sorted`` searches
    each row for the patches' box instead of scanning it (the same voxels: a NaN u, which no
    box holds, goes last in its row). Returns whether the rows are whole: every voxel of a row
    ``r`` in (-32000, 32000) has ``r <= v < r + 1`` (``rows`` the floor of ``v``, as
    :func:`sort_by_row` and the NumPy sort make them, except a NaN ``v``), the ``whole_rows``
    flag of :func:`mark_under_patches`. Needs numba (``HAVE_NUMBA``)."""
    if _SORT_ROWS_U is None:
        raise RuntimeError("sort_rows_by_u needs numba (pip install ids-engine[fast])")
    return bool(_SORT_ROWS_U(rows, order, bu_sorted, bv_sorted))


def capped_distance2(bev_u2, bev_v2, bev_w2, capped, cols) -> tuple[np.ndarray, np.ndarray]:
    """``(d2, w)``, (beams, len(capped)) float32: per beam, the squared BEV distance (fine
    cells^2) from each voxel ``capped`` to the nearest column of ``cols`` (+inf where the beam
    misses the voxel or every column, or where NumPy's ``minimum`` would meet a NaN), and the
    voxel's ``bev_w2``. The compiled twin of the capped ranking's distance loop in
    ``ids_engine.dmr._recovery._Rows.select`` (the same float32 operations: bit for bit,
    tested); the ``exp`` stays in NumPy. Needs numba (``HAVE_NUMBA``)."""
    if _CAPPED is None:
        raise RuntimeError("capped_distance2 needs numba (pip install ids-engine[fast])")
    capped = np.asarray(capped, np.int64)
    shape = (bev_u2.shape[0], capped.shape[0])
    d2, w = np.empty(shape, np.float32), np.empty(shape, np.float32)
    _CAPPED(bev_u2, bev_v2, bev_w2, capped, np.asarray(cols, np.int64), d2, w)
    return d2, w


def check_level_index(level_index: np.ndarray, size: int) -> None:
    """Raise IndexError unless every entry of ``level_index`` indexes an array of ``size``
    entries as NumPy would (``-size <= i < size``): the compiled loops read out of bounds."""
    if level_index.shape[0] and (int(level_index.min()) < -size or int(level_index.max()) >= size):
        raise IndexError(f"level_index: entries in [{int(level_index.min())}, {int(level_index.max())}] "
                         f"outside a level of {size} voxels")


def level_rows(position, v_cells, u_cells, weights, level_index):
    """One pass over level voxels ``level_index``: ``ok`` (position >= 0), ``v``, ``u`` ((n,)
    float32, of position 0 where not ok), ``weights`` ((nc, n) float32, contiguous) at
    ``position[level_index]``, and the float32 min / max of v and u over the ok voxels with
    finite v and u (None when there is none): what ``_LevelRows.of`` computes with NumPy
    (the same values: gathers and min / max only). Raises IndexError if ``level_index`` points
    outside the level (:func:`check_level_index`). Needs numba (``HAVE_NUMBA``)."""
    if _LEVEL_ROWS is None:
        raise RuntimeError("level_rows needs numba (pip install ids-engine[fast])")
    check_level_index(level_index, int(position.shape[0]))
    n = level_index.shape[0]
    ok = np.empty(n, np.bool_)
    v, u = np.empty(n, np.float32), np.empty(n, np.float32)
    w = np.empty((weights.shape[0], n), np.float32)
    bounds = np.empty(4, np.float32)
    found = _LEVEL_ROWS(position, v_cells, u_cells, weights, level_index, ok, v, u, w, bounds)
    return ok, v, u, w, (tuple(float(b) for b in bounds) if found else None)


def combine_neighbours(dc, inv, cw, out, sel) -> None:
    """``out[sel] += (dc[:, inv].reshape(k, 8, n) * cw[None]).sum(axis=1)`` in one pass: the
    dose change at CT voxels from a coarse level's read-out ``dc`` ((k, m) float32, at the
    distinct coarse neighbours), ``inv`` ((8 n,) int64, each neighbour's place among them),
    the trilinear weights ``cw`` ((8, n) float32) and ``out`` ((K, n) float32, rows ``sel``
    ((k,) int64, distinct)). The same float32 operations in the same order as NumPy (the sum
    over the 8 neighbours runs in order): bit for bit (tested). Needs numba (``HAVE_NUMBA``)."""
    if _COMBINE is None:
        raise RuntimeError("combine_neighbours needs numba (pip install ids-engine[fast])")
    _COMBINE(dc, inv, cw, out, sel)


def sort_by_row(bu, bv, missing, order, rows, bu_sorted, bv_sorted) -> bool:
    """One beam's watched voxels ordered by whole BEV row: the key ``floor(bv)`` clipped to
    +/-32000 (int16), 32767 where ``missing``; writes ``order`` ((n,) int64, the permutation of
    ``argsort(key, kind="stable")``: a counting sort is stable, so the same one), ``rows``
    (int16 keys in that order) and ``bu_sorted`` / ``bv_sorted``. Returns False, writing
    nothing usable, where some ``bv`` not missing is NaN (NumPy's cast decides those). Needs
    numba (``HAVE_NUMBA``)."""
    if _SORT_BY_ROW is None:
        raise RuntimeError("sort_by_row needs numba (pip install ids-engine[fast])")
    return bool(_SORT_BY_ROW(bu, bv, missing, order, rows, bu_sorted, bv_sorted, np.empty(bv.shape[0], np.int64)))
