// Block-wide sum for the CUDA kernels (device only; include from .cu files).
//
// Each warp folds its 32 lanes with shuffles (lane 0 ends with the warp's sum), warp sums go
// through `shared` (>= 32 slots of T), and warp 0 folds those. Every thread returns the block
// total. The order is fixed by blockDim alone, so the result is deterministic run to run.
// blockDim.x must be a multiple of 32. The first __syncthreads protects `shared` from a
// previous call whose result some thread may still be reading.
#pragma once

namespace pydistill {

template <typename T>
__device__ T block_sum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

}  // namespace pydistill
