// Token permute / unpermute (see permute.rs for the formulas). Grid-stride loops over rows, so
// a fixed grid works for any kept count: the number of permuted rows N = offsets[E] is read on
// the device (no device-to-host copy). Routing weights and their gradients are float32.
// Unpermute gathers per token in the fixed order j = 0..k-1 (no atomics): deterministic.

#define MOE_PERMUTE_KERNELS(T, SUF)                                                              \
/* out[r] = x[rows[r] / k] (scale == nullptr) or x[rows[r] / k] * scale[rows[r]] */             \
extern "C" __global__ void moe_permute_##SUF(const T* x, const float* scale, const u32* rows,   \
                                             const u32* offsets, u32 experts, u32 top_k,        \
                                             u32 hidden, T* out) {                               \
    u32 n = offsets[experts];                                                                    \
    for (u32 r = blockIdx.x; r < n; r += gridDim.x) {                                            \
        u32 slot = rows[r];                                                                      \
        float w = scale ? scale[slot] : 1.f;                                                     \
        size_t src = (size_t)(slot / top_k) * hidden, dst = (size_t)r * hidden;                  \
        for (u32 c = threadIdx.x; c < hidden; c += blockDim.x)                                   \
            store_f(out, dst + c, load_f(x, src + c) * w);                                       \
    }                                                                                            \
}                                                                                                \
/* out[t] = sum_j w[t,j] * p[slot_rows[t*k+j]] over kept j (weights == nullptr: w = 1) */       \
extern "C" __global__ void moe_unpermute_##SUF(const T* p, const float* weights,                \
                                               const u32* slot_rows, u32 tokens, u32 top_k,      \
                                               u32 hidden, T* out) {                             \
    for (u32 t = blockIdx.x; t < tokens; t += gridDim.x) {                                       \
        for (u32 c = threadIdx.x; c < hidden; c += blockDim.x) {                                 \
            float acc = 0.f;                                                                     \
            for (u32 j = 0; j < top_k; ++j) {                                                    \
                u32 s = t * top_k + j, r = slot_rows[s];                                         \
                if (r != DROPPED)                                                                \
                    acc += (weights ? weights[s] : 1.f) * load_f(p, (size_t)r * hidden + c);     \
            }                                                                                    \
            store_f(out, (size_t)t * hidden + c, acc);                                           \
        }                                                                                        \
    }                                                                                            \
}                                                                                                \
/* dw[s] = <p[slot_rows[s]], g[s / k]>, 0 for dropped slots; one block per slot */              \
extern "C" __global__ void moe_slot_dots_##SUF(const T* p, const T* g, const u32* slot_rows,    \
                                               u32 slots, u32 top_k, u32 hidden, float* dw) {    \
    __shared__ float scratch[32];                                                                \
    for (u32 s = blockIdx.x; s < slots; s += gridDim.x) {                                        \
        u32 r = slot_rows[s];                                                                    \
        float acc = 0.f;                                                                         \
        if (r != DROPPED) {                                                                      \
            size_t pr = (size_t)r * hidden, gr = (size_t)(s / top_k) * hidden;                   \
            for (u32 c = threadIdx.x; c < hidden; c += blockDim.x)                               \
                acc += load_f(p, pr + c) * load_f(g, gr + c);                                    \
        }                                                                                        \
        float total = block_sum(acc, scratch);                                                   \
        if (threadIdx.x == 0) dw[s] = total;                                                     \
    }                                                                                            \
}

MOE_PERMUTE_KERNELS(float, f32)
MOE_PERMUTE_KERNELS(bf16_t, bf16)
