"""Compiled passes of a DMR recovery step's host work (numba, optional).

When numba is installed (the ``fast`` extra) ``ids_engine.dmr._recovery`` runs these loops in
place of NumPy code that stays the reference (it runs with ``IDS_NUMBA=0`` or without numba);
each gives the same values, so the same rows, voxels and steps
(``tests/dmr/test_select_fast.py`` compares them):

- :func:`scan_watch`: a recovery step's pass over the watch (``recover``): the violation, the
  objective's terms, the score, its largest and the voxels off their band each way, in one
  pass instead of about twenty NumPy passes over 10^5 voxels (its twin:
  :func:`scan_watch_numpy`).
- :func:`in_band_under`: the at-risk and soft-capped voxels among those under the columns'
  patches (``_Rows.select``), one pass over the marks instead of ``flatnonzero`` and gathers.
- :func:`in_band_risk`: the same pass keeping only what the step keeps, the ``max_rows_risk``
  voxels of least room (a bounded heap instead of every voxel's room and ``argpartition``)
  and the capped ones, into a buffer the caller keeps: no (n,) outputs per step.
- :func:`ball_row_marks`: the watched voxels within a radius of the columns (``_Rows.ball``),
  one search of the sorted watch per row of the ball (:func:`ball_rows`) instead of one per
  offset.
- :func:`capped_distance2_source`: ``_cpu.capped_distance2`` of a watch built on a base, read
  from the base's BEV tables, so the watch's own (three (beams, 10^5) tables, spliced for
  every request) are made only for the NumPy code.
- :func:`capped_sens_bounds`: bounds of the capped ranking's keys (``_Rows._top_capped``), one
  ``exp`` per voxel instead of one per beam and voxel: they leave out the voxels that cannot
  make the top ``max_rows_capped``, and only the few left (about as many as kept) get their
  exact keys from the NumPy expression, so the same voxels are kept.
- :func:`capped_candidates`: those voxels, the bounds taken only of the voxels whose ceiling
  (their largest weight over the beams per Gy of room), times a bound of the fall-off at the
  columns' boxes, can reach the top ``max_rows_capped``, and the selection in the same
  compiled call.
- :func:`pick_spread`: the step's cluster (``_pick_spread``), the greedy walk compiled.
- :func:`gather_composed`: a composed watch's dose (``_composed_dose``), the take and the
  cast to float64 in one pass.

They are compiled where ``kernels._cpu``'s loops are, and one switch turns all of them off:
``_cpu.HAVE_NUMBA`` (False with ``IDS_NUMBA=0`` or without numba), which the callers read at
each call, so a test that sets it to False runs every NumPy reference."""

from __future__ import annotations

import numpy as np

from ids_engine.kernels import _cpu

__all__ = ["ball_row_marks", "ball_rows", "capped_candidates", "capped_distance2_source", "capped_sens_bounds",
           "gather_composed", "in_band_risk", "in_band_under", "pick_spread", "scan_watch", "scan_watch_numpy"]

