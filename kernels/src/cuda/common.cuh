// Shared prelude of the btm MoE kernels (prepended to each .cu source; NVRTC needs no headers).
// Element types: float and bfloat16 (stored as its 16 raw bits); arithmetic is always float32.
typedef unsigned int u32;
typedef unsigned short bf16_t;
#define DROPPED 0xffffffffu

__device__ __forceinline__ float load_f(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16_t* p, size_t i) {
    return __uint_as_float(((u32)p[i]) << 16);
}
__device__ __forceinline__ void store_f(float* p, size_t i, float v) { p[i] = v; }
// float32 -> bfloat16, round to nearest even; NaN stays NaN.
__device__ __forceinline__ void store_f(bf16_t* p, size_t i, float v) {
    u32 u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* scratch32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31u) == 0) scratch32[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.x == 0) {
        for (u32 w = 0; w < (blockDim.x >> 5); ++w) total += scratch32[w];
    }
    __syncthreads();
    return total;
}
