// CUDA kernels of kd_loss_forward / kd_loss_backward and kd_loss_topk_forward /
// kd_loss_topk_backward: TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m).
//
// Same semantics as the CPU kernels (csrc/cpu/kd_loss_kernel.cpp, per-row math derived in
// csrc/include/pydistill/kd_row_cpu.h): the same argument checks and messages (checks.h,
// divergence.h), row_loss in the compute dtype (float32; float64 for float64 input), gradients
// of the logits' shape and dtype (top-k teacher: [..., K] in teacher_logits' dtype), rows with
// valid == false get loss 0 and gradient 0, a row whose logits are all -inf on a side gets
// loss 0 and gradient 0, a NaN in a valid row makes its loss and gradient rows NaN. One
// deliberate difference: a +inf logit is treated like a NaN (the CPU kernel produces NaN for
// the loss and most gradient entries of such a row; here all of them are NaN).
//
// Layout: one CTA per row (grid-stride over rows), 64..1024 threads chosen from V (at most 512
// for single-pass launches so that two CTAs share an SM; knobs in pick_threads), 16-byte
// vector loads/stores (8 bf16/fp16, 4 fp32, 2 fp64 per access) on the aligned body of each row
// with scalar head/tail pieces, block reductions by warp shuffles + one shared-memory round
// (deterministic: fixed order for a given block size), math in at::opmath_type (fp32; fp64 for
// fp64). exp is recomputed in every pass instead of being stored.
//
// Passes over a row pair (x = P logits, y = Q logits; the host maps P/Q onto
// teacher/student with plan_divergence):
//   A  online max + exp-sums of both rows (thread-local running maxima, rescaled when a
//      maximum grows, as in flash-attention), and for KL the loss accumulator; then two
//      block reductions (max, then the rescaled sums).                       reads x, y
//   B  SKEW/JSD/TVD only: loss and the cross-column row sums S0, S1, S2.     reads x, y
//   C  gradients (only when asked).                                          reads x, y,
//                                                                            writes gx, gy
// The forward also writes the row's statistics stats[r] = (mx, my, log Zp, log Zq, L, S0, S1,
// S2) (registration.cpp; 32 B per fp32 row). The backward given them (stats != None) runs
// pass C only: one read of the row pair and the gradient writes, no reductions, no
// shared-memory cache. Traffic in units of N*V elements (r = read, w = written):
//   forward, loss only          KL 2r; SKEW/JSD/TVD 2r + 2r for pass B (shared-memory cache
//                               hits for the part of the row pair that fits, L2 otherwise)
//   backward with stats         2r + 1w per differentiated side
//   backward without stats      2r (A) [+ 2r (B)] + 2r (C) + 1w per side, as the forward
//                               with gradients
// so KL fwd + bwd (student gradient) is 2 + 3 = 5 units with the statistics, 7 without.
// Passes B and C of the recomputing launches re-read the row from a shared-memory cache that
// pass A fills with the first kc vectors of every thread (up to ~227 KB per CTA; the whole
// row pair when it fits: V <= ~56K bf16 / ~28K fp32), the rest from global memory (L2 when
// recent).
//
// No host synchronisation in the dense ops. The top-k ops do one (a [3]-element copy to the
// host) to check the index range and per-row distinctness before launching, as the CPU
// kernel's checks raise; see kd_loss_topk_cuda below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "pydistill/checks.h"
#include "pydistill/divergence.h"

namespace pydistill {
namespace {

using at::Tensor;

constexpr int kMaxThreads = 1024;
constexpr int kMinThreads = 64;
constexpr int kVecBytes = 16;    // bytes per vector access
constexpr int kUnroll = 2;       // vectors in flight per thread and side in a sweep
constexpr int kStaticSmem = 2048;  // reserved for the kernels' static shared memory (<= 1 KB)

constexpr int kKL = static_cast<int>(Family::KL);
constexpr int kSKEW = static_cast<int>(Family::SKEW);
constexpr int kJSD = static_cast<int>(Family::JSD);
constexpr int kTVD = static_cast<int>(Family::TVD);

// Per-row statistics of the forward, handed to the backward (csrc/registration.cpp):
// (mx, my, log Zp, log Zq, L, s0, s1, s2) of the (P, Q) pair, in the compute dtype.
constexpr int kStats = 8;

// ------------------------------------------------------------------ device numerics

template <typename T>
struct Num;

template <>
struct Num<float> {
  // __expf(-inf) = +0 and __expf(NaN) = NaN; results below FLT_MIN flush to 0 (as the CPU
  // kernel's exp_u20). __logf(0) = -inf.
  static __device__ __forceinline__ float ex(float v) { return __expf(v); }
  static __device__ __forceinline__ float lg(float v) { return __logf(v); }
  static __device__ __forceinline__ float lg1p(float v) { return log1pf(v); }
  static __device__ __forceinline__ float ninf() { return __int_as_float(0xff800000); }
  static __device__ __forceinline__ float qnan() { return __int_as_float(0x7fffffff); }
  // NaN (either sign) or +inf, by bit pattern: independent of fast-math flags
  static __device__ __forceinline__ bool nan_or_pinf(float v) {
    const unsigned b = __float_as_uint(v);
    return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
  }
  // log M is formed as log(w p + (1-w) q) when that sum is at least this (both terms are
  // then far from float's subnormal range), else in log space with logaddexp.
  static __device__ __forceinline__ float lin_min() { return 1e-30f; }
  // Once per row, in double (correctly rounded to float in practice; __logf / __expf may be
  // 3 ulp off): log Z of a row's normaliser, which the statistics carry to the backward, and
  // 1/Z = exp(-log Z) there, so that 1/Z carries no more than the rounding of log Z.
  static __device__ __forceinline__ float lg_row(float z) {
    return static_cast<float>(::log(static_cast<double>(z)));
  }
  static __device__ __forceinline__ float inv_exp(float l) {
    return static_cast<float>(::exp(-static_cast<double>(l)));
  }
};

template <>
struct Num<double> {
  static __device__ __forceinline__ double ex(double v) { return ::exp(v); }
  static __device__ __forceinline__ double lg(double v) { return ::log(v); }
  static __device__ __forceinline__ double lg1p(double v) { return ::log1p(v); }
  static __device__ __forceinline__ double ninf() {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
  }
  static __device__ __forceinline__ double qnan() {
    return __longlong_as_double(static_cast<long long>(0x7ff8000000000000ULL));
  }
  static __device__ __forceinline__ bool nan_or_pinf(double v) {
    const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(v));
    return (b & 0x7fffffffffffffffULL) > 0x7ff0000000000000ULL || b == 0x7ff0000000000000ULL;
  }
  static __device__ __forceinline__ double lin_min() { return 1e-290; }
  static __device__ __forceinline__ double lg_row(double z) { return ::log(z); }
  static __device__ __forceinline__ double inv_exp(double l) { return ::exp(-l); }
};

// ------------------------------------------------------------------ vectors and row layout

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) AVec {
  scalar_t v[N];
};

template <typename scalar_t>
struct VecOf {
  static constexpr int n = kVecBytes / static_cast<int>(sizeof(scalar_t));
  using type = AVec<scalar_t, n>;
};

// A row of V elements starting at `row`: `head` scalar elements up to the first 16-byte
// boundary, then `nvec` whole vectors, then `V - tail_start` scalar elements. Every pointer
// that one sweep touches has the same address modulo 16 (the host guarantees it), so this
// geometry is valid for all of them.
struct Geo {
  int64_t head, nvec, tail_start;
};

template <typename scalar_t>
__device__ __forceinline__ Geo row_geo(const scalar_t* row, int64_t V) {
  constexpr int VEC = VecOf<scalar_t>::n;
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(row) & (kVecBytes - 1));
  int64_t head = mis == 0 ? 0 : (kVecBytes - mis) / static_cast<int>(sizeof(scalar_t));
  head = head < V ? head : V;
  const int64_t nvec = (V - head) / VEC;
  return {head, nvec, head + nvec * VEC};
}

