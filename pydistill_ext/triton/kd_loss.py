"""Triton kernels of the kd_loss ops (REFERENCE.md section 1).

Four opaque custom ops with the schemas, outputs and semantics of the native ops
(csrc/registration.cpp, csrc/cpu/kd_loss_kernel.cpp):

  pydistill_ext::kd_loss_forward_triton        ~ kd_loss_forward
  pydistill_ext::kd_loss_backward_triton       ~ kd_loss_backward
  pydistill_ext::kd_loss_topk_forward_triton   ~ kd_loss_topk_forward
  pydistill_ext::kd_loss_topk_backward_triton  ~ kd_loss_topk_backward

The forward returns the per-row loss in float32 (float64 for float64 input), when asked
(grad_student / grad_teacher) d row_loss / d logits including the 1/T from the same launch
(gradient-in-forward, as fused_linear_kd_loss uses it), and the per-row statistics
stats [..., 8] = (mx, my, log Zp, log Zq, L, s0, s1, s2) of the (P, Q) pair (registration.cpp).
The backward writes grad_rows[r] * d row_loss[r] / d logits straight into the gradient
buffer: given the statistics, with a one-pass kernel (_kd_grad_from_stats_kernel: 2 reads +
1 write per side of the row pair); without (stats = None), with the forward's kernels, which
recompute the rows (a per-row scale, no loss store). The forward ops get the autograd of the
native ops from ``make_autograd`` (pydistill_ext/ops/kd_loss.py), which hands the forward's
statistics to the Triton backward ops. They
are opaque ``torch.library.custom_op``s rather than ``triton_op`` + ``wrap_triton``, which do
not pass opcheck / torch.compile under ``TRITON_INTERPRET=1`` (DESIGN.md convention 7).

Kernel layout
-------------
One program per row; the row is streamed in BLOCK-wide tiles (BLOCK = next power of two of V,
at least 16, capped at 4096 elements, 2048 for float64; the tail tile loads -inf). As in the
CPU kernel (csrc/include/pydistill/kd_row_cpu.h) every family is computed on an ordered pair
(P, Q) of logit rows x, y; the host maps P/Q onto teacher/student (divergence.h):

  pass 1  row maxima mx, my, and a NaN flag                        (reads x, y)
  pass 2  Zp = sum exp((x-mx)/T), Zq likewise; KL also sum p*(..)  (reads x, y)
  pass 3  SKEW/JSD/TVD only: loss and the cross-column row sums    (reads x, y)
  last    gradients, when asked                                     (reads x, y, writes g)

so with gradients KL reads a row pair 3 times and SKEW/JSD/TVD 4 times; exponentials are
recomputed in each pass instead of being kept in scratch (cheap on a GPU, no [N, V]
temporary). An online (max-rescaled) first pass would save one read; it is not done, to keep
the shifted-logit numerics of the CPU kernel. The forward stores the row's statistics at the
end of pass 2 (KL) / 3; the backward with statistics skips passes 1-3 and reads the row pair
once, p = exp((x - mx)/T - log Zp).

Numerics (same rules as the CPU kernel):
  * math in float32 for float32 / float16 / bfloat16 input, float64 for float64 input (the
    scalars 1/T, w, log w, log(1-w) are passed as a tiny tensor of the compute dtype, since a
    Python float kernel argument would be rounded to float32);
  * log-probabilities come from shifted logits, lp = (x - mx)/T - log Zp;
  * xlogy rule by select on p > 0 (never 0 * inf), so -inf logits (masked vocabulary), exp
    underflow and log p < -104 on both sides give exact zeros;
  * log M = logaddexp(log w + lp, log(1-w) + lq) in log space (Liger issue 1453), with
    log(1 + e) for log1p (libdevice.log1p does not run under the interpreter; the absolute
    error is one ulp of O(1));
  * a row whose logits are all -inf on a side gives loss 0 and gradient 0; a row with
    valid == False (or, in the backward, grad_rows == 0) reads no memory and gives 0 as well;
    a NaN anywhere in another row makes its loss and both gradient rows NaN.

Top-k teacher: the dense teacher logits (-inf off the K entries, so that their softmax is the
softmax over the K logits) are materialised in the compute dtype for a chunk of rows at a
time (dense teacher + its gradient at most ~64 MB), the dense kernel runs on the chunk, and
the teacher gradient is gathered back to [..., K]. Indices are checked on the host (range,
distinct per row), which costs one device sync per call.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from pydistill_ext.ops import kd_loss as _native
from pydistill_ext.ops.kd_loss import make_autograd

__all__ = ["kd_loss_forward_triton", "kd_loss_backward_triton", "kd_loss_topk_forward_triton",
           "kd_loss_topk_backward_triton"]

# Families, as in csrc/include/pydistill/divergence.h.
_KL, _SKEW, _JSD, _TVD = 0, 1, 2, 3

# Tile width caps (elements). _BLOCK_CAP overrides both; tests set it to exercise the
# multi-tile loops on tiny rows.
_MAX_BLOCK = {torch.float64: 2048}
_DEFAULT_MAX_BLOCK = 4096
_BLOCK_CAP: Optional[int] = None
# Bound on the temporaries of the top-k path (dense teacher + its gradient), bytes.
_TOPK_CHUNK_BYTES = 64 << 20


# =====================================================================================
# Shared device helpers
# =====================================================================================

@triton.jit
def _row_setup(row, V, it, valid_ptr, grow_ptr, HAS_VALID: tl.constexpr,
               HAS_SCALE: tl.constexpr):
    # n: number of columns to read: V, or 0 for a masked row (and, in the backward, a row
    # whose incoming gradient is 0), which then reads as all -inf, i.e. a degenerate row:
    # loss 0, gradient 0, no memory traffic.
    # gsc: factor of every gradient, 1/T (forward) or grad_rows[row] / T (backward).
    n = V
    if HAS_VALID:
        n = n * tl.load(valid_ptr + row).to(tl.int32)
    gsc = it
    if HAS_SCALE:
        scale = tl.load(grow_ptr + row)
        n = tl.where(scale == 0, 0, n)
        gsc = it * scale
    return n, gsc


@triton.jit
def _load_pair(x_row, y_row, offs, n, C: tl.constexpr):
    m = offs < n
    x = tl.load(x_row + offs, mask=m, other=float("-inf")).to(C)
    y = tl.load(y_row + offs, mask=m, other=float("-inf")).to(C)
    return x, y


@triton.jit
def _row_stats(x_row, y_row, n, it, C: tl.constexpr, BLOCK: tl.constexpr,
               ACC_KL: tl.constexpr):
    """Passes 1-2. Returns the shifts mx, my, log Zp, log Zq, 1/Zp, 1/Zq, the KL partial sum
    sum_j ep_j * (xs_j - ys_j) (0 unless ACC_KL), the row flags dead / has_nan, and the row
    maxima as read (-inf for an all -inf side; for the statistics)."""
    cols = tl.arange(0, BLOCK)
    # pass 1: maxima + NaN flag (tl.maximum need not propagate NaN on the GPU, so NaN is
    # tracked explicitly)
    mxv = tl.full([BLOCK], float("-inf"), C)
    myv = tl.full([BLOCK], float("-inf"), C)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        x, y = _load_pair(x_row, y_row, start + cols, n, C)
        mxv = tl.maximum(mxv, x)
        myv = tl.maximum(myv, y)
        bad += ((x != x) | (y != y)).to(tl.int32)
    mx = tl.max(mxv, axis=0)
    my = tl.max(myv, axis=0)
    has_nan = tl.max(bad, axis=0) > 0
    dead = (mx == float("-inf")) | (my == float("-inf"))
    mx_raw = mx
    my_raw = my
    # an all -inf side is shifted by 0 so that its (discarded) arithmetic stays quiet
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    my = tl.where(my == float("-inf"), 0.0, my)

    # pass 2: normalisers (and the KL sum). xs, ys <= 0, so exp never overflows.
    zpv = tl.zeros([BLOCK], C)
    zqv = tl.zeros([BLOCK], C)
    sdv = tl.zeros([BLOCK], C)
    for start in range(0, n, BLOCK):
        x, y = _load_pair(x_row, y_row, start + cols, n, C)
        xs = (x - mx) * it
        ys = (y - my) * it
        a = tl.exp(xs)
        b = tl.exp(ys)
        zpv += a
        zqv += b
        if ACC_KL:
            sdv += tl.where(a > 0, a * (xs - ys), 0.0)
    zp = tl.sum(zpv, axis=0)
    zq = tl.sum(zqv, axis=0)
    sd = tl.sum(sdv, axis=0)
    # Z == 0 only on an all -inf side (dead row, result discarded); NaN stays NaN
    zp = tl.where(zp == 0, 1.0, zp)
    zq = tl.where(zq == 0, 1.0, zq)
    return mx, my, tl.log(zp), tl.log(zq), 1.0 / zp, 1.0 / zq, sd, dead, has_nan, mx_raw, my_raw


@triton.jit
def _tile(x_row, y_row, offs, n, mx, my, lzp, lzq, izp, izq, it, C: tl.constexpr):
    """p, q, log p, log q on one tile (p = q = 0, lp = lq = -inf past the row end)."""
    x, y = _load_pair(x_row, y_row, offs, n, C)
    xs = (x - mx) * it
    ys = (y - my) * it
    return tl.exp(xs) * izp, tl.exp(ys) * izq, xs - lzp, ys - lzq


@triton.jit
def _log_mix(lp, lq, log_w, log_1mw):
    # log(w p + (1-w) q) = logaddexp(log w + lp, log(1-w) + lq); -inf when both are -inf
    # (the max is replaced by 0 inside the exp so that -inf - -inf never occurs).
    u = log_w + lp
    v = log_1mw + lq
    hi = tl.maximum(u, v)
    lo = tl.minimum(u, v)
    hi_s = tl.where(hi == float("-inf"), 0.0, hi)
    return hi + tl.log(1.0 + tl.exp(lo - hi_s))


@triton.jit
def _finish(v, dead, has_nan):
    v = tl.where(dead, 0.0, v)
    return tl.where(has_nan, float("nan"), v)


@triton.jit
def _store_grad(g_row, offs, V, g, dead, has_nan):
    g = _finish(g, dead, has_nan)
    tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=offs < V)


@triton.jit
def _store_stats(st_ptr, row, n, mx_raw, my_raw, lzp, lzq, L, s0, s1, s2, dead, has_nan):
    """stats[row] = (mx, my, log Zp, log Zq, L, s0, s1, s2) (csrc/registration.cpp), as the
    CPU kernel: zeros for a masked row (n == 0); NaN maxima (and loss) for a row with a NaN;
    the maxima as read (one of them -inf) and zeros for a dead row."""
    base = st_ptr + row * 8
    off = dead | has_nan
    masked = n == 0
    nan = float("nan")
    tl.store(base + 0, tl.where(masked, 0.0, tl.where(has_nan, nan, mx_raw)))
    tl.store(base + 1, tl.where(masked, 0.0, tl.where(has_nan, nan, my_raw)))
    tl.store(base + 2, tl.where(off, 0.0, lzp))
    tl.store(base + 3, tl.where(off, 0.0, lzq))
    tl.store(base + 4, _finish(L, dead, has_nan))
    tl.store(base + 5, tl.where(off, 0.0, s0))
    tl.store(base + 6, tl.where(off, 0.0, s1))
    tl.store(base + 7, tl.where(off, 0.0, s2))


# =====================================================================================
# KL family: L = KL(P || Q)
# =====================================================================================
# With a = x/T, b = y/T, p = softmax(a), q = softmax(b), and the shifted logits
# xs = (x - mx)/T, ys = (y - my)/T, ep = exp(xs), Zp = sum ep (likewise eq, Zq):
#   log p = xs - log Zp,  log q = ys - log Zq
#   L = sum_j p_j (log p_j - log q_j) = (1/Zp) sum_j ep_j (xs_j - ys_j) - log Zp + log Zq
# which accumulates in pass 2 (xlogy rule: terms with ep_j == 0 are 0).
# Gradients, from dL/dlogit_i = (G_i - p_i sum_j G_j)/T with G = dL/dlog p (log-softmax
# Jacobian):
#   w.r.t. log q: G^q = -p, sum G^q = -1            ->  dL/dy = (q - p)/T
#   w.r.t. log p: G^p = p (log p - log q + 1), sum G^p = L + 1
#                                                   ->  dL/dx = p (log p - log q - L)/T
# forward_kl is (P, Q) = (teacher, student); reverse_kl is (student, teacher).
@triton.jit
def _kd_kl_kernel(x_ptr, y_ptr, gx_ptr, gy_ptr, loss_ptr, st_ptr, valid_ptr, grow_ptr, prm_ptr,
                  V, HAS_VALID: tl.constexpr, HAS_SCALE: tl.constexpr,
                  STORE_LOSS: tl.constexpr, STORE_STATS: tl.constexpr, WANT_GX: tl.constexpr,
                  WANT_GY: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    it = tl.load(prm_ptr + 0)
    n, gsc = _row_setup(row, V, it, valid_ptr, grow_ptr, HAS_VALID, HAS_SCALE)
    mx, my, lzp, lzq, izp, izq, sd, dead, has_nan, mx_raw, my_raw = _row_stats(
        x_ptr + base, y_ptr + base, n, it, C, BLOCK, True)
    L = sd * izp + lzq - lzp
    if STORE_LOSS:
        tl.store(loss_ptr + row, _finish(L, dead, has_nan))
    if STORE_STATS:
        _store_stats(st_ptr, row, n, mx_raw, my_raw, lzp, lzq, L, 0.0, 0.0, 0.0, dead, has_nan)
    if WANT_GX or WANT_GY:
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            offs = start + cols
            p, q, lp, lq = _tile(x_ptr + base, y_ptr + base, offs, n, mx, my, lzp, lzq,
                                 izp, izq, it, C)
            if WANT_GY:
                _store_grad(gy_ptr + base, offs, V, (q - p) * gsc, dead, has_nan)
            if WANT_GX:
                gx = tl.where(p > 0, p * (lp - lq - L) * gsc, 0.0)
                _store_grad(gx_ptr + base, offs, V, gx, dead, has_nan)


# =====================================================================================
# SKEW family: L = KL(P || M), M = w P + (1-w) Q, w in (0, 1]
# =====================================================================================
#   log m_j = logaddexp(log w + log p_j, log(1-w) + log q_j)
#   L = sum_j p_j (log p_j - log m_j)                              (xlogy rule on p)
# dlog m_j / dlog p_j = w p_j/m_j = 1 - rho_j, dlog m_j / dlog q_j = rho_j, where
#   rho_j = (1-w) q_j / m_j = exp(log(1-w) + log q_j - log m_j) in [0, 1] (0 where q_j = 0).
# So G^q_j = -p_j rho_j and G^p_j = p_j (log p_j - log m_j + 1) - p_j (1 - rho_j)
#          = p_j (log p_j - log m_j + rho_j); with S = sum_j p_j rho_j:
#   sum G^q = -S,  sum G^p = L + S, and the log-softmax Jacobian gives
#   dL/dy = (q S - p rho)/T
#   dL/dx = p (log p - log m + rho - L - S)/T
# Pass 3 accumulates L and S; the gradient pass recomputes log m and rho.
# skew_forward_kl is (P, Q) = (teacher, student); skew_reverse_kl is (student, teacher).
@triton.jit
def _kd_skew_kernel(x_ptr, y_ptr, gx_ptr, gy_ptr, loss_ptr, st_ptr, valid_ptr, grow_ptr, prm_ptr,
                    V, HAS_VALID: tl.constexpr, HAS_SCALE: tl.constexpr,
                    STORE_LOSS: tl.constexpr, STORE_STATS: tl.constexpr, WANT_GX: tl.constexpr,
                    WANT_GY: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    it = tl.load(prm_ptr + 0)
    log_w = tl.load(prm_ptr + 2)
    log_1mw = tl.load(prm_ptr + 3)
    n, gsc = _row_setup(row, V, it, valid_ptr, grow_ptr, HAS_VALID, HAS_SCALE)
    mx, my, lzp, lzq, izp, izq, sd, dead, has_nan, mx_raw, my_raw = _row_stats(
        x_ptr + base, y_ptr + base, n, it, C, BLOCK, False)
    cols = tl.arange(0, BLOCK)
    # pass 3: L and S
    acc_l = tl.zeros([BLOCK], C)
    acc_s = tl.zeros([BLOCK], C)
    for start in range(0, n, BLOCK):
        p, q, lp, lq = _tile(x_ptr + base, y_ptr + base, start + cols, n, mx, my, lzp, lzq,
                             izp, izq, it, C)
        lm = _log_mix(lp, lq, log_w, log_1mw)
        rho = tl.where(q > 0, tl.exp(log_1mw + lq - lm), 0.0)
        acc_l += tl.where(p > 0, p * (lp - lm), 0.0)
        acc_s += p * rho
    L = tl.sum(acc_l, axis=0)
    S = tl.sum(acc_s, axis=0)
    if STORE_LOSS:
        tl.store(loss_ptr + row, _finish(L, dead, has_nan))
    if STORE_STATS:
        _store_stats(st_ptr, row, n, mx_raw, my_raw, lzp, lzq, L, L, S, 0.0, dead, has_nan)
    if WANT_GX or WANT_GY:
        for start in range(0, V, BLOCK):
            offs = start + cols
            p, q, lp, lq = _tile(x_ptr + base, y_ptr + base, offs, n, mx, my, lzp, lzq,
                                 izp, izq, it, C)
            lm = _log_mix(lp, lq, log_w, log_1mw)
            rho = tl.where(q > 0, tl.exp(log_1mw + lq - lm), 0.0)
            if WANT_GY:
                _store_grad(gy_ptr + base, offs, V, (q * S - p * rho) * gsc, dead, has_nan)
            if WANT_GX:
                gx = tl.where(p > 0, p * (lp - lm + rho - L - S) * gsc, 0.0)
                _store_grad(gx_ptr + base, offs, V, gx, dead, has_nan)


# =====================================================================================
# JSD family: L = w KL(P || M) + (1-w) KL(Q || M), M = w P + (1-w) Q, w in (0, 1)
# =====================================================================================
#   Kp = sum p (log p - log m),  Kq = sum q (log q - log m)   (xlogy rule on p resp. q)
#   L = w Kp + (1-w) Kq
# With dlog m/dlog p = w p/m, dlog m/dlog q = (1-w) q/m and sum over both KL terms:
#   G^p_j = w p_j (log p_j - log m_j + 1) - [w p_j + (1-w) q_j] * w p_j / m_j
#         = w p_j (log p_j - log m_j)               (the bracket is m_j),
# likewise G^q_j = (1-w) q_j (log q_j - log m_j); sum G^p = w Kp, sum G^q = (1-w) Kq, so
#   dL/dx = w p (log p - log m - Kp)/T,   dL/dy = (1-w) q (log q - log m - Kq)/T
# (the pre-Jacobian G^q matches Liger's (1-beta) Q (X - log M)). jsd is (P, Q) =
# (teacher, student), w = beta; beta = 0 / 1 are dispatched to forward / reverse KL.
@triton.jit
def _kd_jsd_kernel(x_ptr, y_ptr, gx_ptr, gy_ptr, loss_ptr, st_ptr, valid_ptr, grow_ptr, prm_ptr,
                   V, HAS_VALID: tl.constexpr, HAS_SCALE: tl.constexpr,
                   STORE_LOSS: tl.constexpr, STORE_STATS: tl.constexpr, WANT_GX: tl.constexpr,
                   WANT_GY: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    it = tl.load(prm_ptr + 0)
    w = tl.load(prm_ptr + 1)
    log_w = tl.load(prm_ptr + 2)
    log_1mw = tl.load(prm_ptr + 3)
    n, gsc = _row_setup(row, V, it, valid_ptr, grow_ptr, HAS_VALID, HAS_SCALE)
    mx, my, lzp, lzq, izp, izq, sd, dead, has_nan, mx_raw, my_raw = _row_stats(
        x_ptr + base, y_ptr + base, n, it, C, BLOCK, False)
    cols = tl.arange(0, BLOCK)
    # pass 3: Kp and Kq
    acc_p = tl.zeros([BLOCK], C)
    acc_q = tl.zeros([BLOCK], C)
    for start in range(0, n, BLOCK):
        p, q, lp, lq = _tile(x_ptr + base, y_ptr + base, start + cols, n, mx, my, lzp, lzq,
                             izp, izq, it, C)
        lm = _log_mix(lp, lq, log_w, log_1mw)
        acc_p += tl.where(p > 0, p * (lp - lm), 0.0)
        acc_q += tl.where(q > 0, q * (lq - lm), 0.0)
    kp = tl.sum(acc_p, axis=0)
    kq = tl.sum(acc_q, axis=0)
    L = w * kp + (1.0 - w) * kq
    if STORE_LOSS:
        tl.store(loss_ptr + row, _finish(L, dead, has_nan))
    if STORE_STATS:
        _store_stats(st_ptr, row, n, mx_raw, my_raw, lzp, lzq, L, kp, kq, 0.0, dead, has_nan)
    if WANT_GX or WANT_GY:
        for start in range(0, V, BLOCK):
            offs = start + cols
            p, q, lp, lq = _tile(x_ptr + base, y_ptr + base, offs, n, mx, my, lzp, lzq,
                                 izp, izq, it, C)
            lm = _log_mix(lp, lq, log_w, log_1mw)
            if WANT_GX:
                gx = tl.where(p > 0, w * p * (lp - lm - kp) * gsc, 0.0)
                _store_grad(gx_ptr + base, offs, V, gx, dead, has_nan)
            if WANT_GY:
                gy = tl.where(q > 0, (1.0 - w) * q * (lq - lm - kq) * gsc, 0.0)
                _store_grad(gy_ptr + base, offs, V, gy, dead, has_nan)


# =====================================================================================
# TVD family: L = 1/2 sum_j |p_j - q_j|
# =====================================================================================
# With sigma_j = sign(q_j - p_j) (sign(0) = 0, the subgradient PyTorch's abs uses):
#   G^q_j = 1/2 q_j sigma_j,  G^p_j = -1/2 p_j sigma_j (dq_j/dlog q_j = q_j), so with
#   Sq = sum q sigma, Sp = sum p sigma:
#   dL/dy = 1/2 q (sigma - Sq)/T,   dL/dx = -1/2 p (sigma - Sp)/T
# Pass 3 accumulates sum |q - p|, Sq, Sp. tvd is (P, Q) = (teacher, student).
@triton.jit
def _kd_tvd_kernel(x_ptr, y_ptr, gx_ptr, gy_ptr, loss_ptr, st_ptr, valid_ptr, grow_ptr, prm_ptr,
                   V, HAS_VALID: tl.constexpr, HAS_SCALE: tl.constexpr,
                   STORE_LOSS: tl.constexpr, STORE_STATS: tl.constexpr, WANT_GX: tl.constexpr,
                   WANT_GY: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    it = tl.load(prm_ptr + 0)
    n, gsc = _row_setup(row, V, it, valid_ptr, grow_ptr, HAS_VALID, HAS_SCALE)
    mx, my, lzp, lzq, izp, izq, sd, dead, has_nan, mx_raw, my_raw = _row_stats(
        x_ptr + base, y_ptr + base, n, it, C, BLOCK, False)
    cols = tl.arange(0, BLOCK)
    acc_d = tl.zeros([BLOCK], C)
    acc_q = tl.zeros([BLOCK], C)
    acc_p = tl.zeros([BLOCK], C)
    for start in range(0, n, BLOCK):
        p, q, lp, lq = _tile(x_ptr + base, y_ptr + base, start + cols, n, mx, my, lzp, lzq,
                             izp, izq, it, C)
        diff = q - p
        sigma = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        acc_d += tl.abs(diff)
        acc_q += q * sigma
        acc_p += p * sigma
    sd_abs = tl.sum(acc_d, axis=0)
    L = 0.5 * sd_abs
    sq = tl.sum(acc_q, axis=0)
    sp = tl.sum(acc_p, axis=0)
    if STORE_LOSS:
        tl.store(loss_ptr + row, _finish(L, dead, has_nan))
    if STORE_STATS:
        _store_stats(st_ptr, row, n, mx_raw, my_raw, lzp, lzq, L, sd_abs, sq, sp, dead, has_nan)
    if WANT_GX or WANT_GY:
        for start in range(0, V, BLOCK):
            offs = start + cols
            p, q, lp, lq = _tile(x_ptr + base, y_ptr + base, offs, n, mx, my, lzp, lzq,
                                 izp, izq, it, C)
            diff = q - p
            sigma = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            if WANT_GY:
                _store_grad(gy_ptr + base, offs, V, 0.5 * q * (sigma - sq) * gsc, dead,
                            has_nan)
            if WANT_GX:
                _store_grad(gx_ptr + base, offs, V, -0.5 * p * (sigma - sp) * gsc, dead,
                            has_nan)


_KERNELS = {_KL: _kd_kl_kernel, _SKEW: _kd_skew_kernel, _JSD: _kd_jsd_kernel,
            _TVD: _kd_tvd_kernel}


# =====================================================================================
# Backward from the forward's statistics: one pass per row, every family
# =====================================================================================
# stats[row] = (mx, my, log Zp, log Zq, L, s0, s1, s2) (csrc/registration.cpp) replaces
# passes 1-3: each tile is read once, p = exp((x - mx)/T - log Zp) = exp(lp) (one exp per
# side), and the gradient formulas of the family kernels above take L and the row sums from
# the statistics (SKEW: S = s1; JSD: Kp = s0, Kq = s1; TVD: Sq = s1, Sp = s2). Rows: masked or
# with grad_rows == 0 (n == 0): zeros, their statistics are not read; a NaN maximum: NaN
# gradients; a -inf maximum: zeros; ZERO (SKEW with w = 1, KL(P || P) = 0): zeros (NaN rows
# still NaN), as the CPU kernel's divergence_row_backward.
@triton.jit
def _kd_grad_from_stats_kernel(x_ptr, y_ptr, gx_ptr, gy_ptr, st_ptr, valid_ptr, grow_ptr,
                               prm_ptr, V, FAM: tl.constexpr, HAS_VALID: tl.constexpr,
                               ZERO: tl.constexpr, WANT_GX: tl.constexpr,
                               WANT_GY: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    it = tl.load(prm_ptr + 0)
    w = tl.load(prm_ptr + 1)
    log_w = tl.load(prm_ptr + 2)
    log_1mw = tl.load(prm_ptr + 3)
    n, gsc = _row_setup(row, V, it, valid_ptr, grow_ptr, HAS_VALID, True)
    k8 = tl.arange(0, 8)
    # n == 0: nothing is read (a masked row's statistics may hold anything)
    stv = tl.load(st_ptr + row * 8 + k8, mask=k8 < tl.where(n > 0, 8, 0), other=0.0).to(C)
    mx = tl.sum(tl.where(k8 == 0, stv, 0.0), axis=0)
    my = tl.sum(tl.where(k8 == 1, stv, 0.0), axis=0)
    lzp = tl.sum(tl.where(k8 == 2, stv, 0.0), axis=0)
    lzq = tl.sum(tl.where(k8 == 3, stv, 0.0), axis=0)
    L = tl.sum(tl.where(k8 == 4, stv, 0.0), axis=0)
    s0 = tl.sum(tl.where(k8 == 5, stv, 0.0), axis=0)
    s1 = tl.sum(tl.where(k8 == 6, stv, 0.0), axis=0)
    s2 = tl.sum(tl.where(k8 == 7, stv, 0.0), axis=0)
    has_nan = (mx != mx) | (my != my)
    dead = (mx == float("-inf")) | (my == float("-inf")) | (n == 0)
    if ZERO:
        dead = dead | True
    # dead / NaN rows read nothing (all -inf tiles), with shifts that keep their discarded
    # arithmetic quiet; _store_grad writes their zeros / NaN
    quiet = dead | has_nan
    mx = tl.where(quiet, 0.0, mx)
    my = tl.where(quiet, 0.0, my)
    lzp = tl.where(quiet, 0.0, lzp)
    lzq = tl.where(quiet, 0.0, lzq)
    n = tl.where(quiet, 0, n)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x, y = _load_pair(x_ptr + base, y_ptr + base, offs, n, C)
        lp = (x - mx) * it - lzp
        lq = (y - my) * it - lzq
        p = tl.exp(lp)
        q = tl.exp(lq)
        if FAM == 0:  # KL
            gy = (q - p) * gsc
            gx = tl.where(p > 0, p * (lp - lq - L) * gsc, 0.0)
        elif FAM == 1:  # SKEW, S = s1
            lm = _log_mix(lp, lq, log_w, log_1mw)
            rho = tl.where(q > 0, tl.exp(log_1mw + lq - lm), 0.0)
            gy = (q * s1 - p * rho) * gsc
            gx = tl.where(p > 0, p * (lp - lm + rho - L - s1) * gsc, 0.0)
        elif FAM == 2:  # JSD, Kp = s0, Kq = s1
            lm = _log_mix(lp, lq, log_w, log_1mw)
            gx = tl.where(p > 0, w * p * (lp - lm - s0) * gsc, 0.0)
            gy = tl.where(q > 0, (1.0 - w) * q * (lq - lm - s1) * gsc, 0.0)
        else:  # TVD, Sq = s1, Sp = s2
            diff = q - p
            sigma = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            gy = 0.5 * q * (sigma - s1) * gsc
            gx = -0.5 * p * (sigma - s2) * gsc
        if WANT_GX:
            _store_grad(gx_ptr + base, offs, V, gx, dead, has_nan)
        if WANT_GY:
            _store_grad(gy_ptr + base, offs, V, gy, dead, has_nan)

# Interpreter mode is fixed when triton.jit decorated the kernels (TRITON_INTERPRET=1 at
# import time); only then may the kernels see CPU tensors.
INTERPRET = type(_kd_kl_kernel).__name__ == "InterpretedFunction"


# =====================================================================================
# Host side
# =====================================================================================

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _plan(divergence: str, beta: float) -> Tuple[int, bool, float]:
    """(family, teacher_is_p, w), exactly as plan_divergence in divergence.h."""
    if not 0.0 <= beta <= 1.0:
        raise RuntimeError(f"pydistill_ext: beta must lie in [0, 1], got {beta}")
    if divergence == "forward_kl":
        return _KL, True, 0.0
    if divergence == "reverse_kl":
        return _KL, False, 0.0
    if divergence == "jsd":
        if beta == 0.0:
            return _KL, True, 0.0
        if beta == 1.0:
            return _KL, False, 0.0
        return _JSD, True, beta
    if divergence == "skew_forward_kl":
        return (_KL, True, 0.0) if beta == 0.0 else (_SKEW, True, beta)
    if divergence == "skew_reverse_kl":
        return (_KL, False, 0.0) if beta == 0.0 else (_SKEW, False, beta)
    if divergence == "tvd":
        return _TVD, True, 0.0
    raise RuntimeError(f"pydistill_ext: unknown divergence '{divergence}'; expected one of "
                       "forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_floating(t: torch.Tensor, name: str):
    if t.dtype not in _FLOATS:
        raise RuntimeError(f"pydistill_ext: {name} must be float64, float32, float16 or "
                           f"bfloat16, got {t.dtype}")


def _check_same_device(a, an, b, bn):
    if a.device != b.device:
        raise RuntimeError(f"pydistill_ext: {bn} is on {b.device} but {an} is on {a.device}; "
                           "both must be on the same device")


def _check_runnable(t: torch.Tensor):
    if t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu"):
        return
    raise RuntimeError(
        f"pydistill_ext: the Triton kd_loss kernels need CUDA tensors, got a tensor on "
        f"{t.device}; CPU tensors run only under the Triton interpreter (set "
        "TRITON_INTERPRET=1 before triton is first imported), otherwise use the native backend")


def _check_temperature(temperature: float):
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise RuntimeError(f"pydistill_ext: temperature must be finite and > 0, got {temperature}")


def _check_valid(valid: Optional[torch.Tensor], ref: torch.Tensor, rows: int):
    if valid is None:
        return
    if valid.dtype != torch.bool:
        raise RuntimeError(f"pydistill_ext: valid must be a bool mask, got {valid.dtype}")
    if valid.numel() != rows:
        raise RuntimeError(f"pydistill_ext: valid must have one entry per row ({rows}), got "
                           f"{valid.numel()}")
    _check_same_device(ref, "student_logits", valid, "valid")


def _check_grad_rows(grad_rows: Optional[torch.Tensor], ref: torch.Tensor, rows: int):
    if grad_rows is None:
        return
    # V == 0: nothing to scale, any count passes (as the native dense op; rows is 0 there
    # while the loss has the leading shape)
    if grad_rows.numel() != rows and ref.shape[-1] != 0:
        raise RuntimeError("pydistill_ext: grad_rows must have one entry per row")
    _check_same_device(ref, "student_logits", grad_rows, "grad_rows")


STATS = 8  # (mx, my, log Zp, log Zq, L, s0, s1, s2) per row: csrc/registration.cpp
# c10 names of the compute dtypes, so that the messages are the native kernels' verbatim
_C10_NAME = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
             torch.bfloat16: "BFloat16"}


def _check_stats(stats: Optional[torch.Tensor], ref: torch.Tensor, compute: torch.dtype):
    """The optional statistics of a backward: 8 values per row (rows: the leading numel of
    the logits), the compute dtype, the logits' device. Returns them as [rows, 8] contiguous."""
    if stats is None:
        return None
    rows = math.prod(ref.shape[:-1])
    if stats.numel() != rows * STATS:
        raise RuntimeError(f"pydistill_ext: stats must hold {STATS} values per row "
                           f"({rows * STATS}), got {stats.numel()}")
    if stats.dtype != compute:
        raise RuntimeError(f"pydistill_ext: stats must be {_C10_NAME[compute]} (the compute "
                           f"dtype of the logits), got {_C10_NAME.get(stats.dtype, stats.dtype)}")
    _check_same_device(ref, "student_logits", stats, "stats")
    return stats.contiguous().view(rows, STATS)


