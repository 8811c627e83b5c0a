// add_windows: add convolved change windows into the flat maps buffer of a level, each inside
// its valid box:
//     maps[base_p + (c * mh_p + r) * mw_p + col] += windows[p, c, r - o_r, col - o_c]
// for every window p, component c < nc, map row r in [r_lo, r_hi) and column col in
// [c_lo, c_hi) (the part of the window that lies on beam p's map); the rest of the window
// (its FFT padding, or what falls off the map) is not written.
//
// Thread mapping : one thread per element of windows, t < n_windows * nc * fh * fw; a thread
//                  whose element lies outside its window's valid box returns.
// Memory layout  : windows (n_windows, nc, fh, fw) float32 row-major; patch_box (n_windows, 6)
//                  int32 per window (o_r, o_c, r_lo, r_hi, c_lo, c_hi) on the level grid,
//                  with o_r <= r_lo <= r_hi <= o_r + fh (likewise for columns); map_info
//                  (n_windows, 3) int32 per window (base: the beam's offset in maps, mh, mw:
//                  its map's shape), so a map is nc * mh * mw floats from base.
//                  Element counts and offsets in size_t (the maps buffer may pass 2^31).
// Precision      : float32; atomicAdd, so windows of one beam that overlap add up (the engine
//                  gives one window per beam and level, so every map cell gets one add and
//                  the result equals the twin's bit for bit).
// NumPy twin     : ids_engine.kernels.windows.add_windows_numpy
extern "C" __global__ void add_windows(
    float* __restrict__ maps,
    const float* __restrict__ windows,
    const int* __restrict__ patch_box,
    const int* __restrict__ map_info,
    const int n_windows, const int nc, const int fh, const int fw)
{
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t plane = (size_t)fh * fw;
    if (t >= (size_t)n_windows * nc * plane) return;
    const int p = (int)(t / ((size_t)nc * plane));
    const size_t rest = t - (size_t)p * nc * plane;
    const int c = (int)(rest / plane);
    const int i = (int)((rest - (size_t)c * plane) / fw);
    const int j = (int)(rest - (size_t)c * plane - (size_t)i * fw);
    const int* box = patch_box + (size_t)6 * p;
    const int r = box[0] + i;
    const int col = box[1] + j;
    if (r < box[2] || r >= box[3] || col < box[4] || col >= box[5]) return;
    const int* info = map_info + (size_t)3 * p;
    const size_t mh = (size_t)info[1], mw = (size_t)info[2];
    atomicAdd(maps + (size_t)info[0] + ((size_t)c * mh + (size_t)r) * mw + (size_t)col, windows[t]);
}