template <typename scalar_t, typename T, int VEC>
__device__ __forceinline__ void unpack(const AVec<scalar_t, VEC>& a, T (&o)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) o[k] = static_cast<T>(a.v[k]);
}

// Lanes [0, cnt) from p, the others -inf (they then contribute exactly nothing).
template <typename scalar_t, typename T, int VEC>
__device__ __forceinline__ void load_part(const scalar_t* p, int cnt, T (&o)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) o[k] = k < cnt ? static_cast<T>(p[k]) : Num<T>::ninf();
}

// Stores lanes [0, cnt) at row + j0; cnt == VEC only for an aligned body vector.
template <typename scalar_t, typename T, int VEC>
__device__ __forceinline__ void store_vals(scalar_t* row, int64_t j0, int cnt, const T (&v)[VEC]) {
  if (cnt == VEC) {
    AVec<scalar_t, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(v[k]);
    *reinterpret_cast<AVec<scalar_t, VEC>*>(row + j0) = o;
  } else {
    for (int k = 0; k < cnt; ++k) row[j0 + k] = static_cast<scalar_t>(v[k]);
  }
}

template <typename scalar_t>
__device__ void fill_row(scalar_t* row, int64_t V, scalar_t val) {
  constexpr int VEC = VecOf<scalar_t>::n;
  using AV = typename VecOf<scalar_t>::type;
  const Geo g = row_geo(row, V);
  AV a;
#pragma unroll
  for (int k = 0; k < VEC; ++k) a.v[k] = val;
  AV* body = reinterpret_cast<AV*>(row + g.head);
  for (int64_t i = threadIdx.x; i < g.nvec; i += blockDim.x) body[i] = a;
  if (threadIdx.x == 0)
    for (int64_t j = 0; j < g.head; ++j) row[j] = val;
  if (threadIdx.x == blockDim.x - 1)
    for (int64_t j = g.tail_start; j < V; ++j) row[j] = val;
}

// One sweep over a row (SIDES = 2: the pair x, y; SIDES = 1: x only). Thread t visits body
// vectors i = t + k * blockDim.x, k = 0, 1, ...; vector k of thread t is kept in the shared
// memory slot k * blockDim.x + t when k < kc: FILL sweeps (pass A) write the slots, the
// others read them instead of global memory. Only the thread that wrote a slot reads it, so
// no barrier is needed. Thread 0 also takes the head piece and the last thread the tail
// piece, padded with -inf. f(fx, fy, j0, cnt) (or f(fx, j0, cnt)) gets the values in the
// compute type, the column j0 of lane 0 and the number of real lanes.
template <int SIDES, bool FILL, typename scalar_t, typename T, typename F>
__device__ __forceinline__ void sweep(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ y, int64_t V, const Geo& g,
                                      typename VecOf<scalar_t>::type* cx,
                                      typename VecOf<scalar_t>::type* cy, int kc, F&& f) {
  constexpr int VEC = VecOf<scalar_t>::n;
  using AV = typename VecOf<scalar_t>::type;
  const int tid = threadIdx.x, nt = blockDim.x;
  const AV* __restrict__ xv = reinterpret_cast<const AV*>(x + g.head);
  const AV* __restrict__ yv = reinterpret_cast<const AV*>((SIDES == 2 ? y : x) + g.head);
  auto visit = [&](const AV& ax, const AV& ay, int64_t i) {
    T fx[VEC];
    unpack(ax, fx);
    if constexpr (SIDES == 2) {
      T fy[VEC];
      unpack(ay, fy);
      f(fx, fy, g.head + i * VEC, VEC);
    } else {
      f(fx, g.head + i * VEC, VEC);
    }
  };
  int64_t i = tid;
  int k = 0;
  for (; i + static_cast<int64_t>(kUnroll - 1) * nt < g.nvec; i += kUnroll * nt, k += kUnroll) {
    AV ax[kUnroll], ay[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t ii = i + static_cast<int64_t>(u) * nt;
      const int slot = (k + u) * nt + tid;
      if (!FILL && k + u < kc) {
        ax[u] = cx[slot];
        if constexpr (SIDES == 2) ay[u] = cy[slot];
      } else {
        ax[u] = xv[ii];
        if constexpr (SIDES == 2) ay[u] = yv[ii];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (FILL && k + u < kc) {
        const int slot = (k + u) * nt + tid;
        cx[slot] = ax[u];
        if constexpr (SIDES == 2) cy[slot] = ay[u];
      }
      visit(ax[u], ay[u], i + static_cast<int64_t>(u) * nt);
    }
  }
  for (; i < g.nvec; i += nt, ++k) {
    const int slot = k * nt + tid;
    AV ax, ay;
    if (!FILL && k < kc) {
      ax = cx[slot];
      if constexpr (SIDES == 2) ay = cy[slot];
    } else {
      ax = xv[i];
      if constexpr (SIDES == 2) ay = yv[i];
      if (FILL && k < kc) {
        cx[slot] = ax;
        if constexpr (SIDES == 2) cy[slot] = ay;
      }
    }
    visit(ax, ay, i);
  }
  auto piece = [&](int64_t j0, int cnt) {
    T fx[VEC];
    load_part(x + j0, cnt, fx);
    if constexpr (SIDES == 2) {
      T fy[VEC];
      load_part(y + j0, cnt, fy);
      f(fx, fy, j0, cnt);
    } else {
      f(fx, j0, cnt);
    }
  };
  if (tid == 0 && g.head > 0) piece(0, static_cast<int>(g.head));
  if (tid == nt - 1 && g.tail_start < V) piece(g.tail_start, static_cast<int>(V - g.tail_start));
}

// ------------------------------------------------------------------ block reductions

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// All-reduce of N values over the block (blockDim.x a multiple of 32, <= 1024); every thread
// gets the same bits. red: shared [4 * 32]. Ends with a barrier, so red can be reused.
template <int N, typename T, typename Op>
__device__ __forceinline__ void block_allreduce(T (&v)[N], T* red, Op op) {
  static_assert(N <= 4, "red holds 4 x 32 values");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[n] = op(v[n], __shfl_xor_sync(0xffffffffu, v[n], o));
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) red[n * 32 + warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    T acc = red[n * 32];
    for (int w = 1; w < nw; ++w) acc = op(acc, red[n * 32 + w]);
    v[n] = acc;
  }
  __syncthreads();
}

// ------------------------------------------------------------------ per-element math

// Online update of one side's (running max m, sum s of exp((v - m) / T)) with VEC values.
// Shared by the dense and the top-k kernels; see the derivation above kd_dense_kernel.
template <typename T>
__device__ __forceinline__ T safe_ref(T m) { return m == Num<T>::ninf() ? T(0) : m; }

// log M = log(w p + (1-w) q) and rho = (1-w) q / M for one element (SKEW/JSD).
// Linear form when M >= lin_min (accurate: a sum of two non-negative terms); otherwise
// logaddexp(log w + lp, log(1-w) + lq) in log space, which stays finite for log-probabilities
// far below -104 (Liger issue 1453) and is -inf only when both terms are -inf. w = 1 takes
// log M = log w + lp (= lp) exactly, as the CPU kernel's log-space form. rho is only used
// where q > 0 (then log M is finite); it is 0 when 1-w == 0.
template <typename T, bool NEED_RHO>
__device__ __forceinline__ void log_mix(T p, T q, T lp, T lq, T w, T logw, T log1mw, T& lm,
                                        T& rho) {
  const T m = w * p + (T(1) - w) * q;
  if (log1mw == Num<T>::ninf()) {  // w = 1 (skew, beta = 1): M = P exactly, the loss is 0
    lm = logw + lp;
    if constexpr (NEED_RHO) rho = T(0);
  } else if (m >= Num<T>::lin_min()) {
    lm = Num<T>::lg(m);
    if constexpr (NEED_RHO) rho = (T(1) - w) * q / m;
  } else {
    const T a = logw + lp, b = log1mw + lq;
    const T hi = a > b ? a : b, lo = a > b ? b : a;
    lm = hi == Num<T>::ninf() ? hi : hi + Num<T>::lg1p(Num<T>::ex(lo - hi));
    if constexpr (NEED_RHO) rho = b == Num<T>::ninf() ? T(0) : Num<T>::ex(b - lm);
  }
}

