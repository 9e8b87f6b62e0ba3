// CUDA kernels of bn_moments_forward / bn_moments_backward: TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m).
//
// Same math and semantics as the CPU kernels (csrc/cpu/bn_moments_kernel.cpp): a group g is a
// channel (M = N * S elements) or a (sample, channel) pair (M = S elements);
//   mean_g = (1/M) sum x,  var_g = (1/M') sum (x - mean_g)^2,  M' = M or M - 1,
// accumulated in the compute dtype (double for float64, float otherwise) on the shifted values
// x - K_g (K_g = the group's first element, added back to the mean at the end) with Welford's
// update per element and Chan's merge of partial states:
//   add v:   n += 1; d = v - mu; mu += d / n; m2 += d (v - mu)
//   merge b: n = na + nb; d = mub - mua; mu = mua + d nb / n; m2 = m2a + m2b + d^2 na nb / n.
//
// Deterministic two-stage reduction (no atomics; the order depends on the shape only, never
// on the device's SM count or on timing):
//   stage 1: every group is cut into P chunks of a fixed size; one block per (group, chunk).
//     runs layout (x contiguous, NCHW): the group's elements in flat order e = r * S + s
//       (r = sample for per-channel groups), 256 threads, thread t takes e = t, t + 256, ...
//       of the chunk (coalesced along s), then a fixed-order shared-memory tree merge;
//     rows layout (x.movedim(1, -1) contiguous: channels_last, [N, C]): a block is 32 channels
//       x 8 row lanes over a chunk of rows (coalesced along the channels), then a fixed-order
//       merge of the 8 lanes.
//     Each block writes one partial (n, mean, m2) per group it covers.
//   stage 2: one thread per group merges its P partials in chunk order and writes mean, var.
// C = 64 channels of a ResNet layer cannot fill a GPU with one block per channel; the chunking
// gives G * P blocks.
//
// Backward (closed form, one read of x and one write): dL/dx = a_g + b_g x with
//   b_g = 2 g_v / M',  a_g = g_m / M - b_g mean_g   (bn_moments_coefficients, bn_checks.h),
// one elementwise grid-stride kernel in the memory format of the output (at::empty_like(x)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "pydistill/bn_checks.h"
#include "pydistill/chan_merge.h"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int kRunThreads = 256;
constexpr int64_t kRunChunk = 4096;  // elements per block, runs layout
constexpr int kRowsX = 32, kRowsY = 8;
constexpr int64_t kRowChunk = 256;   // rows per block, rows layout

template <typename T>
struct WelfordState {
  T mean;
  T m2;
  int64_t n;
};

template <typename T>
__device__ __forceinline__ void ws_add(WelfordState<T>& s, T v) {
  s.n += 1;
  const T d = v - s.mean;
  s.mean += d / static_cast<T>(s.n);
  s.m2 += d * (v - s.mean);
}

// Offset of the group's first element (its shift K_g).
__device__ __forceinline__ int64_t group_first(int64_t g, bool rows, bool per_sample, int64_t C,
                                               int64_t S) {
  if (!rows) return g * S;                        // runs: x[n, c, 0] / x[0, c, 0]
  if (!per_sample) return g;                      // rows, per channel: x[row 0, c]
  return (g / C) * S * C + g % C;                 // rows, per sample: x[n, row 0, c]
}

// ------------------------------------------------------------------- stage 1, runs layout
template <typename scalar_t>
__global__ void stage1_runs_kernel(const scalar_t* __restrict__ x, int64_t G, int64_t P,
                                   int64_t M, int64_t S, int64_t run_stride,
                                   at::opmath_type<scalar_t>* __restrict__ pmean,
                                   at::opmath_type<scalar_t>* __restrict__ pm2,
                                   int64_t* __restrict__ pn) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T sm[kRunThreads];
  __shared__ T sq[kRunThreads];
  __shared__ int64_t sn[kRunThreads];
  const int64_t blk = blockIdx.x;
  const int64_t g = blk / P, p = blk % P;
  const int t = threadIdx.x;
  const scalar_t* base = x + g * S;
  const T shift = static_cast<T>(base[0]);
  WelfordState<T> s{T(0), T(0), 0};
  const int64_t e1 = (p + 1) * kRunChunk < M ? (p + 1) * kRunChunk : M;
  for (int64_t e = p * kRunChunk + t; e < e1; e += kRunThreads) {
    const int64_t r = e / S, k = e - r * S;
    ws_add(s, static_cast<T>(base[r * run_stride + k]) - shift);
  }
  sm[t] = s.mean;
  sq[t] = s.m2;
  sn[t] = s.n;
  __syncthreads();
  for (int off = kRunThreads / 2; off > 0; off >>= 1) {
    if (t < off) {
      WelfordState<T> a{sm[t], sq[t], sn[t]};
      chan_merge(a, sn[t + off], sm[t + off], sq[t + off]);
      sm[t] = a.mean;
      sq[t] = a.m2;
      sn[t] = a.n;
    }
    __syncthreads();
  }
  if (t == 0) {
    pmean[g * P + p] = sm[0];
    pm2[g * P + p] = sq[0];
    pn[g * P + p] = sn[0];
  }
}

