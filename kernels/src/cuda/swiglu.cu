// Fused SwiGLU: h = silu(a) * b; backward da = g * b * s * (1 + a * (1 - s)), db = g * silu(a),
// with s = sigmoid(a). Grid-stride over the n elements.

#define MOE_SWIGLU_KERNELS(T, SUF)                                                               \
extern "C" __global__ void moe_swiglu_fwd_##SUF(const T* a, const T* b, size_t n, T* h) {        \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;                        \
         i += (size_t)gridDim.x * blockDim.x) {                                                  \
        float x = load_f(a, i), s = 1.f / (1.f + __expf(-x));                                   \
        store_f(h, i, x * s * load_f(b, i));                                                     \
    }                                                                                            \
}                                                                                                \
extern "C" __global__ void moe_swiglu_bwd_##SUF(const T* a, const T* b, const T* g, size_t n,    \
                                                T* da, T* db) {                                  \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;                        \
         i += (size_t)gridDim.x * blockDim.x) {                                                  \
        float x = load_f(a, i), y = load_f(b, i), gi = load_f(g, i);                             \
        float s = 1.f / (1.f + __expf(-x));                                                      \
        store_f(db, i, gi * x * s);                                                              \
        store_f(da, i, gi * y * s * (1.f + x * (1.f - s)));                                      \
    }                                                                                            \
}

MOE_SWIGLU_KERNELS(float, f32)
MOE_SWIGLU_KERNELS(bf16_t, bf16)
