// Routing plan on the device: a stable counting sort of the T*k slots by expert, so that the
// group sizes and offsets never leave the GPU. Slot s = t*k + j holds expert experts[s].
// `capacity` = 0 means dropless; otherwise each expert keeps its first `capacity` slots in token
// order (the `position` drop policy). Launch each with one block per expert, blockDim.x a
// multiple of 32 (at most 1024); moe_route_offsets with a single thread.

// counts[e] = number of kept slots of expert e.
extern "C" __global__ void moe_route_counts(const u32* experts, u32 slots, u32 capacity, u32* counts) {
    __shared__ float scratch[32];
    u32 e = blockIdx.x;
    float c = 0.f;  // exact for counts below 2^24
    for (u32 s = threadIdx.x; s < slots; s += blockDim.x) c += experts[s] == e ? 1.f : 0.f;
    float total = block_sum(c, scratch);
    if (threadIdx.x == 0) {
        u32 n = (u32)total;
        counts[e] = (capacity > 0 && n > capacity) ? capacity : n;
    }
}

// offsets[0] = 0, offsets[e+1] = offsets[e] + counts[e].
extern "C" __global__ void moe_route_offsets(const u32* counts, u32 experts, u32* offsets) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        u32 acc = 0;
        offsets[0] = 0;
        for (u32 e = 0; e < experts; ++e) {
            acc += counts[e];
            offsets[e + 1] = acc;
        }
    }
}

// Block e walks the slots in order; its r-th slot goes to row offsets[e] + r (or is dropped).
// rows[row] = slot, slot_rows[slot] = row or DROPPED. Every slot is written by exactly one block.
extern "C" __global__ void moe_route_scatter(const u32* experts, u32 slots, u32 capacity,
                                             const u32* offsets, u32* rows, u32* slot_rows) {
    __shared__ u32 warp_hits[32];
    __shared__ u32 base;
    u32 e = blockIdx.x, lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 start = offsets[e];
    if (threadIdx.x == 0) base = 0;
    __syncthreads();
    for (u32 chunk = 0; chunk < slots; chunk += blockDim.x) {
        u32 s = chunk + threadIdx.x;
        bool hit = s < slots && experts[s] == e;
        u32 mask = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) warp_hits[warp] = __popc(mask);
        __syncthreads();
        u32 rank = base + __popc(mask & ((1u << lane) - 1u));
        for (u32 w = 0; w < warp; ++w) rank += warp_hits[w];
        if (hit) {
            if (capacity == 0 || rank < capacity) {
                rows[start + rank] = s;
                slot_rows[s] = start + rank;
            } else {
                slot_rows[s] = DROPPED;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (u32 w = 0; w < warps; ++w) base += warp_hits[w];
        }
        __syncthreads();
    }
}