// Row-sum terms of one element for SKEW/JSD/TVD (pass B). ea, eb: unnormalised exp of P, Q
// (the xlogy selects are on ea > 0 / eb > 0, exactly as the CPU kernel).
template <int FAM, typename T>
__device__ __forceinline__ void family_sums(T ea, T eb, T p, T q, T lp, T lq, T w, T logw,
                                            T log1mw, T& a0, T& a1, T& a2) {
  if constexpr (FAM == kTVD) {
    const T diff = q - p;
    const T sg = diff > T(0) ? T(1) : (diff < T(0) ? T(-1) : T(0));
    a0 += diff < T(0) ? -diff : diff;
    a1 += q * sg;
    a2 += p * sg;
  } else {
    T lm, rho;
    log_mix<T, FAM == kSKEW>(p, q, lp, lq, w, logw, log1mw, lm, rho);
    a0 += ea > T(0) ? p * (lp - lm) : T(0);
    if constexpr (FAM == kSKEW) {
      a1 += p * (eb > T(0) ? rho : T(0));
    } else {
      a1 += eb > T(0) ? q * (lq - lm) : T(0);
    }
  }
}

// Gradients of one element (pass C), both sides; gsc = grad_scale / T.
template <int FAM, typename T>
__device__ __forceinline__ void family_grads(T ea, T eb, T p, T q, T lp, T lq, T w, T logw,
                                             T log1mw, T L, T S0, T S1, T S2, T gsc, T& gx,
                                             T& gy) {
  if constexpr (FAM == kKL) {
    gy = (q - p) * gsc;
    gx = ea > T(0) ? p * (lp - lq - L) * gsc : T(0);
  } else if constexpr (FAM == kTVD) {
    const T diff = q - p;
    const T sg = diff > T(0) ? T(1) : (diff < T(0) ? T(-1) : T(0));
    gy = T(0.5) * q * (sg - S1) * gsc;
    gx = T(-0.5) * p * (sg - S2) * gsc;
  } else {
    T lm, rho;
    log_mix<T, FAM == kSKEW>(p, q, lp, lq, w, logw, log1mw, lm, rho);
    if constexpr (FAM == kSKEW) {
      const T r = eb > T(0) ? rho : T(0);
      gy = (q * S1 - p * r) * gsc;
      gx = ea > T(0) ? p * (lp - lm + r - L - S1) * gsc : T(0);
    } else {  // JSD
      gx = ea > T(0) ? w * p * (lp - lm - S0) * gsc : T(0);
      gy = eb > T(0) ? (T(1) - w) * q * (lq - lm - S1) * gsc : T(0);
    }
  }
}

// Combines the three row sums of pass B into the loss.
template <int FAM, typename T>
__device__ __forceinline__ T family_loss(T S0, T S1, T w) {
  if constexpr (FAM == kTVD) return T(0.5) * S0;
  else if constexpr (FAM == kSKEW) return S0;
  else return w * S0 + (T(1) - w) * S1;
}

// Thread 0 writes the row's statistics (stats: [N, kStats] or nullptr).
template <typename T>
__device__ __forceinline__ void store_stats(T* stats, int64_t r, T mx, T my, T lzp, T lzq, T L,
                                            T s0, T s1, T s2) {
  if (stats == nullptr || threadIdx.x != 0) return;
  T* o = stats + r * kStats;
  o[0] = mx;
  o[1] = my;
  o[2] = lzp;
  o[3] = lzq;
  o[4] = L;
  o[5] = s0;
  o[6] = s1;
  o[7] = s2;
}

// ------------------------------------------------------------------ dense kernel

template <typename scalar_t, typename T>
struct DenseArgs {
  const scalar_t* x;   // P logits [N, V]
  const scalar_t* y;   // Q logits [N, V]
  scalar_t* gx;        // d/dx [N, V] or nullptr
  scalar_t* gy;        // d/dy [N, V] or nullptr
  T* loss;             // [N] or nullptr (backward)
  T* stats;            // [N, kStats] statistics out (forward) or nullptr
  const T* stats_in;   // [N, kStats] statistics of the forward (backward, FROM_STATS)
  const bool* valid;   // [N] or nullptr
  const T* grad_rows;  // [N] per-row gradient scale (backward) or nullptr
  int64_t N, V;
  T it, w, logw, log1mw;  // 1/T, mixing weight w of P, log w, log(1-w)
  int kc;                 // shared-memory cache slots per thread (each one vector per side)
};

