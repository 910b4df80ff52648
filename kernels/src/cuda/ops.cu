// The element-wise and row kernels behind the candle custom ops on CUDA (`cuda_ops/`): the
// permutations of permute.rs and the packed SwiGLU of swiglu.rs. Row index arrays come from the
// host's routing plan (`RoutePlan`); every operand, the routing weights too, has the op's element
// type, and arithmetic is float32. Grid-stride loops over rows (one block per row at a time);
// the combine and the dot products sum in a fixed order, so results are deterministic.

#define BTM_OPS(T, SUF)                                                                          \
/* out[r] = x[rows[r] / k] * (scale ? scale[rows[r]] : 1), r < n */                            \
extern "C" __global__ void btm_gather_##SUF(const T* x, const T* scale, const u32* rows, u32 n,  \
                                            u32 top_k, u32 width, T* out) {                      \
    for (u32 r = blockIdx.x; r < n; r += gridDim.x) {                                            \
        u32 slot = rows[r];                                                                      \
        float w = scale ? load_f(scale, slot) : 1.f;                                             \
        size_t src = (size_t)(slot / top_k) * width, dst = (size_t)r * width;                    \
        for (u32 c = threadIdx.x; c < width; c += blockDim.x)                                    \
            store_f(out, dst + c, load_f(x, src + c) * w);                                       \
    }                                                                                            \
}                                                                                                \
/* out[t] = sum_j (w ? w[t*k+j] : 1) * p[slot_rows[t*k+j]] over kept j */                       \
extern "C" __global__ void btm_combine_##SUF(const T* p, const T* w, const u32* slot_rows,       \
                                             u32 tokens, u32 top_k, u32 width, T* out) {          \
    for (u32 t = blockIdx.x; t < tokens; t += gridDim.x) {                                       \
        for (u32 c = threadIdx.x; c < width; c += blockDim.x) {                                  \
            float acc = 0.f;                                                                     \
            for (u32 j = 0; j < top_k; ++j) {                                                    \
                u32 s = t * top_k + j, r = slot_rows[s];                                         \
                if (r != DROPPED)                                                                \
                    acc += (w ? load_f(w, s) : 1.f) * load_f(p, (size_t)r * width + c);          \
            }                                                                                    \
            store_f(out, (size_t)t * width + c, acc);                                            \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* out[s] = <p[slot_rows[s]], g[by_row ? slot_rows[s] : s / k]>, 0 when dropped */               \
extern "C" __global__ void btm_slot_dots_##SUF(const T* p, const T* g, const u32* slot_rows,     \
                                               u32 slots, u32 top_k, u32 width, u32 by_row,      \
                                               T* out) {                                         \
    __shared__ float scratch[32];                                                                \
    for (u32 s = blockIdx.x; s < slots; s += gridDim.x) {                                        \
        u32 r = slot_rows[s];                                                                    \
        float acc = 0.f;                                                                         \
        if (r != DROPPED) {                                                                      \
            size_t pr = (size_t)r * width;                                                       \
            size_t gr = (size_t)(by_row ? r : s / top_k) * width;                                \
            for (u32 c = threadIdx.x; c < width; c += blockDim.x)                                \
                acc += load_f(p, pr + c) * load_f(g, gr + c);                                    \
        }                                                                                        \
        float total = block_sum(acc, scratch);                                                   \
        if (threadIdx.x == 0) store_f(out, s, total);                                            \
    }                                                                                            \
}                                                                                                \
/* out[r] = h[r] * w[rows[r]], r < n */                                                          \
extern "C" __global__ void btm_scale_rows_##SUF(const T* h, const T* w, const u32* rows, u32 n,  \
                                                u32 width, T* out) {                             \
    for (u32 r = blockIdx.x; r < n; r += gridDim.x) {                                            \
        float s = load_f(w, rows[r]);                                                            \
        size_t base = (size_t)r * width;                                                         \
        for (u32 c = threadIdx.x; c < width; c += blockDim.x)                                    \
            store_f(out, base + c, load_f(h, base + c) * s);                                     \
    }                                                                                            \
}                                                                                                \
/* rows [a | b] of x [rows, 2f] -> silu(a) * b [rows, f]; n = rows * f */                        \
extern "C" __global__ void btm_swiglu_packed_fwd_##SUF(const T* x, size_t n, u32 f, T* out) {    \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;                        \
         i += (size_t)gridDim.x * blockDim.x) {                                                  \
        size_t row = i / f, col = i % f, a_at = row * 2 * f + col;                               \
        float a = load_f(x, a_at), s = 1.f / (1.f + __expf(-a));                                 \
        store_f(out, i, a * s * load_f(x, a_at + f));                                            \
    }                                                                                            \
}                                                                                                \
/* [da | db] rows [rows, 2f] from x [rows, 2f] and g [rows, f]; n = rows * f */                  \
extern "C" __global__ void btm_swiglu_packed_bwd_##SUF(const T* x, const T* g, size_t n, u32 f,  \
                                                       T* out) {                                 \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;                        \
         i += (size_t)gridDim.x * blockDim.x) {                                                  \
        size_t row = i / f, col = i % f, a_at = row * 2 * f + col;                               \
        float a = load_f(x, a_at), b = load_f(x, a_at + f), gi = load_f(g, i);                  \
        float s = 1.f / (1.f + __expf(-a));                                                      \
        store_f(out, a_at, gi * b * s * (1.f + a * (1.f - s)));                                  \
        store_f(out, a_at + f, gi * a * s);                                                      \
    }                                                                                            \
}