def _stats_out(student: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """The forward's statistics [..., 8]: zeros, then every launched row is written."""
    return torch.zeros(tuple(student.shape[:-1]) + (STATS,), dtype=compute,
                       device=student.device)


def _block_for(V: int, dtype: torch.dtype) -> int:
    cap = _BLOCK_CAP if _BLOCK_CAP is not None else _MAX_BLOCK.get(dtype, _DEFAULT_MAX_BLOCK)
    return max(16, min(triton.next_power_of_2(max(V, 1)), triton.next_power_of_2(cap)))


def _num_warps(block: int) -> int:
    return 4 if block <= 512 else (8 if block <= 2048 else 16)


def _launch_rows(x, y, gx, gy, loss, valid_u8, grow, family, w, temperature, compute,
                 stats=None, stats_in=None):
    """Runs the family kernel on 2-D contiguous rows x, y [n, V] (P and Q logits, possibly of
    different dtypes). gx / gy: [n, V] gradient outputs or None; loss: [n] in the compute
    dtype or None (backward); valid_u8: [n] uint8 or None; grow: [n] per-row gradient scale
    in the compute dtype or None (forward); stats: [n, 8] statistics out (forward) or None;
    stats_in: [n, 8] the forward's statistics (backward): the one-pass gradient kernel."""
    n_rows, V = x.shape
    if n_rows == 0:
        return
    log_w = math.log(w) if w > 0 else -math.inf
    log_1mw = math.log1p(-w) if w < 1 else -math.inf
    prm = torch.tensor([1.0 / temperature, w, log_w, log_1mw], dtype=compute, device=x.device)
    block = _block_for(V, compute)
    C = tl.float64 if compute == torch.float64 else tl.float32
    # pointers that a constexpr flag keeps from being dereferenced get a placeholder
    if stats_in is not None:
        kernel = _kd_grad_from_stats_kernel
        args = (x, y, prm if gx is None else gx, prm if gy is None else gy, stats_in,
                prm if valid_u8 is None else valid_u8, grow, prm, V)
        kw = dict(FAM=family, HAS_VALID=valid_u8 is not None,
                  ZERO=family == _SKEW and w == 1.0, WANT_GX=gx is not None,
                  WANT_GY=gy is not None, C=C, BLOCK=block, num_warps=_num_warps(block))
    else:
        kernel = _KERNELS[family]
        args = (x, y, prm if gx is None else gx, prm if gy is None else gy,
                prm if loss is None else loss, prm if stats is None else stats,
                prm if valid_u8 is None else valid_u8, prm if grow is None else grow, prm, V)
        kw = dict(HAS_VALID=valid_u8 is not None, HAS_SCALE=grow is not None,
                  STORE_LOSS=loss is not None, STORE_STATS=stats is not None,
                  WANT_GX=gx is not None, WANT_GY=gy is not None, C=C, BLOCK=block,
                  num_warps=_num_warps(block))
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            kernel[(n_rows,)](*args, **kw)
    else:
        # Interpreter (numpy): the select-based rules evaluate discarded lanes such as
        # -inf - -inf; silence numpy's floating-point warnings about them.
        import numpy as np
        with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
            kernel[(n_rows,)](*args, **kw)


def _run_rows(s2, t2, valid_u8, grow, plan, temperature, compute, loss, gs, gt, stats=None,
              stats_in=None):
    """Maps (student, teacher) rows onto (P, Q) and launches."""
    family, teacher_is_p, w = plan
    if teacher_is_p:
        _launch_rows(t2, s2, gt, gs, loss, valid_u8, grow, family, w, temperature, compute,
                     stats, stats_in)
    else:
        _launch_rows(s2, t2, gs, gt, loss, valid_u8, grow, family, w, temperature, compute,
                     stats, stats_in)


def _valid_u8(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if valid is None else valid.reshape(-1).contiguous().view(torch.uint8)


def _dense(student, teacher, valid, divergence, beta, temperature, grad_student, grad_teacher,
           grad_rows, stats_in=None):
    """Shared body of the dense forward (grad_rows None; returns loss, gradients, statistics)
    and backward ops (stats_in: the forward's statistics or None)."""
    _check_floating(student, "student_logits")
    _check_floating(teacher, "teacher_logits")
    if student.dim() < 1:
        raise RuntimeError("pydistill_ext: student_logits must have a vocabulary dim")
    if student.shape != teacher.shape:
        raise RuntimeError(f"pydistill_ext: teacher_logits shape {list(teacher.shape)} must "
                           f"equal student_logits shape {list(student.shape)}")
    if student.dtype != teacher.dtype:
        raise RuntimeError(f"pydistill_ext: teacher_logits dtype {teacher.dtype} must equal "
                           f"student_logits dtype {student.dtype}")
    _check_same_device(student, "student_logits", teacher, "teacher_logits")
    _check_temperature(temperature)
    plan = _plan(divergence, beta)
    V = student.shape[-1]
    N = 0 if V == 0 else student.numel() // V
    _check_valid(valid, student, N)
    _check_grad_rows(grad_rows, student, N)
    compute = _compute_dtype(student.dtype)
    st_in = _check_stats(stats_in, student, compute)
    _check_runnable(student)

    backward = grad_rows is not None
    loss = torch.zeros((0,) if backward else student.shape[:-1], dtype=compute,
                       device=student.device)
    stats = torch.zeros((0,), dtype=compute, device=student.device) if backward \
        else _stats_out(student, compute)
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student \
        else student.new_empty((0,))
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if grad_teacher \
        else teacher.new_empty((0,))
    if N == 0 or (backward and not (grad_student or grad_teacher)):
        gs.zero_()
        gt.zero_()
        return loss, gs, gt, stats
    grow = grad_rows.reshape(-1).to(compute).contiguous() if backward else None
    _run_rows(student.contiguous().view(N, V), teacher.contiguous().view(N, V),
              _valid_u8(valid), grow, plan, temperature, compute,
              None if backward else loss.view(N),
              gs.view(N, V) if grad_student else None,
              gt.view(N, V) if grad_teacher else None,
              None if backward else stats.view(N, STATS), st_in)
    return loss, gs, gt, stats


def _check_topk_indices(idx2: torch.Tensor, V: int):
    """Range and per-row distinctness of the [N, K] int64 indices (one host sync)."""
    if idx2.numel() == 0:
        return
    srt = idx2.sort(dim=1).values
    dup = srt[:, 1:] == srt[:, :-1]
    lo, hi, has_dup = torch.stack([srt[:, 0].min(), srt[:, -1].max(),
                                   dup.any().to(torch.int64)]).tolist()
    if lo < 0 or hi >= V:
        raise RuntimeError(f"pydistill_ext: teacher_indices must lie in [0, {V}), got values "
                           f"in [{lo}, {hi}]")
    if has_dup:
        r, k = (int(v) for v in dup.nonzero()[0])
        raise RuntimeError(f"pydistill_ext: teacher_indices row {r} repeats vocabulary index "
                           f"{int(srt[r, k])}; the K indices must be distinct")


def _topk(student, indices, teacher_topk, valid, divergence, beta, temperature, grad_student,
          grad_teacher, grad_rows, stats_in=None):
    """Shared body of the top-k forward (grad_rows None; returns loss, gradients, statistics)
    and backward ops (stats_in: the forward's statistics or None)."""
    _check_floating(student, "student_logits")
    _check_floating(teacher_topk, "teacher_logits_topk")
    if indices.dtype not in (torch.int64, torch.int32):
        raise RuntimeError("pydistill_ext: teacher_indices must be int64 or int32, got "
                           f"{indices.dtype}")
    if student.dim() < 1:
        raise RuntimeError("pydistill_ext: student_logits must have a vocabulary dim")
    if indices.shape != teacher_topk.shape:
        raise RuntimeError(f"pydistill_ext: teacher_indices shape {list(indices.shape)} must "
                           f"equal teacher_logits_topk shape {list(teacher_topk.shape)}")
    if indices.dim() != student.dim() or indices.shape[:-1] != student.shape[:-1]:
        raise RuntimeError(f"pydistill_ext: teacher_indices shape {list(indices.shape)} must "
                           f"match student_logits {list(student.shape)} in all but the last dim")
    _check_same_device(student, "student_logits", indices, "teacher_indices")
    _check_same_device(student, "student_logits", teacher_topk, "teacher_logits_topk")
    _check_temperature(temperature)
    plan = _plan(divergence, beta)
    if plan[0] == _KL and not plan[1]:
        raise RuntimeError(f"pydistill_ext: divergence '{divergence}' is infinite for a top-k "
                           "teacher (zero mass off its K entries); use jsd, skew_reverse_kl, "
                           "forward_kl or tvd")
    V = student.shape[-1]
    K = indices.shape[-1]
    if K > V:
        raise RuntimeError(f"pydistill_ext: top-k size K={K} exceeds the vocabulary V={V}")
    N = 0 if V == 0 else student.numel() // V
    _check_valid(valid, student, N)
    _check_grad_rows(grad_rows, student, N)
    compute = _compute_dtype(student.dtype)
    st_in = _check_stats(stats_in, student, compute)
    idx2 = indices.reshape(N, K).to(torch.int64)
    _check_topk_indices(idx2, V)
    _check_runnable(student)

    dev = student.device
    backward = grad_rows is not None
    loss = torch.zeros((0,) if backward else student.shape[:-1], dtype=compute, device=dev)
    stats = torch.zeros((0,), dtype=compute, device=dev) if backward \
        else _stats_out(student, compute)
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student \
        else student.new_empty((0,))
    gt = torch.zeros(indices.shape, dtype=compute, device=dev) if grad_teacher \
        else torch.empty((0,), dtype=compute, device=dev)
    if N == 0 or (backward and not (grad_student or grad_teacher)):
        gs.zero_()
        return loss, gs, gt.to(teacher_topk.dtype), stats

    s2 = student.contiguous().view(N, V)
    tk2 = teacher_topk.reshape(N, K).to(compute)
    v_u8 = _valid_u8(valid)
    grow = grad_rows.reshape(-1).to(compute).contiguous() if backward else None
    gs2 = gs.view(N, V) if grad_student else None
    gt2 = gt.view(N, K) if grad_teacher else None
    per_row = V * (torch.finfo(compute).bits // 8) * (2 if grad_teacher else 1)
    chunk = max(1, min(N, _TOPK_CHUNK_BYTES // max(per_row, 1)))
    dense = torch.empty((chunk, V), dtype=compute, device=dev)
    gdense = torch.empty((chunk, V), dtype=compute, device=dev) if grad_teacher else None
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        d = dense[:r1 - r0]
        d.fill_(-math.inf)
        d.scatter_(1, idx2[r0:r1], tk2[r0:r1])
        gd = gdense[:r1 - r0] if grad_teacher else None
        _run_rows(s2[r0:r1], d, None if v_u8 is None else v_u8[r0:r1],
                  None if grow is None else grow[r0:r1], plan, temperature, compute,
                  None if backward else loss.view(N)[r0:r1],
                  None if gs2 is None else gs2[r0:r1], gd,
                  None if backward else stats.view(N, STATS)[r0:r1],
                  None if st_in is None else st_in[r0:r1])
        if grad_teacher:
            gt2[r0:r1] = gd.gather(1, idx2[r0:r1])
    return loss, gs, gt.to(teacher_topk.dtype), stats


# =====================================================================================
# Custom ops
# =====================================================================================

@torch.library.custom_op("pydistill_ext::kd_loss_forward_triton", mutates_args=())
def kd_loss_forward_triton(student: torch.Tensor, teacher: torch.Tensor,
                           valid: Optional[torch.Tensor], divergence: str, beta: float,
                           temperature: float, grad_student: bool, grad_teacher: bool,
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernel of pydistill_ext::kd_loss_forward (same arguments and outputs: row loss,
    gradients, statistics [..., 8])."""
    return _dense(student, teacher, valid, divergence, beta, temperature, grad_student,
                  grad_teacher, None)


kd_loss_forward_triton.register_fake(_native._kd_loss_forward_fake)  # same shapes as the native op


# device_types: registered per backend key, so that make_autograd sees a CUDA kernel for it
@torch.library.custom_op("pydistill_ext::kd_loss_backward_triton", mutates_args=(),
                         device_types=("cpu", "cuda"))
def kd_loss_backward_triton(grad_rows: torch.Tensor, student: torch.Tensor,
                            teacher: torch.Tensor, valid: Optional[torch.Tensor],
                            stats: Optional[torch.Tensor], divergence: str, beta: float,
                            temperature: float, grad_student: bool,
                            grad_teacher: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel of pydistill_ext::kd_loss_backward: grad_rows[r] * d row_loss[r] / d
    logits for the requested sides (empty [0] otherwise); with the forward's statistics in
    one pass per row, without them recomputing the rows."""
    _, gs, gt, _ = _dense(student, teacher, valid, divergence, beta, temperature, grad_student,
                          grad_teacher, grad_rows, stats)
    return gs, gt


kd_loss_backward_triton.register_fake(_native._kd_loss_backward_fake)  # same shapes as the native op


@torch.library.custom_op("pydistill_ext::kd_loss_topk_forward_triton", mutates_args=())
def kd_loss_topk_forward_triton(student: torch.Tensor, teacher_indices: torch.Tensor,
                                teacher_logits: torch.Tensor, valid: Optional[torch.Tensor],
                                divergence: str, beta: float, temperature: float,
                                grad_student: bool, grad_teacher: bool,
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernel of pydistill_ext::kd_loss_topk_forward (same arguments and outputs)."""
    return _topk(student, teacher_indices, teacher_logits, valid, divergence, beta,
                 temperature, grad_student, grad_teacher, None)


kd_loss_topk_forward_triton.register_fake(_native._kd_loss_topk_forward_fake)  # same shapes as the native op


@torch.library.custom_op("pydistill_ext::kd_loss_topk_backward_triton", mutates_args=(),
                         device_types=("cpu", "cuda"))
def kd_loss_topk_backward_triton(grad_rows: torch.Tensor, student: torch.Tensor,
                                 teacher_indices: torch.Tensor, teacher_logits: torch.Tensor,
                                 valid: Optional[torch.Tensor], stats: Optional[torch.Tensor],
                                 divergence: str, beta: float, temperature: float,
                                 grad_student: bool,
                                 grad_teacher: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel of pydistill_ext::kd_loss_topk_backward (stats as the dense op)."""
    _, gs, gt, _ = _topk(student, teacher_indices, teacher_logits, valid, divergence, beta,
                         temperature, grad_student, grad_teacher, grad_rows, stats)
    return gs, gt


kd_loss_topk_backward_triton.register_fake(_native._kd_loss_topk_backward_fake)  # same shapes as the native op


# The autograd of the native ops (the forward keeps its inputs and statistics, the backward
# runs the one-pass gradient kernel), with the Triton backward ops.
for _topk_flag, _fwd, _bwd in (
        (False, kd_loss_forward_triton, torch.ops.pydistill_ext.kd_loss_backward_triton),
        (True, kd_loss_topk_forward_triton, torch.ops.pydistill_ext.kd_loss_topk_backward_triton)):
    _setup, _bw = make_autograd(_topk_flag, _fwd, _bwd)
    _fwd.register_autograd(_bw, setup_context=_setup)
del _topk_flag, _fwd, _bwd, _setup, _bw