// Math (REFERENCE.md 1.3; full derivation in kd_row_cpu.h). For a row with P-logits x and
// Q-logits y, temperature T, mx = max x, my = max y:
//   u_j = (x_j - mx)/T, ea_j = exp(u_j), Zp = sum ea, p = ea/Zp, lp = u - log Zp
//   v_j = (y_j - my)/T, eb_j = exp(v_j), Zq = sum eb, q = eb/Zq, lq = v - log Zq
//   KL   L = (sum_j ea_j (u_j - v_j)) / Zp + log Zq - log Zp
//        dL/dy = (q - p)/T,  dL/dx = p (lp - lq - L)/T
//   SKEW lm = log(w p + (1-w) q), rho = (1-w) q / m, S1 = sum p rho, L = sum p (lp - lm)
//        dL/dy = (q S1 - p rho)/T,  dL/dx = p (lp - lm + rho - L - S1)/T
//   JSD  lm as SKEW, S0 = sum p (lp - lm), S1 = sum q (lq - lm), L = w S0 + (1-w) S1
//        dL/dx = w p (lp - lm - S0)/T,  dL/dy = (1-w) q (lq - lm - S1)/T
//   TVD  sg = sign(q - p), L = 1/2 sum |q - p|, S1 = sum q sg, S2 = sum p sg
//        dL/dy = 1/2 q (sg - S1)/T,  dL/dx = -1/2 p (sg - S2)/T
// (each is dL/dlogit_i = (G_i - p_i sum_j G_j)/T with G = dL/dlog p). Every gradient is
// multiplied by grad_scale (1 in the forward, grad_rows[r] in the backward).
//
// Pass A computes mx, Zp, my, Zq and (KL) the loss in one read, online: each thread keeps
// running maxima mx_t, my_t, sums sx = sum exp((x - rx)/T), sy likewise, and for KL
// d = sum_j ea_j ((x_j - rx) - (y_j - ry))/T, all relative to the references rx = mx_t,
// ry = my_t (0 while a side has only seen -inf, so that -inf - ref is -inf, never NaN). When
// a vector raises mx_t from m to m': sx *= r, d = r (d - sx_old (m' - m)/T) with
// r = exp((m - m')/T) (d = 0 if r underflows); when it raises my_t from ry to ry':
// sy *= exp((ry - ry')/T), d += sx (ry' - ry)/T. The block then reduces the maxima, each
// thread rescales its sums to the block maxima the same way, and the block reduces the sums:
// Zp, Zq and d = sum ea (u - v), L_KL = d/Zp + log Zq - log Zp (as the CPU kernel). The
// relative-to-max form keeps large common offsets of the logits (e.g. +-1e4) out of the
// differences.
//
// Numerics (as the CPU kernel): xlogy by select on ea > 0 / eb > 0, never 0 * inf, so -inf
// logits (masked vocabulary) and exp underflow give exact zeros; log M in log space when the
// linear mixture is tiny (log_mix); a row with a NaN (or +inf) logit on either side gives NaN
// loss and gradients, a row whose maximum is -inf on a side gives loss 0 and gradient 0.
//
// FROM_STATS (backward with the forward's statistics): mx, my, log Zp, log Zq, L, S0..S2 are
// read from stats_in[r], passes A and B are skipped, and pass C alone reads the row pair once
// (no shared-memory cache: the host launches with kc = 0), with 1/Z = exp(-log Z). A row whose
// stats maximum is NaN gets NaN gradients, one whose maximum is -inf gets zeros, and so does
// every row of SKEW with w = 1 (KL(P || P) = 0), as the CPU kernel's divergence_row_backward.
template <typename scalar_t, int FAM, bool FROM_STATS>
__global__ void __launch_bounds__(kMaxThreads)
    kd_dense_kernel(const DenseArgs<scalar_t, at::opmath_type<scalar_t>> a) {
  using T = at::opmath_type<scalar_t>;
  using AV = typename VecOf<scalar_t>::type;
  constexpr int VEC = VecOf<scalar_t>::n;
  __shared__ T red[4 * 32];
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  AV* cx = reinterpret_cast<AV*>(dyn_smem);
  AV* cy = cx + static_cast<size_t>(a.kc) * blockDim.x;
  const T ninf = Num<T>::ninf();
  const T it = a.it;
  const int64_t V = a.V;
  const T w = a.w, logw = a.logw, log1mw = a.log1mw;

  for (int64_t r = blockIdx.x; r < a.N; r += gridDim.x) {
    const scalar_t* xr = a.x + r * V;
    const scalar_t* yr = a.y + r * V;
    scalar_t* gxr = a.gx ? a.gx + r * V : nullptr;
    scalar_t* gyr = a.gy ? a.gy + r * V : nullptr;
    const T scale = a.grad_rows ? a.grad_rows[r] : T(1);

    // ---- rows that do not count (uniform over the block)
    if ((a.valid && !a.valid[r]) || (a.grad_rows && scale == T(0))) {
      if (gxr) fill_row(gxr, V, scalar_t(0));
      if (gyr) fill_row(gyr, V, scalar_t(0));
      if (a.loss && threadIdx.x == 0) a.loss[r] = T(0);
      store_stats(a.stats, r, T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0));
      continue;
    }
    const Geo g = row_geo(xr, V);

    T gmx, gmy, lzx, lzy, izx, izy, L, S0 = T(0), S1 = T(0), S2 = T(0);
    if constexpr (FROM_STATS) {
      // ---- the forward's statistics instead of passes A and B (uniform over the block)
      const T* st = a.stats_in + r * kStats;
      gmx = st[0];
      gmy = st[1];
      if (Num<T>::nan_or_pinf(gmx) || Num<T>::nan_or_pinf(gmy)) {
        if (gxr) fill_row(gxr, V, static_cast<scalar_t>(Num<T>::qnan()));
        if (gyr) fill_row(gyr, V, static_cast<scalar_t>(Num<T>::qnan()));
        continue;
      }
      if (gmx == ninf || gmy == ninf || (FAM == kSKEW && log1mw == ninf)) {
        if (gxr) fill_row(gxr, V, scalar_t(0));
        if (gyr) fill_row(gyr, V, scalar_t(0));
        continue;
      }
      lzx = st[2];
      lzy = st[3];
      L = st[4];
      S0 = st[5];
      S1 = st[6];
      S2 = st[7];
      izx = Num<T>::inv_exp(lzx);
      izy = Num<T>::inv_exp(lzy);
    } else {
      // ---- pass A: online maxima and exp-sums (+ KL loss accumulator)
      T mx = ninf, my = ninf, sx = T(0), sy = T(0), d = T(0);
      bool bad = false;
      sweep<2, true, scalar_t, T>(xr, yr, V, g, cx, cy, a.kc,
          [&](const T (&fx)[VEC], const T (&fy)[VEC], int64_t, int) {
            T cmx = mx, cmy = my;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              bad |= Num<T>::nan_or_pinf(fx[k]) | Num<T>::nan_or_pinf(fy[k]);
              cmx = fx[k] > cmx ? fx[k] : cmx;
              cmy = fy[k] > cmy ? fy[k] : cmy;
            }
            if (cmx > mx) {
              if (mx != ninf) {
                const T rr = Num<T>::ex((mx - cmx) * it);
                if constexpr (FAM == kKL) d = rr > T(0) ? rr * (d - sx * ((cmx - mx) * it)) : T(0);
                sx *= rr;
              }
              mx = cmx;
            }
            if (cmy > my) {
              const T ry_old = safe_ref(my);
              if (my != ninf) sy *= Num<T>::ex((my - cmy) * it);
              if constexpr (FAM == kKL) {
                if (sx > T(0)) d += sx * ((cmy - ry_old) * it);
              }
              my = cmy;
            }
            const T rx = safe_ref(mx), ry = safe_ref(my);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const T u = (fx[k] - rx) * it, v = (fy[k] - ry) * it;
              const T e = Num<T>::ex(u);
              sx += e;
              sy += Num<T>::ex(v);
              if constexpr (FAM == kKL) d += e > T(0) ? e * (u - v) : T(0);
            }
          });
      T mv[3] = {mx, my, bad ? T(1) : T(0)};
      block_allreduce<3>(mv, red, MaxOp());
      gmx = mv[0];
      gmy = mv[1];
      if (mv[2] > T(0)) {  // NaN / +inf somewhere in the row pair
        const T nan = Num<T>::qnan();
        if (gxr) fill_row(gxr, V, static_cast<scalar_t>(nan));
        if (gyr) fill_row(gyr, V, static_cast<scalar_t>(nan));
        if (a.loss && threadIdx.x == 0) a.loss[r] = nan;
        store_stats(a.stats, r, nan, nan, T(0), T(0), nan, T(0), T(0), T(0));
        continue;
      }
      if (gmx == ninf || gmy == ninf) {  // a side with every logit -inf
        if (gxr) fill_row(gxr, V, scalar_t(0));
        if (gyr) fill_row(gyr, V, scalar_t(0));
        if (a.loss && threadIdx.x == 0) a.loss[r] = T(0);
        store_stats(a.stats, r, gmx, gmy, T(0), T(0), T(0), T(0), T(0), T(0));
        continue;
      }
      T sv[3];
      const T rxs = mx != ninf ? Num<T>::ex((mx - gmx) * it) : T(0);
      sv[0] = sx * rxs;
      sv[1] = my != ninf ? sy * Num<T>::ex((my - gmy) * it) : T(0);
      sv[2] = T(0);
      if constexpr (FAM == kKL) {
        if (sx > T(0) && rxs > T(0))
          sv[2] = rxs * (d + sx * (((gmy - safe_ref(my)) - (gmx - mx)) * it));
      }
      block_allreduce<3>(sv, red, SumOp());
      const T Zx = sv[0], Zy = sv[1];
      lzx = Num<T>::lg_row(Zx);
      lzy = Num<T>::lg_row(Zy);
      izx = T(1) / Zx;
      izy = T(1) / Zy;

      if constexpr (FAM == kKL) {
        L = sv[2] * izx + lzy - lzx;
      } else {
        // ---- pass B: loss and cross-column sums
        T acc[3] = {T(0), T(0), T(0)};
        sweep<2, false, scalar_t, T>(xr, yr, V, g, cx, cy, a.kc,
            [&](const T (&fx)[VEC], const T (&fy)[VEC], int64_t, int) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) {
                const T u = (fx[k] - gmx) * it, v = (fy[k] - gmy) * it;
                const T ea = Num<T>::ex(u), eb = Num<T>::ex(v);
                family_sums<FAM, T>(ea, eb, ea * izx, eb * izy, u - lzx, v - lzy, w, logw,
                                    log1mw, acc[0], acc[1], acc[2]);
              }
            });
        block_allreduce<3>(acc, red, SumOp());
        S0 = acc[0];
        S1 = acc[1];
        S2 = acc[2];
        L = family_loss<FAM, T>(S0, S1, w);
      }
      if (a.loss && threadIdx.x == 0) a.loss[r] = L;
      store_stats(a.stats, r, gmx, gmy, lzx, lzy, L, S0, S1, S2);
    }

    // ---- pass C: gradients
    if (gxr || gyr) {
      const T gsc = scale * it;
      sweep<2, false, scalar_t, T>(xr, yr, V, g, cx, cy, a.kc,
          [&](const T (&fx)[VEC], const T (&fy)[VEC], int64_t j0, int cnt) {
            T ox[VEC], oy[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const T u = (fx[k] - gmx) * it, v = (fy[k] - gmy) * it;
              const T ea = Num<T>::ex(u), eb = Num<T>::ex(v);
              family_grads<FAM, T>(ea, eb, ea * izx, eb * izy, u - lzx, v - lzy, w, logw,
                                   log1mw, L, S0, S1, S2, gsc, ox[k], oy[k]);
            }
            if (gxr) store_vals(gxr, j0, cnt, ox);
            if (gyr) store_vals(gyr, j0, cnt, oy);
          });
    }
  }
}

