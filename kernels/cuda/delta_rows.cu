// delta_rows: the dose change that stacks of fluence patches would cause at CT voxels ("rows"),
// on one dose level, without convolving whole maps: for every plane (s, p) of the launch
// (patch p of slot s, a slot being one beam's stack) and every row i,
//     out[s, colmap[col_off_s + p], i] = sum_j nb_weight[j, i] * L(nb_index[j, i])
// (j ascending from the j = 0 term; n_nb == 0: L(i), the row being level voxel i), with, at
// level voxel q, L(q) = 0 where ok[s, q] is 0, else
//     L(q) = sum_c w[s, c, q] * bilerp(M_c, v[s, q], u[s, q])
// where M_c is the plane convolved with the slot's lateral kernel c on the level's fluence
// grid,  M_c(R, C) = sum_{r, c'} stack[s, p, r, c'] * K_c[R - r0 + hk - r, C - c0 + hk - c'],
// (r0, c0) being the level cell of the stack's [0, 0] and hk = (kw - 1) / 2 (taps outside the
// kernel are 0), and bilerp the bilinear sample at fractional cell (v, u): with R0 = floor(v),
// tv = v - R0 (likewise C0, tu), M(R0, C0)(1-tv)(1-tu) + M(R0, C0+1)(1-tv)tu + M(R0+1, C0)tv(1-tu)
// + M(R0+1, C0+1)tv tu. A non-finite v or u, or one whose four corners all lie off the full
// convolution, gives 0. The entries of columns a slot has no plane for are not written.
//
// Thread mapping : one thread per (plane, row), t < n_planes * n: plane e = t / n, row
//                  i = t % n (consecutive threads read consecutive rows' tables). Each map
//                  value is a direct sum over the stack cells that meet the kernel's support
//                  at that cell (at most min(h * w, kh * kw) terms): no shared memory, no
//                  atomics, every output element written by exactly one thread.
// Memory layout  : out (S, K, n) float32 row-major; stacks: slot s's (m_s, h, w) float32
//                  row-major from data_off; slots (S, 10) int32 per slot (data_off, m_s, h, w,
//                  r0, c0, ker_off, kh, kw, col_off); planes (P, 2) int32 (slot, plane);
//                  colmap: plane p of slot s goes to column colmap[col_off + p]; kernels: slot
//                  s's (nc, kh, kw) float32 row-major from ker_off (square, kh == kw odd);
//                  v_tab, u_tab, ok_tab (S, m) and w_tab (S, nc, m) per slot and level voxel;
//                  nb_index, nb_weight (n_nb, n) per CT row (ignored when n_nb == 0).
//                  Offsets into the tables and out in size_t (S * K * n may pass 2^31).
// Precision      : float32 throughout (each map value a float32 sum over stack rows, then
//                  columns, in ascending order; the component and neighbour sums in order).
//                  The host path convolves by FFT, so the two agree to float32 round-off
//                  relative to the largest map value, not bit for bit.
// NumPy twin     : ids_engine.kernels.deltas.delta_rows_numpy (the host path's FFT read-out)

// The full convolution of one plane (h, w) with one kernel (kh, kw) at full-grid cell (R, C):
// rows r with 0 <= R - r < kh, columns c with 0 <= C - c < kw (empty off the full grid).
static __device__ __forceinline__ float full_conv_at(
    const float* __restrict__ plane, const int h, const int w,
    const float* __restrict__ ker, const int kh, const int kw, const int R, const int C)
{
    const int r_lo = max(0, R - kh + 1), r_hi = min(h - 1, R);
    const int c_lo = max(0, C - kw + 1), c_hi = min(w - 1, C);
    float acc = 0.0f;
    for (int r = r_lo; r <= r_hi; ++r) {
        const float* row = plane + (size_t)r * w;
        const float* krow = ker + (size_t)(R - r) * kw;
        for (int c = c_lo; c <= c_hi; ++c) acc += row[c] * krow[C - c];
    }
    return acc;
}

extern "C" __global__ void delta_rows(
    float* __restrict__ out,
    const float* __restrict__ stacks,
    const int* __restrict__ slots,
    const int* __restrict__ planes,
    const int* __restrict__ colmap,
    const float* __restrict__ kernels,
    const float* __restrict__ v_tab,
    const float* __restrict__ u_tab,
    const float* __restrict__ w_tab,
    const int* __restrict__ ok_tab,
    const int* __restrict__ nb_index,
    const float* __restrict__ nb_weight,
    const int n_planes, const int n, const int m, const int K, const int nc, const int n_nb)
{
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)n_planes * n) return;
    const int e = (int)(t / n);
    const int i = (int)(t - (size_t)e * n);
    const int s = planes[2 * (size_t)e];
    const int p = planes[2 * (size_t)e + 1];
    const int* slot = slots + (size_t)10 * s;
    const int h = slot[2], w = slot[3];
    const int kh = slot[7], kw = slot[8];
    const int hk = (kw - 1) / 2;
    // The full convolution's cell (0, 0) is level cell (r0 - hk, c0 - hk); it has
    // (h + kh - 1) x (w + kw - 1) cells.
    const int o_r = slot[4] - hk, o_c = slot[5] - hk;
    const int full_h = h + kh - 1, full_w = w + kw - 1;
    const float* plane = stacks + (size_t)slot[0] + (size_t)p * h * w;
    const float* ker = kernels + (size_t)slot[6];
    const size_t kplane = (size_t)kh * kw;
    const size_t tab = (size_t)s * m;

    const int n_terms = n_nb > 0 ? n_nb : 1;
    float acc = 0.0f;
    for (int j = 0; j < n_terms; ++j) {
        const int q = n_nb > 0 ? nb_index[(size_t)j * n + i] : i;
        float level = 0.0f;
        const float v = v_tab[tab + q], u = u_tab[tab + q];
        // Some corner row R0 or R0 + 1 on the full grid: o_r - 1 <= v < o_r + full_h (false for
        // NaN; infinities and far values return before the conversion to int).
        if (ok_tab[tab + q] != 0 && v >= (float)(o_r - 1) && v < (float)(o_r + full_h)
            && u >= (float)(o_c - 1) && u < (float)(o_c + full_w)) {
            const float vf = floorf(v), uf = floorf(u);
            const float tv = v - vf, tu = u - uf;
            const int R0 = (int)vf - o_r, C0 = (int)uf - o_c;
            const float w00 = (1.0f - tv) * (1.0f - tu), w01 = (1.0f - tv) * tu;
            const float w10 = tv * (1.0f - tu), w11 = tv * tu;
            for (int c = 0; c < nc; ++c) {
                const float* kc = ker + (size_t)c * kplane;
                const float b = full_conv_at(plane, h, w, kc, kh, kw, R0, C0) * w00
                              + full_conv_at(plane, h, w, kc, kh, kw, R0, C0 + 1) * w01
                              + full_conv_at(plane, h, w, kc, kh, kw, R0 + 1, C0) * w10
                              + full_conv_at(plane, h, w, kc, kh, kw, R0 + 1, C0 + 1) * w11;
                level += b * w_tab[((size_t)s * nc + c) * m + q];
            }
        }
        const float term = n_nb > 0 ? level * nb_weight[(size_t)j * n + i] : level;
        acc = j == 0 ? term : acc + term;
    }
    out[((size_t)s * K + colmap[(size_t)slot[9] + p]) * n + i] = acc;
}
