// accumulate_segments: for every segment s, every position i in [seg_start[s], seg_start[s] + len_s)
// of the level arrays (len_s = seg_first[s + 1] - seg_first[s]) and p = seg_patch[s]:
//     dose[vox[i]] += sum_c weights[c, i] * bilerp(maps[p, c], v[i] - o_r, u[i] - o_c)
// where a bilinear corner outside the window's valid box [r_lo, r_hi) x [c_lo, c_hi) counts as zero.
//
// Thread mapping : one thread per voxel of all segments, t < n_threads = seg_first[S]; a thread
//                  finds its segment by binary search over the prefix sums seg_first (S + 1
//                  entries, seg_first[0] = 0), so empty segments are skipped for free.
// Memory layout  : level arrays vox, u, v (n_level,) and weights (nc, n_level) row-major;
//                  maps (P, nc, mh, mw) row-major; patch_box (P, 6) int32 per window
//                  (o_r, o_c, r_lo, r_hi, c_lo, c_hi) on the level grid, the valid box inside
//                  the window (o_r <= r_lo <= r_hi <= o_r + mh, likewise for columns).
//                  Offsets into maps and weights in size_t (P * nc * mh * mw may pass 2^31).
// Precision      : float32 throughout; atomicAdd, so a voxel touched by several windows (or
//                  repeated within one) adds up, in no fixed order.
// Zero outside   : corners outside the valid box are skipped; positions far outside the
//                  window are clamped to just outside it first (no int overflow), as the
//                  twin clamps into its zero border.
// NumPy twin     : ids_engine.kernels.pencil.accumulate_segments_numpy
extern "C" __global__ void accumulate_segments(
    float* __restrict__ dose,
    const int* __restrict__ vox,
    const float* __restrict__ u,
    const float* __restrict__ v,
    const float* __restrict__ weights,
    const float* __restrict__ maps,
    const int* __restrict__ seg_first,
    const int* __restrict__ seg_start,
    const int* __restrict__ seg_patch,
    const int* __restrict__ patch_box,
    const int n_threads, const int n_segments, const int n_level,
    const int nc, const int mh, const int mw)
{
    const long long tt = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tt >= n_threads) return;
    const int t = (int)tt;

    // Largest s with seg_first[s] <= t: invariant seg_first[lo] <= t < seg_first[hi].
    int lo = 0, hi = n_segments;
    while (hi - lo > 1) {
        const int mid = lo + ((hi - lo) >> 1);
        if (seg_first[mid] <= t) lo = mid; else hi = mid;
    }
    const int i = seg_start[lo] + (t - seg_first[lo]);
    const int p = seg_patch[lo];
    const int* box = patch_box + (size_t)6 * p;
    const int o_r = box[0], o_c = box[1];
    // Valid box relative to the window origin.
    const int r_lo = box[2] - o_r, r_hi = box[3] - o_r;
    const int c_lo = box[4] - o_c, c_hi = box[5] - o_c;

    const float fv = fminf(fmaxf(v[i] - (float)o_r, -2.0f), (float)mh + 1.0f);
    const float fu = fminf(fmaxf(u[i] - (float)o_c, -2.0f), (float)mw + 1.0f);
    const float r0f = floorf(fv);
    const float c0f = floorf(fu);
    const float tv = fv - r0f;
    const float tu = fu - c0f;
    const int r0 = (int)r0f;
    const int c0 = (int)c0f;

    // Corner weights and offsets do not depend on the component.
    float wk[4];
    size_t off[4];
    bool ok[4];
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int dr = k >> 1;
        const int dc = k & 1;
        const int r = r0 + dr;
        const int cc = c0 + dc;
        ok[k] = r >= r_lo && r < r_hi && cc >= c_lo && cc < c_hi;
        wk[k] = (dr ? tv : 1.0f - tv) * (dc ? tu : 1.0f - tu);
        off[k] = ok[k] ? (size_t)r * mw + cc : 0;
    }

    const size_t plane = (size_t)mh * mw;
    const float* mp = maps + (size_t)p * nc * plane;
    float acc = 0.0f;
    for (int c = 0; c < nc; ++c) {
        const float* m = mp + (size_t)c * plane;
        float s = 0.0f;
        #pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (ok[k]) s += wk[k] * m[off[k]];
        }
        acc += weights[(size_t)c * n_level + i] * s;
    }
    atomicAdd(dose + vox[i], acc);
}