// ------------------------------------------------------------------ top-k kernel

template <typename scalar_t, typename T>
struct TopkArgs {
  const scalar_t* s;    // student logits [N, V]
  const int64_t* idx;   // teacher indices [N, K], in [0, V), distinct per row (host-checked)
  const T* tk;          // teacher logits [N, K], compute dtype
  scalar_t* gs;         // [N, V] or nullptr
  T* gt;                // [N, K] compute dtype, or nullptr
  T* loss;              // [N] or nullptr (backward)
  T* stats;             // [N, kStats] statistics out (forward) or nullptr
  const T* stats_in;    // [N, kStats] statistics of the forward (backward, FROM_STATS)
  const bool* valid;    // [N] or nullptr
  const T* grad_rows;   // [N] or nullptr
  int64_t N, V, K;
  T it, w, logw, log1mw;
  int kc;               // shared-memory cache slots per thread (student row only)
};

// Top-k teacher: the teacher logits are -inf off its K entries, so p_t = 0 there and the
// teacher's softmax is the softmax over the K logits. Memory stays O(N K): nothing of size
// [N, V] is built besides the student gradient itself.
//
// With P/Q as in divergence.h (teacher is P except for skew_reverse_kl, where the student is
// P; reverse_kl is rejected on the host), every row sum splits into the K support entries,
// computed exactly with the dense formulas (family_sums), plus the off-support entries, where
// the teacher probability is 0 and each family's term reduces to a multiple of the student
// probability ps_j; so the off-support total is that multiple of O = 1 - sum_support ps:
//   KL   (P = t)  sum p (lp - lq) = 0 off support
//   SKEW (P = t)  m = (1-w) q: S0 += 0, S1 += 0
//   SKEW (P = s)  m = w p, rho = 0: S0 += sum p (lp - log w - lp) = -log(w) O, S1 += 0
//   JSD  (P = t)  m = (1-w) q: S0 += 0, S1 += sum q (lq - log(1-w) - lq) = -log(1-w) O
//   TVD  (P = t)  |q - 0| = q, sg = 1 (0 where q == 0): S0 += O, S1 += O, S2 += 0
// and the off-support student gradient is ps_j * c / T with
//   KL: c = 1 (q - 0);  SKEW P=t: c = S1 (q S1 - 0);  SKEW P=s: c = -log w - L - S1
//   (p (lp - lm + rho - L - S1) with lm = log w + lp, rho = 0);  JSD: c = (1-w)(-log(1-w) - S1);
//   TVD: c = 1/2 (1 - S1).
// Passes: A over V (student online max/sum, filling the shared-memory cache); the K entries
// for the teacher max/sum and the support sums (gathering the student at the indices); then,
// for the gradient, C over V writes the off-support formula to every column, a barrier, and
// the K support columns are overwritten with the exact formula (family_grads), which also
// gives the teacher gradient [K]. The barrier orders the two writes of a support column
// (different threads): __syncthreads makes the block's global writes before it visible to
// the block's reads and writes after it.
//
// Statistics (forward) are those of the dense virtual row in P/Q order: (max, log Z) of the
// teacher over its K entries and of the student over V, the loss, and S0..S2 as above with the
// off-support terms included (0, 0, 0 for KL). FROM_STATS (backward) reads them instead of
// pass A and the support sums: pass C over V and the K support columns only, one read of the
// student row (no shared-memory cache) and of the K teacher entries.
template <typename scalar_t, int FAM, bool TP, bool FROM_STATS>
__global__ void __launch_bounds__(kMaxThreads)
    kd_topk_kernel(const TopkArgs<scalar_t, at::opmath_type<scalar_t>> a) {
  using T = at::opmath_type<scalar_t>;
  using AV = typename VecOf<scalar_t>::type;
  constexpr int VEC = VecOf<scalar_t>::n;
  __shared__ T red[4 * 32];
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  AV* cs = reinterpret_cast<AV*>(dyn_smem);
  const T ninf = Num<T>::ninf();
  const T it = a.it;
  const int64_t V = a.V, K = a.K;
  const int tid = threadIdx.x, nt = blockDim.x;
  const T w = a.w, logw = a.logw, log1mw = a.log1mw;

  for (int64_t r = blockIdx.x; r < a.N; r += gridDim.x) {
    const scalar_t* sr = a.s + r * V;
    const int64_t* ir = a.idx + r * K;
    const T* tr = a.tk + r * K;
    scalar_t* gsr = a.gs ? a.gs + r * V : nullptr;
    T* gtr = a.gt ? a.gt + r * K : nullptr;
    const T scale = a.grad_rows ? a.grad_rows[r] : T(1);

    if ((a.valid && !a.valid[r]) || (a.grad_rows && scale == T(0))) {
      if (gsr) fill_row(gsr, V, scalar_t(0));
      if (gtr)
        for (int64_t k = tid; k < K; k += nt) gtr[k] = T(0);
      if (a.loss && tid == 0) a.loss[r] = T(0);
      store_stats(a.stats, r, T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0));
      continue;
    }
    const Geo g = row_geo(sr, V);

    T gms, gmt, lzs, lzt, izs, izt, L, S0 = T(0), S1 = T(0), S2 = T(0);
    if constexpr (FROM_STATS) {
      // ---- the forward's statistics (P/Q order) instead of pass A and the support sums
      const T* st = a.stats_in + r * kStats;
      const T mp = st[0], mq = st[1];
      if (Num<T>::nan_or_pinf(mp) || Num<T>::nan_or_pinf(mq)) {
        if (gsr) fill_row(gsr, V, static_cast<scalar_t>(Num<T>::qnan()));
        if (gtr)
          for (int64_t k = tid; k < K; k += nt) gtr[k] = Num<T>::qnan();
        continue;
      }
      if (mp == ninf || mq == ninf || (FAM == kSKEW && log1mw == ninf)) {
        if (gsr) fill_row(gsr, V, scalar_t(0));
        if (gtr)
          for (int64_t k = tid; k < K; k += nt) gtr[k] = T(0);
        continue;
      }
      gmt = TP ? mp : mq;
      gms = TP ? mq : mp;
      lzt = TP ? st[2] : st[3];
      lzs = TP ? st[3] : st[2];
      L = st[4];
      S0 = st[5];
      S1 = st[6];
      S2 = st[7];
      izs = Num<T>::inv_exp(lzs);
      izt = Num<T>::inv_exp(lzt);
    } else {
      // ---- pass A: student online max / exp-sum over V
      T ms = ninf, ss = T(0);
      bool bad = false;
      sweep<1, true, scalar_t, T>(sr, sr, V, g, cs, cs, a.kc,
          [&](const T (&fx)[VEC], int64_t, int) {
            T cm = ms;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              bad |= Num<T>::nan_or_pinf(fx[k]);
              cm = fx[k] > cm ? fx[k] : cm;
            }
            if (cm > ms) {
              if (ms != ninf) ss *= Num<T>::ex((ms - cm) * it);
              ms = cm;
            }
            const T rs = safe_ref(ms);
#pragma unroll
            for (int k = 0; k < VEC; ++k) ss += Num<T>::ex((fx[k] - rs) * it);
          });
      // teacher maximum over the K entries
      T mt = ninf;
      for (int64_t k = tid; k < K; k += nt) {
        const T tv = tr[k];
        bad |= Num<T>::nan_or_pinf(tv);
        mt = tv > mt ? tv : mt;
      }
      T mv[3] = {ms, mt, bad ? T(1) : T(0)};
      block_allreduce<3>(mv, red, MaxOp());
      gms = mv[0];
      gmt = mv[1];
      if (mv[2] > T(0)) {
        const T nan = Num<T>::qnan();
        if (gsr) fill_row(gsr, V, static_cast<scalar_t>(nan));
        if (gtr)
          for (int64_t k = tid; k < K; k += nt) gtr[k] = nan;
        if (a.loss && tid == 0) a.loss[r] = nan;
        store_stats(a.stats, r, nan, nan, T(0), T(0), nan, T(0), T(0), T(0));
        continue;
      }
      if (gms == ninf || gmt == ninf) {
        if (gsr) fill_row(gsr, V, scalar_t(0));
        if (gtr)
          for (int64_t k = tid; k < K; k += nt) gtr[k] = T(0);
        if (a.loss && tid == 0) a.loss[r] = T(0);
        store_stats(a.stats, r, TP ? gmt : gms, TP ? gms : gmt, T(0), T(0), T(0), T(0), T(0),
                    T(0));
        continue;
      }
      T sv[2];
      sv[0] = ms != ninf ? ss * Num<T>::ex((ms - gms) * it) : T(0);
      sv[1] = T(0);
      for (int64_t k = tid; k < K; k += nt) sv[1] += Num<T>::ex((tr[k] - gmt) * it);
      block_allreduce<2>(sv, red, SumOp());
      lzs = Num<T>::lg_row(sv[0]);
      lzt = Num<T>::lg_row(sv[1]);
      izs = T(1) / sv[0];
      izt = T(1) / sv[1];
    }

    // one support entry: (ea, eb, p, q, lp, lq) with the P/Q mapping
    auto support = [&](int64_t k, int64_t& j, T& ea, T& eb, T& p, T& q, T& lp, T& lq) {
      j = ir[k];
      const T us = (static_cast<T>(sr[j]) - gms) * it, ut = (tr[k] - gmt) * it;
      const T es = Num<T>::ex(us), et = Num<T>::ex(ut);
      if constexpr (TP) {
        ea = et; p = et * izt; lp = ut - lzt;
        eb = es; q = es * izs; lq = us - lzs;
      } else {
        ea = es; p = es * izs; lp = us - lzs;
        eb = et; q = et * izt; lq = ut - lzt;
      }
    };

    if constexpr (!FROM_STATS) {
      // ---- support sums (+ student support mass)
      T acc[4] = {T(0), T(0), T(0), T(0)};
      for (int64_t k = tid; k < K; k += nt) {
        int64_t j;
        T ea, eb, p, q, lp, lq;
        support(k, j, ea, eb, p, q, lp, lq);
        if constexpr (FAM == kKL) {
          acc[0] += ea > T(0) ? p * (lp - lq) : T(0);
        } else {
          family_sums<FAM, T>(ea, eb, p, q, lp, lq, w, logw, log1mw, acc[0], acc[1], acc[2]);
        }
        acc[3] += TP ? q : p;
      }
      block_allreduce<4>(acc, red, SumOp());
      T off = T(1) - acc[3];  // student mass off the support
      off = off > T(0) ? off : T(0);
      S0 = acc[0];
      S1 = acc[1];
      S2 = acc[2];
      if constexpr (FAM == kSKEW && !TP) S0 += -logw * off;
      if constexpr (FAM == kJSD) S1 += -log1mw * off;
      if constexpr (FAM == kTVD) {
        S0 += off;
        S1 += off;
      }
      L = FAM == kKL ? S0 : family_loss<FAM, T>(S0, S1, w);
      if (a.loss && tid == 0) a.loss[r] = L;
      if constexpr (FAM == kKL) {
        store_stats(a.stats, r, gmt, gms, lzt, lzs, L, T(0), T(0), T(0));
      } else {
        store_stats(a.stats, r, TP ? gmt : gms, TP ? gms : gmt, TP ? lzt : lzs,
                    TP ? lzs : lzt, L, S0, S1, S2);
      }
    }
    if (!gsr && !gtr) continue;

    const T gsc = scale * it;
    if (gsr) {
      // ---- pass C: off-support formula on every column
      T c;
      if constexpr (FAM == kKL) c = T(1);
      else if constexpr (FAM == kSKEW && TP) c = S1;
      else if constexpr (FAM == kSKEW) c = -logw - L - S1;
      else if constexpr (FAM == kJSD) c = (T(1) - w) * (-log1mw - S1);
      else c = T(0.5) * (T(1) - S1);
      const T cg = c * gsc;
      sweep<1, false, scalar_t, T>(sr, sr, V, g, cs, cs, a.kc,
          [&](const T (&fx)[VEC], int64_t j0, int cnt) {
            T o[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const T es = Num<T>::ex((fx[k] - gms) * it);
              o[k] = es > T(0) ? es * izs * cg : T(0);
            }
            store_vals(gsr, j0, cnt, o);
          });
      __syncthreads();  // the support columns below overwrite pass C's values
    }
    // ---- support columns: exact gradients (student column, teacher entry)
    for (int64_t k = tid; k < K; k += nt) {
      int64_t j;
      T ea, eb, p, q, lp, lq, gx, gy;
      support(k, j, ea, eb, p, q, lp, lq);
      family_grads<FAM, T>(ea, eb, p, q, lp, lq, w, logw, log1mw, L, S0, S1, S2, gsc, gx, gy);
      if (gsr) gsr[j] = static_cast<scalar_t>(TP ? gy : gx);
      if (gtr) gtr[k] = TP ? gx : gy;
    }
  }
}