BTM_OPS(float, f32)
BTM_OPS(bf16_t, bf16)

// -infinity (NVRTC has no math.h for INFINITY).
#define NEG_INF __int_as_float(0xff800000)

// Warp-wide sum and max (all 32 lanes get the result).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide max (blockDim.x a multiple of 32); every thread gets the result.
__device__ __forceinline__ float block_max_all(float v, float* scratch32) {
    v = warp_max(v);
    if ((threadIdx.x & 31u) == 0) scratch32[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = NEG_INF;
    for (u32 w = 0; w < (blockDim.x >> 5); ++w) m = fmaxf(m, scratch32[w]);
    __syncthreads();
    return m;
}
// Block-wide sum in a fixed order; every thread gets the result.
__device__ __forceinline__ float block_sum_all(float v, float* scratch32) {
    v = warp_sum(v);
    if ((threadIdx.x & 31u) == 0) scratch32[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.f;
    for (u32 w = 0; w < (blockDim.x >> 5); ++w) s += scratch32[w];
    __syncthreads();
    return s;
}

#define BTM_ROW_OPS(T, SUF)                                                                      \
/* Causal softmax of attention scores: rows of s [rows, t] (row r is query r % t), scaled by     \
   `scale`, keys j <= i with i - j < window; masked entries are 0. One warp per row. */         \
extern "C" __global__ void btm_causal_softmax_##SUF(const T* s, u32 rows, u32 t, float scale,   \
                                                    u32 window, T* p) {                          \
    u32 warps = blockDim.x >> 5, lane = threadIdx.x & 31u;                                       \
    for (u32 r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {    \
        u32 i = r % t, lo = i + 1 > window ? i + 1 - window : 0;                                 \
        size_t base = (size_t)r * t;                                                             \
        float m = NEG_INF;                                                                     \
        for (u32 j = lo + lane; j <= i; j += 32) m = fmaxf(m, load_f(s, base + j) * scale);      \
        m = warp_max(m);                                                                         \
        float sum = 0.f;                                                                         \
        for (u32 j = lo + lane; j <= i; j += 32) sum += __expf(load_f(s, base + j) * scale - m); \
        float inv = 1.f / warp_sum(sum);                                                         \
        for (u32 j = lane; j < t; j += 32)                                                       \
            store_f(p, base + j, (j >= lo && j <= i) ? __expf(load_f(s, base + j) * scale - m) * inv : 0.f); \
    }                                                                                            \
}                                                                                                \
/* ds = scale * p * (dp - <p, dp>) per row. One warp per row. */                                 \
extern "C" __global__ void btm_causal_softmax_bwd_##SUF(const T* p, const T* dp, u32 rows, u32 t, \
                                                        float scale, T* ds) {                    \
    u32 warps = blockDim.x >> 5, lane = threadIdx.x & 31u;                                       \
    for (u32 r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {    \
        u32 i = r % t;                                                                           \
        size_t base = (size_t)r * t;                                                             \
        float dot = 0.f;                                                                         \
        for (u32 j = lane; j <= i; j += 32) dot += load_f(p, base + j) * load_f(dp, base + j);   \
        dot = warp_sum(dot);                                                                     \
        for (u32 j = lane; j < t; j += 32) {                                                     \
            float pj = j <= i ? load_f(p, base + j) : 0.f;                                       \
            store_f(ds, base + j, pj == 0.f ? 0.f : scale * pj * (load_f(dp, base + j) - dot));  \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* RMSNorm rows: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps). One warp per row. */             \
extern "C" __global__ void btm_rms_norm_##SUF(const T* x, const T* w, u32 rows, u32 h, float eps, \
                                              T* y) {                                            \
    u32 warps = blockDim.x >> 5, lane = threadIdx.x & 31u;                                       \
    for (u32 r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {    \
        size_t base = (size_t)r * h;                                                             \
        float sq = 0.f;                                                                          \
        for (u32 c = lane; c < h; c += 32) { float v = load_f(x, base + c); sq += v * v; }       \
        float inv = rsqrtf(warp_sum(sq) / h + eps);                                              \
        for (u32 c = lane; c < h; c += 32)                                                       \
            store_f(y, base + c, load_f(x, base + c) * inv * load_f(w, c));                      \
    }                                                                                            \
}                                                                                                \
/* RMSNorm backward rows: dx = r g w - x r^3 mean(g w x); gxr[r, c] = g x r (float32, summed    \
   over rows for dw by btm_column_sums). One warp per row. */                                   \
extern "C" __global__ void btm_rms_norm_bwd_##SUF(const T* x, const T* w, const T* g, u32 rows,  \
                                                  u32 h, float eps, T* dx, float* gxr) {         \
    u32 warps = blockDim.x >> 5, lane = threadIdx.x & 31u;                                       \
    for (u32 r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {    \
        size_t base = (size_t)r * h;                                                             \
        float sq = 0.f, ux = 0.f;                                                                \
        for (u32 c = lane; c < h; c += 32) {                                                     \
            float v = load_f(x, base + c);                                                       \
            sq += v * v;                                                                         \
            ux += load_f(g, base + c) * load_f(w, c) * v;                                        \
        }                                                                                        \
        float inv = rsqrtf(warp_sum(sq) / h + eps);                                              \
        float k = inv * inv * inv * warp_sum(ux) / h;                                            \
        for (u32 c = lane; c < h; c += 32) {                                                     \
            float v = load_f(x, base + c), gc = load_f(g, base + c);                             \
            store_f(dx, base + c, inv * gc * load_f(w, c) - v * k);                              \
            gxr[base + c] = gc * v * inv;                                                        \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* Next-token nll per row of logits [rows, v]: lse - logit[target]. One block per row. */        \
extern "C" __global__ void btm_nll_##SUF(const T* logits, const u32* targets, u32 rows, u32 v,   \
                                         float* nll) {                                           \
    __shared__ float scratch[32];                                                                \
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {                                         \
        size_t base = (size_t)r * v;                                                             \
        float m = NEG_INF;                                                                     \
        for (u32 j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, load_f(logits, base + j)); \
        m = block_max_all(m, scratch);                                                           \
        float sum = 0.f;                                                                         \
        for (u32 j = threadIdx.x; j < v; j += blockDim.x) sum += __expf(load_f(logits, base + j) - m); \
        sum = block_sum_all(sum, scratch);                                                       \
        if (threadIdx.x == 0) nll[r] = logf(sum) + m - load_f(logits, base + targets[r]);        \
    }                                                                                            \
}                                                                                                \
/* d logits = (softmax - onehot(target)) * g per row, lse = nll + logit[target]; grad_nll holds  \
   [g (rows); nll (rows)]. One block per row. */                                                 \
extern "C" __global__ void btm_nll_bwd_##SUF(const T* logits, const u32* targets,               \
                                             const float* grad_nll, u32 rows, u32 v, T* out) {  \
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {                                         \
        size_t base = (size_t)r * v;                                                             \
        u32 target = targets[r];                                                                 \
        float g = grad_nll[r], lse = grad_nll[rows + r] + load_f(logits, base + target);         \
        for (u32 j = threadIdx.x; j < v; j += blockDim.x)                                        \
            store_f(out, base + j, __expf(load_f(logits, base + j) - lse) * g - (j == target ? g : 0.f)); \
    }                                                                                            \
}

BTM_ROW_OPS(float, f32)
BTM_ROW_OPS(bf16_t, bf16)

// Column sums of x [rows, cols] (float32) in two deterministic stages: partial[b, c] sums rows
// b*chunk .. (b+1)*chunk in order; then out[c] sums the partials in order (as T).
extern "C" __global__ void btm_column_partials(const float* x, u32 rows, u32 cols, u32 chunk,
                                               float* partial) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (c >= cols) return;
    u32 end = (b + 1) * chunk < rows ? (b + 1) * chunk : rows;
    float acc = 0.f;
    for (u32 r = b * chunk; r < end; ++r) acc += x[(size_t)r * cols + c];
    partial[(size_t)b * cols + c] = acc;
}
#define BTM_COLUMN_TOTALS(T, SUF)                                                                \
extern "C" __global__ void btm_column_totals_##SUF(const float* partial, u32 parts, u32 cols,    \
                                                   T* out) {                                     \
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;                                               \
    if (c >= cols) return;                                                                       \
    float acc = 0.f;                                                                             \
    for (u32 b = 0; b < parts; ++b) acc += partial[(size_t)b * cols + c];                        \
    store_f(out, c, acc);                                                                        \
}
BTM_COLUMN_TOTALS(float, f32)
BTM_COLUMN_TOTALS(bf16_t, bf16)

// AdamW (Loshchilov & Hutter 2019) in place on float32 master weights and moments, as the CPU
// optimizer does it: m <- beta*m + rest*(s*g), or with (s*g)^2 for the second moment; then
// w <- w*keep - lr * (m*inv_bc1) / (sqrt(v*inv_bc2) + eps). Grid-stride over n elements.
extern "C" __global__ void btm_adamw_moment(float* m, const float* g, size_t n, float beta, float rest,
                                            float scale, u32 square) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * scale;
        m[i] = m[i] * beta + (square ? gi * gi : gi) * rest;
    }
}
extern "C" __global__ void btm_adamw_update(float* w, const float* m, const float* v, size_t n, float inv_bc1,
                                            float inv_bc2, float lr, float eps, float keep) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float update = (m[i] * inv_bc1) / (sqrtf(v[i] * inv_bc2) + eps);
        w[i] = w[i] * keep - update * lr;
    }
}
