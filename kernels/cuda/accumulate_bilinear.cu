// accumulate_bilinear: dose[vox[n]] += sum_c weights[c, n] * bilerp(maps[c], v[n] - v0, u[n] - u0)
//
// Thread mapping : one thread per voxel n (grid-stride not needed: 1D grid covers n).
// Memory layout  : weights (nc, n) row-major; maps (nc, h, w) row-major; all float32, vox int32.
// Precision      : float32 throughout; atomicAdd, so duplicate voxel indices are allowed.
// Zero outside   : map samples outside [0, h) x [0, w) count as zero (same as the twin).
// NumPy twin     : ids_engine.kernels.pencil.accumulate_bilinear_numpy
extern "C" __global__ void accumulate_bilinear(
    float* __restrict__ dose,
    const int* __restrict__ vox,
    const float* __restrict__ u,
    const float* __restrict__ v,
    const float* __restrict__ weights,
    const float* __restrict__ maps,
    const int n, const int nc, const int h, const int w,
    const float v0, const float u0)
{
    const int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i >= n) return;
    const float fv = v[i] - v0;
    const float fu = u[i] - u0;
    const float r0f = floorf(fv);
    const float c0f = floorf(fu);
    const float tv = fv - r0f;
    const float tu = fu - c0f;
    const int r0 = (int)r0f;
    const int c0 = (int)c0f;
    float acc = 0.0f;
    for (int c = 0; c < nc; ++c) {
        const float* m = maps + (size_t)c * h * w;
        float s = 0.0f;
        #pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int dr = k >> 1;
            const int dc = k & 1;
            const int r = r0 + dr;
            const int cc = c0 + dc;
            if (r >= 0 && r < h && cc >= 0 && cc < w) {
                const float wr = dr ? tv : 1.0f - tv;
                const float wc = dc ? tu : 1.0f - tu;
                s += wr * wc * m[r * w + cc];
            }
        }
        acc += weights[(size_t)c * n + i] * s;
    }
    atomicAdd(dose + vox[i], acc);
}