// ------------------------------------------------------------------ host side

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kVecBytes == 0;
}

// A 16-byte-aligned contiguous copy when t is not aligned (rare: a view starting mid-vector),
// so that every pointer of a sweep shares one alignment with the fresh outputs.
Tensor make_aligned(const Tensor& t) {
  if (t.numel() == 0 || aligned16(t)) return t;
  Tensor c = at::empty_like(t, at::MemoryFormat::Contiguous);
  c.copy_(t);
  return c;
}

// Tuning knobs, read on the host at every call (benchmarking without rebuilding):
//   PYDISTILL_CUDA_KD_THREADS   cap on threads per row for launches that re-read the row
//                               (default 1024: one CTA per SM holding the largest cache)
//   PYDISTILL_CUDA_KD_THREADS_1 cap for single-pass launches (default 512: two CTAs per SM, so
//                               one CTA's reduction tail overlaps the other's loads)
//   PYDISTILL_CUDA_KD_CACHE=0   disables the shared-memory row cache
int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return std::atoi(v);
}

// Threads per row: >= 4 vectors per thread, a power of two in [64, cap] (cap <= 1024).
int pick_threads(int64_t vectors, bool rereads) {
  int cap = rereads ? env_int("PYDISTILL_CUDA_KD_THREADS", kMaxThreads)
                    : env_int("PYDISTILL_CUDA_KD_THREADS_1", 512);
  cap = std::max(kMinThreads, std::min(kMaxThreads, cap));
  const int64_t want = (vectors + 3) / 4;
  int t = kMinThreads;
  while (t < want && t * 2 <= cap) t <<= 1;
  return t;
}

// Cache slots per thread: enough to hold the whole row when it fits in the opt-in shared
// memory of one block, else as many as fit.
int pick_cache(int64_t vectors, int threads, int sides, bool rereads) {
  if (!rereads || env_int("PYDISTILL_CUDA_KD_CACHE", 1) == 0) return 0;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t avail = static_cast<int64_t>(prop->sharedMemPerBlockOptin) - kStaticSmem;
  const int64_t per_slot = static_cast<int64_t>(sides) * kVecBytes * threads;
  const int64_t need = (vectors + threads - 1) / threads;
  const int64_t fit = avail > 0 ? avail / per_slot : 0;
  return static_cast<int>(std::max<int64_t>(0, std::min(need, fit)));
}