// ------------------------------------------------------------------- stage 1, rows layout
// grid (ceil(C / 32), P, B); x is [B, R, C] rows of C channels.
template <typename scalar_t>
__global__ void stage1_rows_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C,
                                   int64_t P, at::opmath_type<scalar_t>* __restrict__ pmean,
                                   at::opmath_type<scalar_t>* __restrict__ pm2,
                                   int64_t* __restrict__ pn) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T sm[kRowsY][kRowsX];
  __shared__ T sq[kRowsY][kRowsX];
  __shared__ int64_t sn[kRowsY][kRowsX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowsX + tx;
  const int64_t p = blockIdx.y, b = blockIdx.z;
  WelfordState<T> s{T(0), T(0), 0};
  if (c < C) {
    const scalar_t* base = x + b * R * C + c;
    const T shift = static_cast<T>(base[0]);
    const int64_t r1 = (p + 1) * kRowChunk < R ? (p + 1) * kRowChunk : R;
    for (int64_t r = p * kRowChunk + ty; r < r1; r += kRowsY)
      ws_add(s, static_cast<T>(base[r * C]) - shift);
  }
  sm[ty][tx] = s.mean;
  sq[ty][tx] = s.m2;
  sn[ty][tx] = s.n;
  __syncthreads();
  if (ty == 0 && c < C) {
    WelfordState<T> a{sm[0][tx], sq[0][tx], sn[0][tx]};
    for (int k = 1; k < kRowsY; ++k) chan_merge(a, sn[k][tx], sm[k][tx], sq[k][tx]);
    const int64_t g = b * C + c;
    pmean[g * P + p] = a.mean;
    pm2[g * P + p] = a.m2;
    pn[g * P + p] = a.n;
  }
}

// ------------------------------------------------------------------- stage 2
template <typename scalar_t>
__global__ void stage2_kernel(const scalar_t* __restrict__ x, int64_t G, int64_t P, int64_t C,
                              int64_t S, bool rows, bool per_sample, bool unbiased,
                              const at::opmath_type<scalar_t>* __restrict__ pmean,
                              const at::opmath_type<scalar_t>* __restrict__ pm2,
                              const int64_t* __restrict__ pn, at::opmath_type<scalar_t>* __restrict__ mean,
                              at::opmath_type<scalar_t>* __restrict__ var) {
  using T = at::opmath_type<scalar_t>;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= G) return;
  WelfordState<T> a{T(0), T(0), 0};
  for (int64_t p = 0; p < P; ++p) chan_merge(a, pn[g * P + p], pmean[g * P + p], pm2[g * P + p]);
  const T shift = static_cast<T>(x[group_first(g, rows, per_sample, C, S)]);
  mean[g] = shift + a.mean;
  var[g] = a.m2 / static_cast<T>(unbiased ? a.n - 1 : a.n);
}