_IN_BAND = None
_IN_BAND_RISK = None
_SCAN = None
_SPREAD = None
_COMPOSED = None
_BALL_ROWS = None
_CAPPED_SOURCE = None
_CAPPED_BOUNDS = None
_CAPPED_CANDIDATES = None
if _cpu.HAVE_NUMBA:  # compiled where kernels._cpu's loops are (numba importable, IDS_NUMBA != "0")
    import numba

    @numba.njit(nogil=True, cache=True, inline="always")
    def _in_band_room_nb(i, mark, viol, dose, hi, lo):  # pragma: no cover - compiled
        # Voxel i's room (the least of hi - dose and dose - lo) if it is marked and in its
        # band, else NaN (never below a slack limit). NumPy's minimum is NaN where either is.
        # Branch-free (every operand read, the tests combined with & and one select at the
        # end): the marks and bands vary from voxel to voxel, and the early returns cost a
        # mispredicted branch each (measured: 2.4 ms against 0.3 ms a clinical step's pass).
        a = hi[i] - dose[i]
        b = dose[i] - lo[i]
        ok = mark[i] & (viol[i] == 0) & (a == a) & (b == b)
        return (a if a < b else b) if ok else np.nan

    @numba.njit(nogil=True, cache=True)
    def _in_band_under_nb(mark, near, viol, dose, hi, lo, capped, slack_max, touched, slack,
                          touched_capped):  # pragma: no cover - compiled
        for j in range(near.shape[0]):
            mark[near[j]] = False
        nt = 0
        nc = 0
        for i in range(mark.shape[0]):
            s = _in_band_room_nb(i, mark, viol, dose, hi, lo)
            if s < slack_max:
                touched[nt] = i
                slack[nt] = s
                nt += 1
                if capped[i]:
                    touched_capped[nc] = i
                    nc += 1
        return nt, nc

    _IN_BAND = _in_band_under_nb

    @numba.njit(nogil=True, cache=True)
    def _in_band_risk_nb(mark, near, viol, dose, hi, lo, capped, slack_max, heap_slack, heap_idx,
                         touched_capped):  # pragma: no cover - compiled
        # _in_band_under_nb keeping only the heap_slack.size least rooms (a max-heap on the
        # room, (slack, index) pairs), not every voxel's: a voxel enters only below the
        # largest kept, so every voxel left out has at least the largest kept room.
        for j in range(near.shape[0]):
            mark[near[j]] = False
        m = heap_slack.shape[0]
        nt = 0
        nc = 0
        for i in range(mark.shape[0]):
            s = _in_band_room_nb(i, mark, viol, dose, hi, lo)
            if not s < slack_max:
                continue
            if capped[i]:
                touched_capped[nc] = i
                nc += 1
            if nt < m:  # the heap not full: sift up from the end
                c = nt
                while c > 0:
                    p = (c - 1) // 2
                    if heap_slack[p] >= s:
                        break
                    heap_slack[c] = heap_slack[p]
                    heap_idx[c] = heap_idx[p]
                    c = p
                heap_slack[c] = s
                heap_idx[c] = i
            elif s < heap_slack[0]:  # replaces the largest kept: sift down from the root
                c = 0
                while True:
                    l = 2 * c + 1
                    if l >= m:
                        break
                    r = l + 1
                    big = r if r < m and heap_slack[r] > heap_slack[l] else l
                    if heap_slack[big] <= s:
                        break
                    heap_slack[c] = heap_slack[big]
                    heap_idx[c] = heap_idx[big]
                    c = big
                heap_slack[c] = s
                heap_idx[c] = i
            nt += 1
        return nt, nc

    _IN_BAND_RISK = _in_band_risk_nb

    @numba.njit(nogil=True, cache=True)
    def _scan_watch_nb(dose, lo, hi, weight, blocked, viol, wv2, score, cold, hot):  # pragma: no cover
        # NumPy's maximum: a if a >= b or a is NaN, else b (NaN propagates).
        r = -1
        nan_at = -1
        best = -np.inf
        big = False
        nc = 0
        nh = 0
        for i in range(dose.shape[0]):
            d = dose[i]
            a = lo[i] - d
            b = d - hi[i]
            m = a if (a >= b or np.isnan(a)) else b
            v = m if (m >= 0.0 or np.isnan(m)) else 0.0
            viol[i] = v
            w = weight[i]
            wv2[i] = w * (v * v)
            s = 0.0 if blocked[i] else w * v
            score[i] = s
            if s > 1e-6:
                big = True
            if np.isnan(s):  # argmax: the first NaN
                if nan_at < 0:
                    nan_at = i
            elif s > best:
                best = s
                r = i
            if s > 0:
                if d < lo[i]:
                    cold[nc] = i
                    nc += 1
                if d > hi[i]:
                    hot[nh] = i
                    nh += 1
        if nan_at >= 0:
            r = nan_at
        return r, big, nc, nh

    _SCAN = _scan_watch_nb

    @numba.njit(nogil=True, cache=True)
    def _pick_spread_nb(order, coords, spacing, limit, kept):  # pragma: no cover - compiled
        # The distance as np.linalg.norm(..., axis=1) sums the squares: ((z + y) + x);
        # a NaN distance makes NumPy's min NaN, which is not below the spacing.
        nk = 0
        for t in range(order.shape[0]):
            if nk >= limit:
                break
            i = order[t]
            m = np.inf
            for j in range(nk):
                k = kept[j]
                dz = coords[k, 0] - coords[i, 0]
                dy = coords[k, 1] - coords[i, 1]
                dx = coords[k, 2] - coords[i, 2]
                d = np.sqrt((dz * dz + dy * dy) + dx * dx)
                if np.isnan(d) or np.isnan(m):
                    m = np.nan
                elif d < m:
                    m = d
            if nk and m < spacing:
                continue
            kept[nk] = i
            nk += 1
        return nk

    _SPREAD = _pick_spread_nb

    @numba.njit(nogil=True, cache=True)
    def _gather_composed_nb(base, extra, source, out):  # pragma: no cover - compiled
        nb = base.shape[0]
        for i in range(source.shape[0]):
            s = source[i]
            out[i] = np.float64(base[s]) if s < nb else np.float64(extra[s - nb])

    _COMPOSED = _gather_composed_nb

    @numba.njit(nogil=True, cache=True)
    def _ball_rows_nb(index_zyx, cols, rows, nz, ny, nx, voxels, mark):  # pragma: no cover - compiled
        # Returns the span [first, stop) of the positions it marked (first >= stop: none).
        n = voxels.shape[0]
        span_lo, span_hi = n, 0
        for j in range(cols.shape[0]):
            cz = index_zyx[cols[j], 0]
            cy = index_zyx[cols[j], 1]
            cx = index_zyx[cols[j], 2]
            for t in range(rows.shape[0]):
                z = cz + rows[t, 0]
                y = cy + rows[t, 1]
                if z < 0 or z >= nz or y < 0 or y >= ny:
                    continue
                x0 = max(cx + rows[t, 2], 0)
                x1 = min(cx + rows[t, 3], nx - 1)
                if x0 > x1:
                    continue
                first = (z * ny + y) * nx + x0
                last = first + (x1 - x0)
                lo, hi = 0, n
                while lo < hi:  # searchsorted(voxels, first, side="left")
                    mid = (lo + hi) // 2
                    if voxels[mid] < first:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < n and voxels[lo] <= last:
                    span_lo = min(span_lo, lo)
                    while lo < n and voxels[lo] <= last:
                        mark[lo] = True
                        lo += 1
                    span_hi = max(span_hi, lo)
        return span_lo, span_hi

    _BALL_ROWS = _ball_rows_nb

    @numba.njit(nogil=True, cache=True)
    def _capped_d2_source_nb(bu2, bv2, bw2, eu, ev, ew, source, capped, cols, d2_out,
                             w_out):  # pragma: no cover - compiled
        # _cpu._capped_d2_nb with watched voxel i's values read at source[i] of the base's
        # tables, or of the extra voxels' past them: the same float32 operations and order.
        n = capped.shape[0]
        nb = bu2.shape[1]
        cu_l = np.empty(cols.shape[0], np.float32)
        cv_l = np.empty(cols.shape[0], np.float32)
        bu_g = np.empty(n, np.float32)
        bv_g = np.empty(n, np.float32)
        for b in range(bu2.shape[0]):
            for i in range(n):
                s = source[capped[i]]
                if s < nb:
                    bu_g[i] = bu2[b, s]
                    bv_g[i] = bv2[b, s]
                    w_out[b, i] = bw2[b, s]
                else:
                    bu_g[i] = eu[b, s - nb]
                    bv_g[i] = ev[b, s - nb]
                    w_out[b, i] = ew[b, s - nb]
            m = 0
            bad = False
            for j in range(cols.shape[0]):
                s = source[cols[j]]
                cv = bv2[b, s] if s < nb else ev[b, s - nb]
                if np.isfinite(cv):
                    cu_l[m] = bu2[b, s] if s < nb else eu[b, s - nb]
                    cv_l[m] = cv
                    bad = bad or np.isnan(cu_l[m])
                    m += 1
            _cpu._nearest_d2_nb(bu_g, bv_g, cu_l, cv_l, m, bad, d2_out[b])

    _CAPPED_SOURCE = _capped_d2_source_nb

    @numba.njit(nogil=True, cache=True, inline="always")
    def _exp_bounds_nb(x):  # pragma: no cover - compiled
        # ((1 - x)^8, max(1 + x, 0)^8) in float32 for x <= 0: exp(8 x) <= the first's
        # inverse, exp(8 x) >= the second.
        zero, one = np.float32(0), np.float32(1)
        up = one - x
        up = up * up
        up = up * up
        up = up * up
        lo = one + x
        lo = lo if lo > zero else zero
        lo = lo * lo
        lo = lo * lo
        lo = lo * lo
        return up, lo

    # error_model="numpy": numba's default checks every float division for a zero divisor,
    # which keeps the loops from being vectorised (measured: 4x slower).
    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _capped_bounds_nb(bu2, bv2, bw2, eu, ev, ew, sidx, cu2, cv2, s2, q_max, lval,
                          uval):  # pragma: no cover - compiled
        # Per voxel i and beam b: d2 as _cpu._nearest_d2_nb finds it (+inf: no term), q =
        # float32(-d2) / s2, and w exp(q) = exp(q_max) w exp(x), x = q - q_max <= 0 against the
        # running largest q, bounded by (1 + x/8)^8 <= exp(x) <= (1 - x/8)^-8 (the kept sums
        # rescaled by the same bounds of exp(q_max_old - q_max_new) when the largest grows).
        # Beam by beam over all voxels, branch-free: the loops are vectorised.
        n_beams = bu2.shape[0]
        nb = bu2.shape[1]
        nc = cu2.shape[1]
        n = sidx.shape[0]
        zero, one, eighth, inf32 = np.float32(0), np.float32(1), np.float32(0.125), np.float32(np.inf)
        # (a weight this large could put a key above 1e-20 on a subnormal exp: no bounds then)
        w_limit = np.float32(1e15)
        none = np.float32(-1e30)  # q of no term: exp(q) is 0 and (1 -+ x/8)^8 overflows
        clamped = np.minimum(sidx, nb - 1)
        extra_at = np.flatnonzero(sidx >= nb)
        gu = np.empty(n, np.float32)
        gv = np.empty(n, np.float32)
        gw = np.empty(n, np.float32)
        d = np.empty(n, np.float32)
        cu_l = np.empty(nc, np.float32)
        cv_l = np.empty(nc, np.float32)
        q_max[:] = none
        lval[:] = zero
        uval[:] = zero
        nonfinite_w = 0
        for b in range(n_beams):
            u_b, v_b, w_b = bu2[b], bv2[b], bw2[b]
            if nb:
                for i in range(n):
                    gu[i] = u_b[clamped[i]]
                    gv[i] = v_b[clamped[i]]
                    gw[i] = w_b[clamped[i]]
            for i in extra_at:
                gu[i] = eu[b, sidx[i] - nb]
                gv[i] = ev[b, sidx[i] - nb]
                gw[i] = ew[b, sidx[i] - nb]
            for i in range(n):
                nonfinite_w += 0 if abs(gw[i]) < w_limit else 1  # NaN, inf or absurdly large
            # The columns on this beam's grid; a NaN u among them: NumPy's distances are NaN,
            # which ends as +inf (no term), as is a beam without a column.
            m = 0
            bad = False
            for j in range(nc):
                cv = cv2[b, j]
                if np.isfinite(cv):
                    cu_l[m] = cu2[b, j]
                    cv_l[m] = cv
                    bad = bad or np.isnan(cu2[b, j])
                    m += 1
            if m == 0 or bad:
                continue
            for i in range(n):
                d[i] = inf32
            for jj in range(m):
                cu = cu_l[jj]
                cv = cv_l[jj]
                for i in range(n):
                    du = gu[i] - cu
                    dv = gv[i] - cv
                    dj = du * du + dv * dv
                    d[i] = dj if dj < d[i] else d[i]
            for i in range(n):
                ok = d[i] < inf32  # not +inf, nor NaN (a missed voxel's u)
                q = -d[i] / s2 if ok else none
                w = gw[i] if ok else zero
                q_old = q_max[i]
                q_new = q if q > q_old else q_old
                # the old sums to the new largest exponent, and this beam's term (both x <= 0)
                t_up, t_lo = _exp_bounds_nb((q_old - q_new) * eighth)
                e_up, e_lo = _exp_bounds_nb((q - q_new) * eighth)
                u_old = uval[i] / t_up
                u_new = w / e_up
                uval[i] = u_new if u_new > u_old else u_old
                l_old = lval[i] * t_lo
                l_new = w * e_lo
                lval[i] = l_new if l_new > l_old else l_old
                q_max[i] = q_new
        return nonfinite_w

    _CAPPED_BOUNDS = _capped_bounds_nb

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _bounds_at_nb(bu2, bv2, bw2, eu, ev, ew, sidx, sel, cu2, cv2, s2, room, lower,
                      upper):  # pragma: no cover - compiled
        # capped_sens_bounds of the voxels sel (positions into sidx), into lower[sel], upper[sel]:
        # the same kernel and scaling (each voxel's bounds depend on its own tables only).
        m = sel.shape[0]
        sub = np.empty(m, np.int64)
        for t in range(m):
            sub[t] = sidx[sel[t]]
        q_max = np.empty(m, np.float32)
        lval = np.empty(m, np.float32)
        uval = np.empty(m, np.float32)
        bad = _capped_bounds_nb(bu2, bv2, bw2, eu, ev, ew, sub, cu2, cv2, s2, q_max, lval, uval)
        for t in range(m):
            i = sel[t]
            scale = np.float64(np.exp(q_max[t])) / room[i]
            lower[i] = np.float64(lval[t]) * scale
            upper[i] = np.float64(uval[t]) * scale
        return bad

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _kth_largest_nb(values, sel, k, floor):  # pragma: no cover - compiled
        # The k-th largest of values[sel], of which at least k are >= floor (NaN none of them):
        # np.partition of those at or above the floor only.
        m = 0
        for t in range(sel.shape[0]):
            m += 1 if values[sel[t]] >= floor else 0
        got = np.empty(m)
        m = 0
        for t in range(sel.shape[0]):
            x = values[sel[t]]
            if x >= floor:
                got[m] = x
                m += 1
        return np.partition(got, m - k)[m - k]

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _box_ceiling_nb(bu2, bv2, eu, ev, sidx, sel, cu2, cv2, s2, ceiling, est):  # pragma: no cover - compiled
        # est[sel]: at least each voxel's upper bound (_bounds_at_nb's), a relative 1e-3 aside
        # for round-off. That bound's sums are at most w_top and its scale is exp(q_max) / room,
        # q_max = -d2 / s2 at the least d2 over the beams: it is at most ceiling * exp(q_max).
        # Each beam's d2 is at least the squared distance to the box of its columns (the same
        # float32 differences, rounded the same way, no larger than the nearest column's), and
        # exp(q) <= (1 - q / 32)^-32 for q <= 0 (no exp: the loops are vectorised).
        n_beams = bu2.shape[0]
        nb = bu2.shape[1]
        nc = cu2.shape[1]
        m = sel.shape[0]
        zero, inf32 = np.float32(0), np.float32(np.inf)
        sub = np.empty(m, np.int64)
        for t in range(m):
            sub[t] = sidx[sel[t]]
        clamped = np.minimum(sub, nb - 1)
        extra_at = np.flatnonzero(sub >= nb)
        gu = np.empty(m, np.float32)
        gv = np.empty(m, np.float32)
        d_min = np.empty(m, np.float32)
        d_min[:] = inf32
        for b in range(n_beams):
            # The box of the columns on this beam's grid (none, or a NaN u among them: no
            # term on this beam, as in _capped_bounds_nb).
            found = False
            bad = False
            u_lo, u_hi, v_lo, v_hi = inf32, -inf32, inf32, -inf32
            for j in range(nc):
                cv = cv2[b, j]
                if np.isfinite(cv):
                    cu = cu2[b, j]
                    found = True
                    bad = bad or np.isnan(cu)
                    u_lo = cu if cu < u_lo else u_lo
                    u_hi = cu if cu > u_hi else u_hi
                    v_lo = cv if cv < v_lo else v_lo
                    v_hi = cv if cv > v_hi else v_hi
            if not found or bad:
                continue
            u_b, v_b = bu2[b], bv2[b]
            if nb:
                for t in range(m):
                    gu[t] = u_b[clamped[t]]
                    gv[t] = v_b[clamped[t]]
            for t in extra_at:
                gu[t] = eu[b, sub[t] - nb]
                gv[t] = ev[b, sub[t] - nb]
            for t in range(m):
                # (a NaN difference counts as 0: never more than the nearest column's)
                a = u_lo - gu[t]
                c = gu[t] - u_hi
                du = a if a > c else c
                du = du if du > zero else zero
                a = v_lo - gv[t]
                c = gv[t] - v_hi
                dv = a if a > c else c
                dv = dv if dv > zero else zero
                dj = du * du + dv * dv
                d_min[t] = dj if dj < d_min[t] else d_min[t]
        for t in range(m):
            y = 1.0 - np.float64(-d_min[t] / s2) / 32.0  # (+inf where no beam has a term: est 0)
            y = y * y
            y = y * y
            y = y * y
            y = y * y
            y = y * y
            est[sel[t]] = ceiling[sel[t]] / y * (1.0 + 1e-3)

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _not_below_nb(values, sel, cut, keep):  # pragma: no cover - compiled
        # The entries of sel whose value is not below cut (NaN: kept), in order; keep[i] False
        # for the others.
        out = np.empty(sel.shape[0], np.int64)
        m = 0
        for t in range(sel.shape[0]):
            i = sel[t]
            ok = not values[i] < cut
            keep[i] = ok
            out[m] = i
            m += 1 if ok else 0
        return out[:m]

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _capped_candidates_nb(bu2, bv2, bw2, eu, ev, ew, w_top, ew_top, source, composed, capped, hi, dose, cu2,
                              cv2, s2, k, n_first, at):  # pragma: no cover - compiled
        # Each voxel's key is at most its ceiling w_top / room (exp <= 1, and w >= 0 past the
        # clamp at 0). About the n_first highest ceilings (a strided sample's quantile) get
        # their bounds first; their k-th largest lower bound tau is at most the k-th of all,
        # so a voxel whose ceiling lies a relative 1e-3 below tau is no candidate and leaves
        # the k-th largest lower bound alone, nor is one whose estimate (the ceiling times an
        # upper bound of exp at the columns' boxes, _box_ceiling_nb) lies below. Where many
        # are left, the n_first highest estimates get their bounds next, for a tighter tau.
        # Only the voxels left get bounds: the k-th largest lower bound of every voxel, and
        # every voxel whose upper bound reaches its cut.
        n = capped.shape[0]
        nb = bu2.shape[1]
        # Each voxel's index into the tables, its room, np.maximum(hi - dose, 0.02), and its
        # ceiling (a NaN room or w_top: no bounds).
        sidx = np.empty(n, np.int64)
        room = np.empty(n)
        ceiling = np.empty(n)
        for i in range(n):
            c = capped[i]
            s = source[c] if composed else c
            sidx[i] = s
            r = hi[c] - dose[c]
            w = w_top[s] if s < nb else ew_top[s - nb]
            if np.isnan(r) or np.isnan(w):
                return -1, 0.0
            r = r if r >= 0.02 else 0.02
            room[i] = r
            ceiling[i] = 0.0 if w <= 0 else np.float64(w) / r
        # (read only where a voxel got its bounds)
        lower = np.empty(n)
        upper = np.empty(n)
        keep = np.empty(n, np.bool_)
        t_first = -np.inf
        stride = n // (2 * n_first)
        if stride >= 2:
            sample = ceiling[::stride].copy()
            q = max(sample.shape[0] * n_first // n, 1)
            t_first = np.partition(sample, sample.shape[0] - q)[sample.shape[0] - q]
        first = np.empty(n, np.int64)
        m = 0
        for i in range(n):
            ok = not ceiling[i] < t_first
            keep[i] = ok
            first[m] = i
            m += 1 if ok else 0
        if m < k:
            keep[:] = True
            first = np.arange(n)
        else:
            first = first[:m]
        if _bounds_at_nb(bu2, bv2, bw2, eu, ev, ew, sidx, first, cu2, cv2, s2, room, lower, upper):
            return -1, 0.0
        tau = _kth_largest_nb(lower, first, k, -np.inf)
        if first.shape[0] < n:
            cut = tau * (1.0 - 1e-3)
            second = np.empty(n - first.shape[0], np.int64)
            m = 0
            for i in range(n):
                ok = not keep[i] and not ceiling[i] < cut
                second[m] = i
                m += 1 if ok else 0
            second = second[:m]
            est = np.empty(n)
            _box_ceiling_nb(bu2, bv2, eu, ev, sidx, second, cu2, cv2, s2, ceiling, est)
            second = _not_below_nb(est, second, cut, keep)
            m = second.shape[0]
            if m > 2 * n_first:
                got = np.empty(m)
                for t in range(m):
                    got[t] = est[second[t]]
                t_top = np.partition(got, m - n_first)[m - n_first]
                best = second[got >= t_top]
                if _bounds_at_nb(bu2, bv2, bw2, eu, ev, ew, sidx, best, cu2, cv2, s2, room, lower, upper):
                    return -1, 0.0
                tau = _kth_largest_nb(lower, np.concatenate((first, best)), k, tau)
                second = _not_below_nb(est, second[got < t_top], tau * (1.0 - 1e-3), keep)
            if _bounds_at_nb(bu2, bv2, bw2, eu, ev, ew, sidx, second, cu2, cv2, s2, room, lower, upper):
                return -1, 0.0
        kept = np.flatnonzero(keep)
        kth = _kth_largest_nb(lower, kept, k, tau)
        cut = kth * (1.0 - 1e-3)
        nc = 0
        for t in range(kept.shape[0]):
            i = kept[t]
            at[nc] = i
            nc += 1 if upper[i] >= cut else 0
        return nc, kth

    _CAPPED_CANDIDATES = _capped_candidates_nb




def in_band_under(mark, near, viol, dose, hi, lo, capped, slack_max: float):
    """The voxels ``i`` with ``mark[i]`` (after clearing ``mark[near]``, in place) in their band
    (``viol[i] == 0``) whose room ``min(hi - dose, dose - lo)`` (float64) is below
    ``slack_max``: ``(touched, slack, touched_capped)``, the voxels (int64, ascending), their
    room, and those of them with ``capped[i]``. What ``_Rows.select`` computes with
    ``flatnonzero`` and gathers (the same voxels and values). ``mark``, ``capped`` (n,) bool;
    ``viol``, ``dose``, ``hi``, ``lo`` (n,) float64; ``near`` int64 indices. Needs numba
    (``_cpu.HAVE_NUMBA``)."""
    if _IN_BAND is None:
        raise RuntimeError("in_band_under needs numba (pip install ids-engine[fast])")
    viol, dose, hi, lo = (np.asarray(a, np.float64) for a in (viol, dose, hi, lo))
    n = mark.shape[0]
    touched, slack, touched_capped = np.empty(n, np.int64), np.empty(n, np.float64), np.empty(n, np.int64)
    nt, nc = _IN_BAND(mark, np.asarray(near, np.int64), viol, dose, hi, lo, capped, float(slack_max), touched,
                      slack, touched_capped)
    return touched[:nt].copy(), slack[:nt].copy(), touched_capped[:nc].copy()


def in_band_risk(mark, near, viol, dose, hi, lo, capped, slack_max: float, k: int, scratch):
    """What ``_Rows.select`` keeps of :func:`in_band_under`'s voxels, in one pass without its
    (n,) outputs: ``(risk, touched_capped)``, the ``k`` voxels of least room (int64, in
    increasing index order: the set of ``touched[_smallest(slack, k)]``) and those with
    ``capped[i]`` (int64, ascending, a copy of ``scratch``'s first entries). None where more
    than ``k`` voxels pass and the ``k``-th least room equals the next (which ones are kept
    then depends on ``_smallest``'s sort: the caller asks :func:`in_band_under`). Clears
    ``mark[near]`` in place as :func:`in_band_under` does; ``scratch`` ((n,) int64, at least
    ``mark``'s size) is written. ``k`` >= 1. Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _IN_BAND_RISK is None:
        raise RuntimeError("in_band_risk needs numba (pip install ids-engine[fast])")
    if k < 1 or scratch.shape[0] < mark.shape[0]:
        raise ValueError(f"in_band_risk: k {k} < 1, or scratch of {scratch.shape[0]} for {mark.shape[0]} voxels")
    k = min(int(k), int(mark.shape[0]))  # (a k past the voxels keeps every one: no larger heap)
    viol, dose, hi, lo = (np.asarray(a, np.float64) for a in (viol, dose, hi, lo))
    heap_slack, heap_idx = np.empty(k + 1, np.float64), np.empty(k + 1, np.int64)
    nt, nc = _IN_BAND_RISK(mark, np.asarray(near, np.int64), viol, dose, hi, lo, capped, float(slack_max), heap_slack,
                           heap_idx, scratch)
    kept = min(nt, k + 1)
    heap_slack, heap_idx = heap_slack[:kept], heap_idx[:kept]
    if nt > k:
        order = np.argsort(heap_slack, kind="stable")
        if not heap_slack[order[k - 1]] < heap_slack[order[k]]:
            return None
        heap_idx = heap_idx[order[:k]]
    return np.sort(heap_idx), scratch[:nc].copy()


def scan_watch(dose, lo, hi, weight, blocked):
    """One pass over the watch for a recovery step: ``(viol, wv2, score, r, big, cold, hot)``,
    the violation ``max(max(lo - dose, dose - hi), 0)`` (as ``Watch.violation``), ``weight *
    viol**2`` (whose NumPy sum is the objective), the score ``where(blocked, 0, weight *
    viol)``, its ``argmax`` ``r`` (-1 when the watch is empty), whether some score is above
    1e-6, and the voxels (int64, ascending) with a positive score below their band (``cold``)
    and above it (``hot``). ``dose``, ``lo``, ``hi``, ``weight`` (n,) float64; ``blocked`` (n,)
    bool. Compiled with numba when it is installed, else :func:`scan_watch_numpy` (the same
    values, the sign of a zero violation aside)."""
    dose, lo, hi, weight = (np.asarray(a, np.float64) for a in (dose, lo, hi, weight))
    blocked = np.asarray(blocked, np.bool_)
    if not _cpu.HAVE_NUMBA or _SCAN is None:  # (the one switch of the compiled host loops, read here: the
        # tests turn it off; None: imported with numba off, so nothing was compiled)
        return scan_watch_numpy(dose, lo, hi, weight, blocked)
    n = dose.shape[0]
    viol, wv2, score = np.empty(n), np.empty(n), np.empty(n)
    cold, hot = np.empty(n, np.int64), np.empty(n, np.int64)
    r, big, nc, nh = _SCAN(dose, lo, hi, weight, blocked, viol, wv2, score, cold, hot)
    return viol, wv2, score, int(r), bool(big), cold[:nc].copy(), hot[:nh].copy()


def pick_spread(order, coords, spacing_mm: float, limit: int) -> list[int]:
    """Greedy: walk ``order`` (int64 indices into ``coords``, (n, 3) float64 mm) and keep the
    indices at least ``spacing_mm`` from every kept one, at most ``limit``: the compiled twin
    of ``ids_engine.dmr._recovery._pick_spread`` (the same distances, summed in NumPy's
    order: the same indices). Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _SPREAD is None:
        raise RuntimeError("pick_spread needs numba (pip install ids-engine[fast])")
    order = np.asarray(order, np.int64)
    kept = np.empty(max(min(int(limit), order.shape[0]), 0), np.int64)
    nk = _SPREAD(order, np.ascontiguousarray(coords, np.float64), float(spacing_mm), int(limit), kept)
    return [int(i) for i in kept[:nk]]


def gather_composed(base, extra, source) -> np.ndarray:
    """(len(source),) float64: ``concatenate([base, extra])[source]`` (``base``, ``extra``
    float32 doses, ``source`` int64 indices into both) cast to float64, in one pass: the
    same values as NumPy's take and cast. Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _COMPOSED is None:
        raise RuntimeError("gather_composed needs numba (pip install ids-engine[fast])")
    out = np.empty(np.shape(source)[0], np.float64)
    _COMPOSED(base, extra, np.asarray(source, np.int64), out)
    return out


def ball_rows(offs) -> np.ndarray | None:
    """The offsets ``offs`` ((m, 3) int64 (z, y, x), a ball's) as rows along x: (r, 4) int64
    ``(z, y, x_first, x_last)``, one per (z, y) they hold; None when some row's x are not
    contiguous (then they are no ball's)."""
    offs = np.asarray(offs, np.int64).reshape(-1, 3)
    if not offs.size:
        return np.zeros((0, 4), np.int64)
    zy, inv = np.unique(offs[:, :2], axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    x_first = np.full(zy.shape[0], np.iinfo(np.int64).max)
    x_last = np.full(zy.shape[0], np.iinfo(np.int64).min)
    np.minimum.at(x_first, inv, offs[:, 2])
    np.maximum.at(x_last, inv, offs[:, 2])
    if np.sum(x_last - x_first + 1) != offs.shape[0] or np.unique(offs, axis=0).shape[0] != offs.shape[0]:
        return None
    return np.column_stack([zy, x_first, x_last]).astype(np.int64)


def ball_row_marks(index_zyx, cols, rows, shape_zyx, voxels, mark) -> tuple[int, int]:
    """Sets ``mark[i]`` for every watched voxel ``i`` (``voxels``: sorted flat CT indices,
    int64) in a row of ``rows`` (:func:`ball_rows` of a ball's offsets) around the grid
    position ``index_zyx[c]`` ((n, 3) int64) of a column ``c`` of ``cols``, inside the grid
    ``shape_zyx``: one search of the sorted watch per row instead of one per offset, the same
    voxels as looking each offset up (the NumPy path of ``_Rows.ball``). Returns the span
    ``(first, stop)`` of the positions it set (``first >= stop``: none), so that reading the
    marks back reads only it. Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _BALL_ROWS is None:
        raise RuntimeError("ball_row_marks needs numba (pip install ids-engine[fast])")
    nz, ny, nx = (int(n) for n in shape_zyx)
    first, stop = _BALL_ROWS(np.asarray(index_zyx, np.int64), np.asarray(cols, np.int64), np.asarray(rows, np.int64),
                             nz, ny, nx, np.asarray(voxels, np.int64), mark)
    return int(first), int(stop)



def scan_watch_numpy(dose, lo, hi, weight, blocked):
    """The NumPy twin of :func:`scan_watch` (the reference)."""
    viol = np.maximum(np.maximum(lo - dose, dose - hi), 0.0)
    score = np.where(blocked, 0.0, weight * viol)
    r = int(np.argmax(score)) if score.size else -1
    off = score > 0
    return (viol, weight * viol**2, score, r, bool(np.any(score > 1e-6)), np.flatnonzero(off & (dose < lo)),
            np.flatnonzero(off & (dose > hi)))


def capped_distance2_source(base_bev, extra_bev, source, capped, cols) -> tuple[np.ndarray, np.ndarray]:
    """``_cpu.capped_distance2`` of a watch composed of a base's voxels and a few extra ones,
    without the watch's own tables: watched voxel ``i``'s BEV ``(u, v, w)`` are the base's
    (``base_bev``: its ``(bev_u2, bev_v2, bev_w2)``, (beams, nb) float32) at ``source[i]``, or
    the extra voxels' (``extra_bev``, (beams, m)) at ``source[i] - nb``. The same ``(d2, w)``
    bit for bit (the same float32 operations in the same order). Needs numba
    (``_cpu.HAVE_NUMBA``)."""
    if _CAPPED_SOURCE is None:
        raise RuntimeError("capped_distance2_source needs numba (pip install ids-engine[fast])")
    capped = np.asarray(capped, np.int64)
    shape = (base_bev[0].shape[0], capped.shape[0])
    d2, w = np.empty(shape, np.float32), np.empty(shape, np.float32)
    _CAPPED_SOURCE(*base_bev, *extra_bev, np.asarray(source, np.int64), capped, np.asarray(cols, np.int64), d2, w)
    return d2, w


def capped_sens_bounds(tables, extra, sidx, col_u, col_v, s2: float, room):
    """Bounds of the capped ranking's keys of ``_Rows.select``, ``sens / room`` with ``sens``
    the largest over the beams of ``w exp(-d2 / s2)`` (float32, as NumPy computes it) at each
    voxel: ``(lower, upper)``, float64, with ``lower <= sens / room <= upper`` to a relative
    1e-5 (the float32 round-off of ``d2``, NumPy's float32
    ``exp`` and the bounds' own; measured within 5e-7), for weights below 1e15 and keys
    above 1e-20 (the caller's check: below, or with larger weights, float32's ``exp`` may be
    subnormal and the relative bounds fail), from
    ``exp(x) = (1 + x/8)^8 ... (1 - x/8)^-8`` for ``x <= 0`` relative to the voxel's largest
    exponent and one float32 ``exp`` per voxel instead of one per beam and voxel (measured
    within 4e-7 on the clinical horseshoe, and about 385 voxels of 20,000 left for an exact
    top 384). None when some ``w`` is not finite or not below 1e15 (the bounds need it).

    ``tables``: ``(bev_u2, bev_v2, bev_w2)``, (beams, nb) float32; ``extra``: the same for the
    voxels past them ((beams, m): a composed watch's extra voxels); ``sidx`` (n,) int64: each
    voxel's index into them (``source[capped]``, or ``capped`` itself); ``col_u``, ``col_v``
    (beams, ncols) float32: the columns' BEV positions (a column off a beam's grid, v not
    finite, is skipped there; a NaN u with a finite v leaves the beam out, as NumPy's
    distances do); ``s2`` the fall-off's ``2 sigma^2`` (fine cells^2); ``room`` (n,) float64,
    not NaN. The squared distances are ``_cpu.capped_distance2``'s. Needs numba
    (``_cpu.HAVE_NUMBA``)."""
    if _CAPPED_BOUNDS is None:
        raise RuntimeError("capped_sens_bounds needs numba (pip install ids-engine[fast])")
    sidx = np.asarray(sidx, np.int64)
    n = sidx.shape[0]
    q_max, lval, uval = (np.empty(n, np.float32) for _ in range(3))
    bad = _CAPPED_BOUNDS(*tables, *extra, sidx, np.asarray(col_u, np.float32), np.asarray(col_v, np.float32),
                         np.float32(s2), q_max, lval, uval)
    if bad:
        return None
    scale = np.exp(q_max) / room  # exp(-1e30): 0, no term
    return lval * scale, uval * scale


def capped_candidates(tables, extra, w_top, source, capped, col_u, col_v, s2: float, hi, dose, k: int):
    """The voxels of ``capped`` that can hold the ``k`` largest keys of the capped ranking
    (``sens / room``, :func:`capped_sens_bounds`, ``room = maximum(hi - dose, 0.02)`` at
    each): ``(at, kth)``, positions into ``capped`` (int64, ascending) and the ``k``-th
    largest lower bound; the voxels whose upper bound lies a relative 1e-3 below ``kth`` are
    left out (their key cannot reach the ``k``-th largest). The same ``kth`` and, the bounds'
    own 1e-5 aside, the same voxels as :func:`capped_sens_bounds` of every voxel, for bounds
    of fewer voxels: a voxel's key is at most its ceiling ``w_top / room`` (``w_top``: its
    largest ``w`` over the beams), and at most the ceiling times an upper bound of ``exp`` at
    the least squared distance over the beams to the box of the columns (no ``exp``: one
    vectorised pass over the voxels' ``u`` and ``v``). About the ``4 k`` highest ceilings (above a
    quantile of a strided sample) get their bounds first; the voxels whose ceiling or estimate lies a relative 1e-3 below the
    ``k``-th largest of their lower bounds get none; where more than ``8 k`` are left, the
    ``4 k`` highest estimates get theirs next, for a tighter cut (measured on the clinical
    horseshoe: a few thousand of 20,000 voxels bounded, at most; the first ``4 k`` alone in
    about half the steps). None when some room or ``w_top`` is NaN, or some bounded voxel's
    ``w`` is not finite or not below 1e15.

    ``tables``, ``extra``, ``col_u``, ``col_v``, ``s2`` as for :func:`capped_sens_bounds`;
    ``source`` (int64): each watched voxel's index into the tables (``[tables, extra]``), or
    None where the watch's voxels are the tables' own; ``capped`` (n,) int64 watch
    positions; ``hi``, ``dose`` float64 over the watch; ``w_top``: ``(top, extra_top)``,
    (nb,) and (m,) float32, each table voxel's largest ``w`` over the beams, NaN where some
    beam's ``w`` is NaN, infinite or not below 1e15 in magnitude (the caller's mark: the
    estimates read no ``w``); ``0 < k < n``. None also where ``s2`` is not positive and
    finite (the estimate bounds ``exp(-d2 / s2)`` only for such fall-offs). Needs numba
    (``_cpu.HAVE_NUMBA``)."""
    if _CAPPED_CANDIDATES is None:
        raise RuntimeError("capped_candidates needs numba (pip install ids-engine[fast])")
    if not 0.0 < float(np.float32(s2)) < np.inf:
        return None
    capped = np.asarray(capped, np.int64)
    composed = source is not None
    source = np.asarray(source, np.int64) if composed else np.zeros(0, np.int64)
    at = np.empty(capped.shape[0], np.int64)
    nc, kth = _CAPPED_CANDIDATES(*tables, *extra, *w_top, source, composed, capped, np.asarray(hi, np.float64),
                                 np.asarray(dose, np.float64), np.asarray(col_u, np.float32),
                                 np.asarray(col_v, np.float32), np.float32(s2), int(k), 4 * int(k), at)
    if nc < 0:
        return None
    return at[:nc].copy(), float(kth)