int64_t grid_for(int64_t rows) {
  return std::min<int64_t>(rows, static_cast<int64_t>(std::numeric_limits<int>::max()));
}

template <typename Kernel, typename Args>
void launch(Kernel kernel, const Args& args, int64_t rows, int threads, size_t smem) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(grid_for(rows)), threads, smem,
           at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void mixing_scalars(const DivergencePlan& plan, double temperature, T& it, T& w, T& logw,
                    T& log1mw) {
  it = static_cast<T>(1.0 / temperature);
  w = static_cast<T>(plan.w);
  logw = static_cast<T>(plan.w > 0.0 ? std::log(plan.w) : -std::numeric_limits<double>::infinity());
  log1mw = static_cast<T>(plan.w < 1.0 ? std::log1p(-plan.w)
                                       : -std::numeric_limits<double>::infinity());
}

// The optional statistics given to a backward: kStats values per row of the compute dtype on
// the logits' device (the CPU kernel's checks and messages). rows: the number of rows of the
// logits (their leading numel, also when V = 0).
Tensor checked_stats(const std::optional<Tensor>& stats, const Tensor& ref, int64_t rows,
                     at::ScalarType op_dtype) {
  if (!stats.has_value()) return Tensor();
  const Tensor& st = *stats;
  TORCH_CHECK(st.numel() == rows * kStats, "pydistill_ext: stats must hold ", kStats,
              " values per row (", rows * kStats, "), got ", st.numel());
  TORCH_CHECK(st.scalar_type() == op_dtype, "pydistill_ext: stats must be ", op_dtype,
              " (the compute dtype of the logits), got ", st.scalar_type());
  check_same_device(ref, "student_logits", st, "stats");
  return st.contiguous();
}

// [lead..., kStats] in the compute dtype: filled by the kernels (every row, masked ones with
// zeros) when there is work, zeros otherwise (as the CPU kernel); [0] in the backward.
Tensor stats_output(at::IntArrayRef lead, bool backward, bool empty_rows,
                    const at::TensorOptions& opts) {
  if (backward) return at::empty({0}, opts);
  auto shape = lead.vec();
  shape.push_back(kStats);
  return empty_rows ? at::zeros(shape, opts) : at::empty(shape, opts);
}