std::tuple<Tensor, Tensor> bn_moments_forward_cuda(const Tensor& x_in, bool per_sample,
                                                   bool unbiased) {
  const BnMomentsShape sh = check_bn_moments_args(x_in, per_sample, unbiased);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto op_dtype = at::toOpMathType(x_in.scalar_type());
  const auto shape = bn_moments_out_shape(sh, per_sample);
  Tensor mean = at::empty(shape, x_in.options().dtype(op_dtype));
  Tensor var = at::empty(shape, x_in.options().dtype(op_dtype));
  if (sh.G == 0) return {mean, var};
  const bool rows = bn_is_rows_layout(x_in, sh.S);
  const Tensor x = rows ? x_in : x_in.contiguous();
  const int64_t C = sh.C, S = sh.S, G = sh.G;
  int64_t P;
  if (rows) {
    const int64_t R = per_sample ? S : sh.N * S;
    P = (R + kRowChunk - 1) / kRowChunk;
  } else {
    P = (sh.M + kRunChunk - 1) / kRunChunk;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  Tensor pmean = at::empty({G * P}, mean.options());
  Tensor pm2 = at::empty({G * P}, mean.options());
  Tensor pn = at::empty({G * P}, mean.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_moments_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (rows) {
      const int64_t B = per_sample ? sh.N : 1;
      const int64_t R = per_sample ? S : sh.N * S;
      TORCH_CHECK(P <= 65535 && B <= 65535, "pydistill_ext: bn_moments CUDA: x of shape ",
                  x.sizes(), " is too large for the channels_last kernel (", P, " row chunks, ",
                  B, " samples; at most 65535 each)");
      const dim3 grid(static_cast<unsigned>((C + kRowsX - 1) / kRowsX), static_cast<unsigned>(P),
                      static_cast<unsigned>(B));
      stage1_rows_kernel<scalar_t><<<grid, dim3(kRowsX, kRowsY), 0, stream>>>(
          xp, R, C, P, pmean.mutable_data_ptr<T>(), pm2.mutable_data_ptr<T>(),
          pn.mutable_data_ptr<int64_t>());
    } else {
      TORCH_CHECK(G * P < (int64_t(1) << 31), "pydistill_ext: bn_moments CUDA: x of shape ",
                  x.sizes(), " needs more than 2^31 blocks");
      stage1_runs_kernel<scalar_t><<<static_cast<unsigned>(G * P), kRunThreads, 0, stream>>>(
          xp, G, P, sh.M, S, C * S, pmean.mutable_data_ptr<T>(), pm2.mutable_data_ptr<T>(),
          pn.mutable_data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stage2_kernel<scalar_t><<<static_cast<unsigned>((G + 255) / 256), 256, 0, stream>>>(
        xp, G, P, C, S, rows, per_sample, unbiased, pmean.const_data_ptr<T>(),
        pm2.const_data_ptr<T>(), pn.const_data_ptr<int64_t>(), mean.mutable_data_ptr<T>(),
        var.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// ------------------------------------------------------------------- backward
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                const at::opmath_type<scalar_t>* __restrict__ a,
                                const at::opmath_type<scalar_t>* __restrict__ b, int64_t numel,
                                int64_t C, int64_t S, bool rows, bool per_sample) {
  using T = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    int64_t g;
    if (!rows) {
      g = per_sample ? i / S : (i / S) % C;
    } else {
      g = per_sample ? (i / (S * C)) * C + i % C : i % C;
    }
    out[i] = static_cast<scalar_t>(a[g] + b[g] * static_cast<T>(x[i]));
  }
}

Tensor bn_moments_backward_cuda(const Tensor& grad_mean, const Tensor& grad_var, const Tensor& x_in,
                                const Tensor& mean, bool per_sample, bool unbiased) {
  const BnMomentsShape sh =
      check_bn_moments_backward_args(grad_mean, grad_var, x_in, mean, per_sample, unbiased);
  c10::cuda::CUDAGuard guard(x_in.device());
  Tensor out = at::empty_like(x_in);
  if (x_in.numel() == 0) return out;
  auto [a, b] = bn_moments_coefficients(grad_mean, grad_var, mean, sh, unbiased);
  const bool rows = bn_is_rows_layout(out, sh.S);
  const bool direct = rows || out.is_contiguous();
  Tensor dst = direct ? out : at::empty(x_in.sizes(), out.options());
  const Tensor x = rows ? x_in.movedim(1, -1).contiguous().movedim(-1, 1) : x_in.contiguous();
  const int64_t numel = x.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535LL * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_moments_bwd_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), a.const_data_ptr<T>(),
        b.const_data_ptr<T>(), numel, sh.C, sh.S, rows, per_sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!direct) out.copy_(dst);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m) {
  m.impl("bn_moments_forward", &bn_moments_forward_cuda);
  m.impl("bn_moments_backward", &bn_moments_backward_cuda);
}

}  // namespace pydistill
