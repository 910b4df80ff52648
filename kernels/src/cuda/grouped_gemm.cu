// Grouped GEMM over ragged expert groups (see grouped_gemm.rs for the formulas), with the group
// offsets read from device memory: the grid is sized by upper bounds known on the host
// (ceil(N_max / 64) + E row tiles), and each block finds its (expert, row tile) by walking the
// offsets; surplus blocks exit. 64x64 output tiles, depth steps of 16, 256 threads with 4x4
// float32 accumulators each (a portable SIMT kernel; no tensor cores yet).

#define TILE 64u
#define DEPTH 16u

// Tile number `tile` in the order (expert, row tile): its expert and first/last rows.
__device__ __forceinline__ bool find_row_tile(const u32* offsets, u32 experts, u32 tile, u32* group,
                                              u32* row0, u32* row_end) {
    u32 seen = 0;
    for (u32 e = 0; e < experts; ++e) {
        u32 n = offsets[e + 1] - offsets[e], tiles = (n + TILE - 1) / TILE;
        if (tile < seen + tiles) {
            *group = e;
            *row0 = offsets[e] + (tile - seen) * TILE;
            *row_end = offsets[e + 1];
            return true;
        }
        seen += tiles;
    }
    return false;
}

// C[m x n] = A[m x depth] * B[depth x n] for m, n <= 64, with element strides:
// A(i, p) = A[i * a_rs + p * a_cs], B(p, j) = B[p * b_rs + j * b_cs], C(i, j) = C[i * ldc + j].
template <typename T>
__device__ void gemm_tile(const T* A, long long a_rs, long long a_cs, const T* B, long long b_rs,
                          long long b_cs, u32 m, u32 n, u32 depth, T* C, long long ldc) {
    __shared__ float As[DEPTH][TILE + 1];
    __shared__ float Bs[DEPTH][TILE + 1];
    u32 tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (u32 p0 = 0; p0 < depth; p0 += DEPTH) {
        for (u32 i = tid; i < TILE * DEPTH; i += blockDim.x) {
            u32 r = i / DEPTH, p = i % DEPTH;
            As[p][r] = (r < m && p0 + p < depth) ? load_f(A, r * a_rs + (p0 + p) * a_cs) : 0.f;
            u32 q = i / TILE, c = i % TILE;
            Bs[q][c] = (c < n && p0 + q < depth) ? load_f(B, (p0 + q) * b_rs + c * b_cs) : 0.f;
        }
        __syncthreads();
        for (u32 p = 0; p < DEPTH; ++p) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = As[p][ty * 4 + i];
            for (int j = 0; j < 4; ++j) b[j] = Bs[p][tx * 4 + j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            u32 r = ty * 4 + i, c = tx * 4 + j;
            if (r < m && c < n) store_f(C, r * ldc + c, acc[i][j]);
        }
}

// Launch with 256 threads. fwd/dx: grid (ceil(cols / 64), ceil(N_max / 64) + E);
// dw: grid (ceil(K / 64), ceil(M / 64), E).
#define MOE_GEMM_KERNELS(T, SUF)                                                                 \
/* Y[N, M] = X_e * W_e^T, W [E, M, K] */                                                         \
extern "C" __global__ void moe_gemm_fwd_##SUF(const T* x, const T* w, const u32* offsets,      \
                                              u32 experts, u32 m_out, u32 k_in, T* y) {          \
    u32 g, r0, r_end, c0 = blockIdx.x * TILE;                                                    \
    if (c0 >= m_out || !find_row_tile(offsets, experts, blockIdx.y, &g, &r0, &r_end)) return;    \
    gemm_tile<T>(x + (size_t)r0 * k_in, k_in, 1, w + ((size_t)g * m_out + c0) * k_in, 1, k_in,  \
                 min(TILE, r_end - r0), min(TILE, m_out - c0), k_in,                             \
                 y + (size_t)r0 * m_out + c0, m_out);                                            \
}                                                                                                \
/* dX[N, K] = dY_e * W_e */                                                                      \
extern "C" __global__ void moe_gemm_dx_##SUF(const T* dy, const T* w, const u32* offsets,      \
                                             u32 experts, u32 m_out, u32 k_in, T* dx) {          \
    u32 g, r0, r_end, c0 = blockIdx.x * TILE;                                                    \
    if (c0 >= k_in || !find_row_tile(offsets, experts, blockIdx.y, &g, &r0, &r_end)) return;     \
    gemm_tile<T>(dy + (size_t)r0 * m_out, m_out, 1, w + (size_t)g * m_out * k_in + c0, k_in, 1,  \
                 min(TILE, r_end - r0), min(TILE, k_in - c0), m_out,                             \
                 dx + (size_t)r0 * k_in + c0, k_in);                                             \
}                                                                                                \
/* dW[E, M, K] = dY_e^T * X_e (zero for an empty group) */                                       \
extern "C" __global__ void moe_gemm_dw_##SUF(const T* dy, const T* x, const u32* offsets,      \
                                             u32 m_out, u32 k_in, T* dw) {                       \
    u32 g = blockIdx.z, i0 = blockIdx.y * TILE, c0 = blockIdx.x * TILE;                          \
    u32 start = offsets[g], rows = offsets[g + 1] - start;                                       \
    gemm_tile<T>(dy + (size_t)start * m_out + i0, 1, m_out, x + (size_t)start * k_in + c0, k_in, \
                 1, min(TILE, m_out - i0), min(TILE, k_in - c0), rows,                           \
                 dw + ((size_t)g * m_out + i0) * k_in + c0, k_in);                               \
}

MOE_GEMM_KERNELS(float, f32)
MOE_GEMM_KERNELS(bf16_t, bf16)