// Shared body of kd_loss_forward (grad_rows undefined: returns the row losses, the plain
// gradients when asked, and the per-row statistics) and kd_loss_backward (grad_rows [rows]:
// gradients scaled per row; an empty loss and statistics). stats_in (backward only): the
// forward's statistics, which reduce the kernel to its gradient pass.
std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_dense_cuda(
    const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& valid,
    std::string_view divergence, double beta, double temperature, bool grad_student,
    bool grad_teacher, const Tensor& grad_rows, const std::optional<Tensor>& stats_in) {
  const DivergencePlan plan =
      check_kd_dense_args(student, teacher, valid, divergence, beta, temperature);
  const int64_t V = student.size(-1);
  const int64_t N = V == 0 ? 0 : student.numel() / V;
  const bool backward = grad_rows.defined();
  if (backward) {
    TORCH_CHECK(grad_rows.numel() == student.numel() / std::max<int64_t>(V, 1) || V == 0,
                "pydistill_ext: grad_rows must have one entry per row");
    check_same_device(student, "student_logits", grad_rows, "grad_rows");
  }
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  const auto op_dtype = at::toOpMathType(student.scalar_type());
  const Tensor st_in = checked_stats(stats_in, student, c10::multiply_integers(lead), op_dtype);
  const bool from_stats = st_in.defined();

  c10::cuda::CUDAGuard guard(student.device());
  const auto op_opts = student.options().dtype(op_dtype);
  Tensor gs = grad_student ? at::empty_like(student, at::MemoryFormat::Contiguous)
                           : at::empty({0}, student.options());
  Tensor gt = grad_teacher ? at::empty_like(teacher, at::MemoryFormat::Contiguous)
                           : at::empty({0}, teacher.options());
  const bool no_work = N == 0 || V == 0 || (backward && !grad_student && !grad_teacher);
  Tensor stats = stats_output(lead, backward, no_work, op_opts);
  if (no_work) {
    if (grad_student) gs.zero_();
    if (grad_teacher) gt.zero_();
    return {at::zeros(backward ? at::IntArrayRef{0} : lead, op_opts), gs, gt, stats};
  }
  Tensor loss = at::empty(backward ? at::IntArrayRef{0} : lead, op_opts);
  const Tensor s = make_aligned(student.contiguous());
  const Tensor t = make_aligned(teacher.contiguous());
  const Tensor vmask = valid.has_value() ? valid->contiguous() : Tensor();
  const Tensor gr = backward ? grad_rows.to(op_dtype).contiguous() : Tensor();

  const int64_t elem = static_cast<int64_t>(student.element_size());
  const int64_t vectors = (V * elem + kVecBytes - 1) / kVecBytes;
  // with the statistics, the gradient pass is the only read of the rows
  const bool rereads =
      !from_stats && (grad_student || grad_teacher || plan.family != Family::KL);
  const int threads = pick_threads(vectors, rereads);
  const int kc = pick_cache(vectors, threads, 2, rereads);
  const size_t smem = static_cast<size_t>(kc) * 2 * kVecBytes * threads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    DenseArgs<scalar_t, T> args;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* gsp = grad_student ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = grad_teacher ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    args.x = plan.teacher_is_p ? tp : sp;
    args.y = plan.teacher_is_p ? sp : tp;
    args.gx = plan.teacher_is_p ? gtp : gsp;
    args.gy = plan.teacher_is_p ? gsp : gtp;
    args.loss = backward ? nullptr : loss.mutable_data_ptr<T>();
    args.stats = backward ? nullptr : stats.mutable_data_ptr<T>();
    args.stats_in = from_stats ? st_in.const_data_ptr<T>() : nullptr;
    args.valid = vmask.defined() ? vmask.const_data_ptr<bool>() : nullptr;
    args.grad_rows = backward ? gr.const_data_ptr<T>() : nullptr;
    args.N = N;
    args.V = V;
    mixing_scalars<T>(plan, temperature, args.it, args.w, args.logw, args.log1mw);
    args.kc = kc;
    auto go = [&](auto fam) {
      constexpr int F = decltype(fam)::value;
      if (from_stats)
        launch(kd_dense_kernel<scalar_t, F, true>, args, N, threads, smem);
      else
        launch(kd_dense_kernel<scalar_t, F, false>, args, N, threads, smem);
    };
    switch (plan.family) {
      case Family::KL: go(std::integral_constant<int, kKL>{}); break;
      case Family::SKEW: go(std::integral_constant<int, kSKEW>{}); break;
      case Family::JSD: go(std::integral_constant<int, kJSD>{}); break;
      case Family::TVD: go(std::integral_constant<int, kTVD>{}); break;
    }
  });
  return {loss, gs, gt, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_forward_cuda(
    const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& valid,
    std::string_view divergence, double beta, double temperature, bool grad_student,
    bool grad_teacher) {
  return kd_loss_dense_cuda(student, teacher, valid, divergence, beta, temperature,
                            grad_student, grad_teacher, Tensor(), std::nullopt);
}

std::tuple<Tensor, Tensor> kd_loss_backward_cuda(
    const Tensor& grad_rows, const Tensor& student, const Tensor& teacher,
    const std::optional<Tensor>& valid, const std::optional<Tensor>& stats,
    std::string_view divergence, double beta, double temperature, bool grad_student,
    bool grad_teacher) {
  auto out = kd_loss_dense_cuda(student, teacher, valid, divergence, beta, temperature,
                                grad_student, grad_teacher, grad_rows, stats);
  return {std::get<1>(out), std::get<2>(out)};
}

// Index checks of the top-k ops, with one device-to-host copy: range (min/max) and per-row
// distinctness (adjacent equal values after a per-row sort; O(N K) memory). Raised with the
// CPU kernel's messages; the duplicate's row and index are located only on the error path.
void check_topk_indices(const Tensor& idx, int64_t N, int64_t K, int64_t V) {
  if (idx.numel() == 0) return;
  const Tensor i2 = idx.view({N, K});
  Tensor dup_rows;
  Tensor stats;
  if (K > 1) {
    const Tensor srt = std::get<0>(i2.sort(1));
    dup_rows = (srt.slice(1, 1, K) == srt.slice(1, 0, K - 1)).any(1);
    stats = at::stack({i2.min(), i2.max(), dup_rows.any().to(at::kLong)});
  } else {
    stats = at::stack({i2.min(), i2.max(), at::zeros({}, i2.options())});
  }
  const Tensor h = stats.cpu();
  const int64_t* hp = h.const_data_ptr<int64_t>();
  const int64_t lo = hp[0], hi = hp[1];
  TORCH_CHECK(lo >= 0 && hi < V, "pydistill_ext: teacher_indices must lie in [0, ", V,
              "), got values in [", lo, ", ", hi, "]");
  if (hp[2] != 0) {
    const int64_t r = dup_rows.nonzero().select(1, 0).min().item<int64_t>();
    const Tensor row = i2.select(0, r).cpu();
    const int64_t* rp = row.const_data_ptr<int64_t>();
    for (int64_t k = 1; k < K; ++k)
      for (int64_t k2 = 0; k2 < k; ++k2)
        TORCH_CHECK(rp[k2] != rp[k], "pydistill_ext: teacher_indices row ", r,
                    " repeats vocabulary index ", rp[k], "; the K indices must be distinct");
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_topk_cuda(
    const Tensor& student, const Tensor& indices, const Tensor& teacher_topk,
    const std::optional<Tensor>& valid, std::string_view divergence, double beta,
    double temperature, bool grad_student, bool grad_teacher, const Tensor& grad_rows,
    const std::optional<Tensor>& stats_in) {
  const DivergencePlan plan = check_kd_topk_args(student, indices, teacher_topk, valid,
                                                 divergence, beta, temperature);
  const int64_t V = student.size(-1);
  const int64_t K = indices.size(-1);
  const int64_t N = V == 0 ? 0 : student.numel() / V;
  const bool backward = grad_rows.defined();
  if (backward) {
    // V == 0: N is 0 while the loss has the leading shape; nothing to scale (as the dense op)
    TORCH_CHECK(grad_rows.numel() == N || V == 0,
                "pydistill_ext: grad_rows must have one entry per row");
    check_same_device(student, "student_logits", grad_rows, "grad_rows");
  }
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  const auto op_dtype = at::toOpMathType(student.scalar_type());
  const Tensor st_in = checked_stats(stats_in, student, c10::multiply_integers(lead), op_dtype);
  const bool from_stats = st_in.defined();

  c10::cuda::CUDAGuard guard(student.device());
  const Tensor idx = indices.to(at::kLong).contiguous();
  check_topk_indices(idx, N, K, V);  // the one host synchronisation of the top-k ops

  Tensor gs = grad_student ? at::empty_like(student, at::MemoryFormat::Contiguous)
                           : at::empty({0}, student.options());
  Tensor gt_c = grad_teacher ? at::empty(indices.sizes(), student.options().dtype(op_dtype))
                             : at::empty({0}, student.options().dtype(op_dtype));
  const bool no_work = N == 0 || V == 0 || (backward && !grad_student && !grad_teacher);
  Tensor stats = stats_output(lead, backward, no_work, student.options().dtype(op_dtype));
  if (no_work) {
    if (grad_student) gs.zero_();
    gt_c.zero_();
    return {at::zeros(backward ? at::IntArrayRef{0} : lead, student.options().dtype(op_dtype)),
            gs, gt_c.to(teacher_topk.scalar_type()), stats};
  }
  Tensor loss = at::empty(backward ? at::IntArrayRef{0} : lead, student.options().dtype(op_dtype));
  const Tensor s = make_aligned(student.contiguous());
  const Tensor tk = teacher_topk.to(op_dtype).contiguous();
  const Tensor vmask = valid.has_value() ? valid->contiguous() : Tensor();
  const Tensor gr = backward ? grad_rows.to(op_dtype).contiguous() : Tensor();

  const int64_t elem = static_cast<int64_t>(student.element_size());
  const int64_t vectors = (V * elem + kVecBytes - 1) / kVecBytes;
  // with the statistics, the gradient pass is the only read of the student row
  const bool rereads = grad_student && !from_stats;
  const int threads = pick_threads(std::max<int64_t>(vectors, (K + 1) / 2), rereads);
  const int kc = pick_cache(vectors, threads, 1, rereads);
  const size_t smem = static_cast<size_t>(kc) * kVecBytes * threads;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_topk_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    TopkArgs<scalar_t, T> args;
    args.s = s.const_data_ptr<scalar_t>();
    args.idx = idx.const_data_ptr<int64_t>();
    args.tk = tk.const_data_ptr<T>();
    args.gs = grad_student ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    args.gt = grad_teacher ? gt_c.mutable_data_ptr<T>() : nullptr;
    args.loss = backward ? nullptr : loss.mutable_data_ptr<T>();
    args.stats = backward ? nullptr : stats.mutable_data_ptr<T>();
    args.stats_in = from_stats ? st_in.const_data_ptr<T>() : nullptr;
    args.valid = vmask.defined() ? vmask.const_data_ptr<bool>() : nullptr;
    args.grad_rows = backward ? gr.const_data_ptr<T>() : nullptr;
    args.N = N;
    args.V = V;
    args.K = K;
    mixing_scalars<T>(plan, temperature, args.it, args.w, args.logw, args.log1mw);
    args.kc = kc;
    auto go = [&](auto fam, auto tp) {
      constexpr int F = decltype(fam)::value;
      constexpr bool TP = decltype(tp)::value;
      if (from_stats)
        launch(kd_topk_kernel<scalar_t, F, TP, true>, args, N, threads, smem);
      else
        launch(kd_topk_kernel<scalar_t, F, TP, false>, args, N, threads, smem);
    };
    using P_is_teacher = std::true_type;
    switch (plan.family) {
      case Family::KL:  // teacher is P (reverse KL was rejected above)
        go(std::integral_constant<int, kKL>{}, P_is_teacher{});
        break;
      case Family::SKEW:
        if (plan.teacher_is_p)
          go(std::integral_constant<int, kSKEW>{}, P_is_teacher{});
        else
          go(std::integral_constant<int, kSKEW>{}, std::false_type{});
        break;
      case Family::JSD:
        go(std::integral_constant<int, kJSD>{}, P_is_teacher{});
        break;
      case Family::TVD:
        go(std::integral_constant<int, kTVD>{}, P_is_teacher{});
        break;
    }
  });
  return {loss, gs, gt_c.to(teacher_topk.scalar_type()), stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_topk_forward_cuda(
    const Tensor& student, const Tensor& indices, const Tensor& teacher_topk,
    const std::optional<Tensor>& valid, std::string_view divergence, double beta,
    double temperature, bool grad_student, bool grad_teacher) {
  return kd_loss_topk_cuda(student, indices, teacher_topk, valid, divergence, beta,
                           temperature, grad_student, grad_teacher, Tensor(), std::nullopt);
}

std::tuple<Tensor, Tensor> kd_loss_topk_backward_cuda(
    const Tensor& grad_rows, const Tensor& student, const Tensor& indices,
    const Tensor& teacher_topk, const std::optional<Tensor>& valid,
    const std::optional<Tensor>& stats, std::string_view divergence, double beta,
    double temperature, bool grad_student, bool grad_teacher) {
  auto out = kd_loss_topk_cuda(student, indices, teacher_topk, valid, divergence, beta,
                               temperature, grad_student, grad_teacher, grad_rows, stats);
  return {std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m) {
  m.impl("kd_loss_forward", &kd_loss_forward_cuda);
  m.impl("kd_loss_backward", &kd_loss_backward_cuda);
  m.impl("kd_loss_topk_forward", &kd_loss_topk_forward_cuda);
  m.impl("kd_loss_topk_backward", &kd_loss_topk_backward_cuda);
}

}  // namespace pydistill
