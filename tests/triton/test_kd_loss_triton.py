"""Triton kd_loss kernels (pydistill_ext/triton/kd_loss.py) against the float64 oracle.

On a machine without CUDA these run under the Triton interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 in the environment before triton is first imported:

    TRITON_INTERPRET=1 python -m pytest tests/triton -q

(run this directory in its own pytest invocation). Shapes are tiny: the interpreter costs
milliseconds per program and tile. Most tests cap the tile width at 16 so that a 37-wide row
runs the multi-tile loops with a ragged tail (16 + 16 + 5).

Gradient oracle: float64 autograd through python/reference/kd_loss.py. Where the inputs hold
-inf logits (masked vocabulary, the off-top-k teacher entries) the oracle is given a finite
stand-in (-1e5, whose probability is exactly 0 in float64 for the temperatures used): the
same loss and the exact limit gradient, with no -inf arithmetic inside autograd.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device, and TRITON_INTERPRET=1 is not set in the environment (it "
                "must be set before triton is imported to run the Triton kernels on CPU): "
                "run `TRITON_INTERPRET=1 pytest tests/triton`", allow_module_level=True)

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from pydistill_ext import kd_loss, kd_loss_topk  # noqa: E402
from pydistill_ext._lib import has_kernel, ops  # noqa: E402
from pydistill_ext.triton import kd_loss as tkd  # noqa: E402
from reference import kd_loss as ref  # noqa: E402

if not tkd.INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no CUDA device",
                allow_module_level=True)

pytestmark = pytest.mark.triton

DEV = torch.device("cpu") if tkd.INTERPRET else torch.device("cuda")
DIVS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TOPK_DIVS = ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
BETA = 0.3

# (rtol, atol) of the loss and of the gradients against the float64 oracle, per input dtype.
# bfloat16: the kernel computes in float32, but the loss is returned and the gradient stored
# in bfloat16 (8 significant bits) and scaled by a bfloat16 grad_output.
TOL = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-3),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tile width 16: a 37-wide row takes three tiles, the last one ragged."""
    monkeypatch.setattr(tkd, "_BLOCK_CAP", 16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(shape, dtype, seed, scale=2.0):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(DEV)


def _finite(x):
    """float64 copy with -inf replaced by a finite stand-in (see the module docstring)."""
    x = x.detach().double().cpu()
    return x.masked_fill(torch.isneginf(x), -1e5)


def _oracle(student, teacher, divergence, beta, temperature, valid=None, gout=None):
    """Rows and d(sum_r gout_r * row_r)/d(student, teacher) in float64."""
    s = _finite(student).requires_grad_()
    t = _finite(teacher).requires_grad_()
    rows = ref.divergence_rows(s, t, divergence, beta, temperature)
    if valid is not None:
        rows = torch.where(valid.cpu(), rows, torch.zeros_like(rows))
    w = torch.ones_like(rows) if gout is None else gout.detach().double().cpu()
    gs, gt = torch.autograd.grad((rows * w).sum(), (s, t), materialize_grads=True)
    return rows.detach(), gs, gt


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.detach().double().cpu(), expected.double(), rtol=rtol,
                               atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _labels(n, masked, seed=0):
    if not masked:
        return None
    lab = torch.randint(0, 10, (n,), generator=_gen(seed))
    lab[1::3] = -100
    return lab.to(DEV)


def _stats_close(got, want, valid=None, rtol=1e-5, atol=1e-6):
    """Statistics [..., 8] of two backends: rows that count and hold no NaN agree value by
    value (the maxima exactly, -inf included); a NaN row has a NaN maximum in both. The
    statistics of masked rows are unspecified."""
    got, want = got.detach().cpu().reshape(-1, 8), want.detach().cpu().reshape(-1, 8)
    keep = torch.ones(got.shape[0], dtype=torch.bool) if valid is None \
        else valid.cpu().reshape(-1)
    nan_rows = torch.isnan(want[:, :2]).any(1)
    assert torch.equal(torch.isnan(got[:, :2]).any(1)[keep], nan_rows[keep]), "NaN rows"
    ok = keep & ~nan_rows
    assert torch.equal(got[ok, :2], want[ok, :2]), "row maxima"
    torch.testing.assert_close(got[ok], want[ok], rtol=rtol, atol=atol)


# ---------------------------------------------------------------- dense op vs the oracle

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVS)
def test_dense_matches_oracle(divergence, dtype, temperature, masked, small_tiles):
    N, V = 5, 37
    s = _logits((N, V), dtype, 1).requires_grad_()
    t = _logits((N, V), dtype, 2).requires_grad_()
    labels = _labels(N, masked)
    gout = (torch.rand(N, generator=_gen(3), dtype=torch.float64) + 0.5).to(dtype).to(DEV)
    out = kd_loss(s, t, divergence=divergence, beta=BETA, temperature=temperature,
                  reduction="none", labels=labels, _backend="triton")
    assert out.dtype == dtype and out.shape == (N,)
    (out * gout).sum().backward()
    valid = None if labels is None else labels != -100
    rows, gs, gt = _oracle(s, t, divergence, BETA, temperature, valid, gout)
    _close(out, rows, dtype, "loss")
    _close(s.grad, gs, dtype, "grad_student")
    _close(t.grad, gt, dtype, "grad_teacher")
    if masked:
        assert torch.all(out[~valid] == 0)
        assert torch.all(s.grad[~valid] == 0) and torch.all(t.grad[~valid] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("divergence,beta", [("jsd", 0.0), ("jsd", 1.0),
                                             ("skew_forward_kl", 0.0), ("skew_forward_kl", 1.0),
                                             ("skew_reverse_kl", 0.0), ("skew_reverse_kl", 1.0)])
def test_beta_endpoints(divergence, beta, dtype):
    s = _logits((3, 19), dtype, 4).requires_grad_()
    t = _logits((3, 19), dtype, 5).requires_grad_()
    out = kd_loss(s, t, divergence=divergence, beta=beta, temperature=1.5, reduction="none",
                  _backend="triton")
    out.sum().backward()
    rows, gs, gt = _oracle(s, t, divergence, beta, 1.5)
    _close(out, rows, dtype, "loss")
    _close(s.grad, gs, dtype, "grad_student")
    _close(t.grad, gt, dtype, "grad_teacher")


@pytest.mark.parametrize("divergence", DIVS)
def test_matches_native_cpu_op(divergence):
    """Same inputs through the native CPU kernel: the two backends agree to float32 rounding,
    including masked rows, a NaN row, a degenerate row and -inf columns."""
    N, V = 6, 37
    s = _logits((N, V), torch.float32, 6).cpu()
    t = _logits((N, V), torch.float32, 7).cpu()
    s[:, 3] = -math.inf
    t[:, 3] = -math.inf
    s[2, 5] = math.nan
    t[4] = -math.inf
    valid = torch.tensor([True, True, True, False, True, True])
    args = (valid, divergence, BETA, 2.0, True, True)
    native = ops.kd_loss_forward(s, t, *args)
    tri = tkd.kd_loss_forward_triton(s.to(DEV), t.to(DEV), valid.to(DEV), *args[1:])
    assert len(tri) == len(native) == 4
    for a, b, name in zip(tri[:3], native[:3], ("loss", "grad_student", "grad_teacher")):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")
    _stats_close(tri[3], native[3], valid, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("shape", [(5, 37), (3, 1), (1, 1), (0, 7), (2, 3, 11), (2, 70)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_odd_shapes(shape, divergence, small_tiles):
    dtype = torch.float32
    s = _logits(shape, dtype, 8).requires_grad_()
    t = _logits(shape, dtype, 9).requires_grad_()
    out = kd_loss(s, t, divergence=divergence, beta=BETA, temperature=2.5, reduction="none",
                  _backend="triton")
    assert out.shape == shape[:-1]
    gout = torch.linspace(0.5, 1.5, out.numel(), dtype=dtype, device=DEV).reshape(out.shape)
    (out * gout).sum().backward()
    rows, gs, gt = _oracle(s, t, divergence, BETA, 2.5, gout=gout)
    _close(out, rows, dtype, "loss")
    _close(s.grad, gs, dtype, "grad_student")
    _close(t.grad, gt, dtype, "grad_teacher")
    if shape[-1] == 1:  # one class: both distributions are [1]; jsd's log M = log(w + 1 - w)
        tol = 1e-6 if divergence == "jsd" else 0.0  # is 0 only up to float32 rounding
        assert out.abs().max() <= tol and s.grad.abs().max() <= tol and t.grad.abs().max() <= tol
    # a reduced loss over the same shape
    b = kd_loss(s.detach(), t.detach(), divergence=divergence, beta=BETA, temperature=2.5,
                _backend="triton")
    _close(b, rows.sum() / max(rows.numel(), 1), dtype, "batchmean")


def test_empty_vocabulary():
    s = torch.empty((3, 0), device=DEV)
    loss, gs, gt, st = tkd.kd_loss_forward_triton(s, s.clone(), None, "jsd", BETA, 1.0, True,
                                                  True)
    assert loss.shape == (3,) and torch.all(loss == 0)
    assert gs.shape == (3, 0) and gt.shape == (3, 0)
    assert st.shape == (3, 8) and st.dtype == torch.float32
    go = torch.ones(3, device=DEV)
    for stats in (None, st):
        gs, gt = tkd.kd_loss_backward_triton(go, s, s.clone(), None, stats, "jsd", BETA, 1.0,
                                             True, True)
        assert gs.shape == (3, 0) and gt.shape == (3, 0)


def test_default_tile_width_multi_tile():
    """Rows longer than the default 4096-wide tile."""
    s = _logits((2, 4100), torch.float32, 10).requires_grad_()
    t = _logits((2, 4100), torch.float32, 11).requires_grad_()
    out = kd_loss(s, t, divergence="skew_forward_kl", beta=BETA, reduction="none",
                  _backend="triton")
    out.sum().backward()
    rows, gs, gt = _oracle(s, t, "skew_forward_kl", BETA, 1.0)
    _close(out, rows, torch.float32, "loss")
    _close(s.grad, gs, torch.float32, "grad_student")
    _close(t.grad, gt, torch.float32, "grad_teacher")


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("divergence", DIVS)
def test_neg_inf_vocabulary_columns(divergence, dtype, small_tiles):
    """-inf columns on both sides give exact zeros; so does a one-sided -inf on the side whose
    zero mass keeps the divergence finite (the teacher for forward_kl, else the student)."""
    N, V = 4, 37
    s = _logits((N, V), dtype, 12)
    t = _logits((N, V), dtype, 13)
    s[:, [0, 17, 36]] = -math.inf
    t[:, [0, 17, 36]] = -math.inf
    if divergence == "forward_kl":
        t[1, [4, 20]] = -math.inf
    else:
        s[1, [4, 20]] = -math.inf
    s.requires_grad_()
    t.requires_grad_()
    out = kd_loss(s, t, divergence=divergence, beta=BETA, temperature=2.5, reduction="none",
                  _backend="triton")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    rows, gs, gt = _oracle(s, t, divergence, BETA, 2.5)
    _close(out, rows, dtype, "loss")
    _close(s.grad, gs, dtype, "grad_student")
    _close(t.grad, gt, dtype, "grad_teacher")
    assert torch.all(s.grad[:, [0, 17, 36]] == 0) and torch.all(t.grad[:, [0, 17, 36]] == 0)


@pytest.mark.parametrize("divergence", DIVS)
def test_degenerate_and_nan_rows(divergence):
    """Row 0: normal. Row 1: student all -inf (loss 0, grads 0). Row 2: both all -inf.
    Row 3: a NaN teacher logit (loss and both gradient rows NaN). Row 4: NaN but masked."""
    s = _logits((5, 13), torch.float32, 14)
    t = _logits((5, 13), torch.float32, 15)
    s[1] = -math.inf
    s[2] = -math.inf
    t[2] = -math.inf
    t[3, 6] = math.nan
    s[4, 2] = math.nan
    valid = torch.tensor([True, True, True, True, False], device=DEV)
    loss, gs, gt, st = tkd.kd_loss_forward_triton(s, t, valid, divergence, BETA, 1.0, True,
                                                  True)
    for r in (1, 2, 4):
        assert loss[r] == 0 and torch.all(gs[r] == 0) and torch.all(gt[r] == 0), r
    assert torch.isnan(loss[3]) and torch.isnan(gs[3]).all() and torch.isnan(gt[3]).all()
    # statistics: a -inf maximum on the dead side, NaN maxima for the NaN row, zeros when masked
    s_col = 1 if divergence not in ("reverse_kl", "skew_reverse_kl") else 0
    assert st[1, s_col] == -math.inf and st[2, 0] == -math.inf and st[2, 1] == -math.inf
    assert torch.isnan(st[3, :2]).any() and torch.all(st[4] == 0)
    assert torch.isfinite(st[0]).all() and st[0, 4] == loss[0]
    rows, g_s, g_t = _oracle(s[:1], t[:1], divergence, BETA, 1.0)
    _close(loss[:1], rows, torch.float32, "loss")
    _close(gs[:1], g_s, torch.float32, "grad_student")
    _close(gt[:1], g_t, torch.float32, "grad_teacher")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("divergence", DIVS)
def test_large_logits(divergence, dtype, small_tiles):
    """Logits of magnitude 1e4: rows 0-1 disagree wildly, rows 2-3 nearly agree (an O(1)
    divergence out of 1e4-sized log-sum-exps)."""
    N, V = 4, 37
    s = _logits((N, V), torch.float64, 16, scale=1e4)
    t = _logits((N, V), torch.float64, 17, scale=1e4)
    t[2:] = s[2:] + _logits((2, V), torch.float64, 18, scale=1.0)
    s = s.to(dtype).requires_grad_()
    t = t.to(dtype).requires_grad_()
    out = kd_loss(s, t, divergence=divergence, beta=BETA, temperature=1.0, reduction="none",
                  _backend="triton")
    out.sum().backward()
    rows, gs, gt = _oracle(s, t, divergence, BETA, 1.0)
    assert torch.isfinite(out).all()
    rtol = {torch.float64: 1e-9, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.detach().double().cpu(), rows, rtol=rtol, atol=rtol)
    torch.testing.assert_close(s.grad.double().cpu(), gs, rtol=rtol, atol=rtol)
    torch.testing.assert_close(t.grad.double().cpu(), gt, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_underflow_on_both_sides_no_nan(divergence):
    """Liger issue 1453: entries with log p < -104 under both distributions (exp underflows
    to 0 in float32) must not produce NaN in the mixture terms."""
    s = torch.full((2, 21), -300.0, device=DEV)
    t = torch.full((2, 21), -300.0, device=DEV)
    s[:, :3] = torch.tensor([1.0, 0.5, -0.5])
    t[:, :3] = torch.tensor([0.2, 1.0, 0.0])
    s.requires_grad_()
    t.requires_grad_()
    out = kd_loss(s, t, divergence=divergence, beta=BETA, reduction="none", _backend="triton")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    rows, gs, gt = _oracle(s, t, divergence, BETA, 1.0)
    _close(out, rows, torch.float32, "loss")
    _close(s.grad, gs, torch.float32, "grad_student")
    _close(t.grad, gt, torch.float32, "grad_teacher")


# ---------------------------------------------------------------- autograd paths

@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_grad_output_scaling_reductions(divergence, reduction):
    N, V = 6, 23
    s = _logits((N, V), torch.float64, 19).requires_grad_()
    t = _logits((N, V), torch.float64, 20)
    labels = _labels(N, True, seed=1)
    out = kd_loss(s, t, divergence=divergence, beta=BETA, temperature=2.5, reduction=reduction,
                  labels=labels, _backend="triton")
    out.backward(torch.tensor(0.7, dtype=torch.float64, device=DEV))
    so = s.detach().cpu().requires_grad_()
    expected = ref.kd_loss(so, t.cpu(), divergence=divergence, beta=BETA, temperature=2.5,
                           reduction=reduction, labels=labels.cpu())
    (0.7 * expected).backward()
    _close(out, expected.detach(), torch.float64, "loss")
    _close(s.grad, so.grad, torch.float64, "grad_student")


@pytest.mark.parametrize("divergence", DIVS)
def test_teacher_gradient_only(divergence):
    """Frozen student, trainable teacher: only the teacher-gradient buffer is produced."""
    N, V = 4, 29
    s = _logits((N, V), torch.float32, 21)
    t = _logits((N, V), torch.float32, 22).requires_grad_()
    gout = torch.tensor([0.5, -1.0, 2.0, 0.25], device=DEV)
    out = kd_loss(s, t, divergence=divergence, beta=BETA, temperature=2.5, reduction="none",
                  _backend="triton")
    (out * gout).sum().backward()
    rows, _, gt = _oracle(s, t, divergence, BETA, 2.5, gout=gout)
    _close(out, rows, torch.float32, "loss")
    _close(t.grad, gt, torch.float32, "grad_teacher")
    loss, gs, g_t, _ = tkd.kd_loss_forward_triton(s, t.detach(), None, divergence, BETA, 2.5,
                                                  False, True)
    assert gs.shape == (0,) and g_t.shape == s.shape


def test_repeated_backward_and_gradcheck():
    """The backward recomputes from the saved inputs: retain_graph gives the same gradient
    twice, and float64 gradcheck passes (masked rows included)."""
    s = _logits((3, 7), torch.float64, 23).requires_grad_()
    t = _logits((3, 7), torch.float64, 24).requires_grad_()
    labels = torch.tensor([1, -100, 2], device=DEV)
    out = kd_loss(s, t, divergence="jsd", beta=BETA, temperature=1.5, labels=labels,
                  _backend="triton")
    g1 = torch.autograd.grad(out, (s, t), retain_graph=True)
    g2 = torch.autograd.grad(out, (s, t))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.autograd.gradcheck(
        lambda s, t: kd_loss(s, t, divergence="skew_reverse_kl", beta=BETA, temperature=1.5,
                             reduction="none", labels=labels, _backend="triton"),
        (s, t))


@pytest.mark.parametrize("divergence", DIVS)
def test_backward_op_matches_native(divergence):
    """kd_loss_backward_triton against the native kd_loss_backward: per-row scale, a zero
    scale (row skipped), a masked NaN row, a NaN row, a degenerate row."""
    N, V = 6, 37
    s = _logits((N, V), torch.float32, 25).cpu()
    t = _logits((N, V), torch.float32, 26).cpu()
    s[3, 4] = math.nan
    t[4, 1] = math.nan
    t[5] = -math.inf
    valid = torch.tensor([True, True, True, False, True, True])
    grad_rows = torch.tensor([0.5, -2.0, 0.0, 1.0, 3.0, 1.0])
    st_native = ops.kd_loss_forward(s, t, valid, divergence, BETA, 2.0, False, False)[3]
    st_tri = tkd.kd_loss_forward_triton(s.to(DEV), t.to(DEV), valid.to(DEV), divergence, BETA,
                                        2.0, False, False)[3]
    for flags in ((True, True), (True, False), (False, True)):
        for sn, stt in ((None, None), (st_native, st_tri)):
            native = ops.kd_loss_backward(grad_rows, s, t, valid, sn, divergence, BETA, 2.0,
                                          *flags)
            tri = tkd.kd_loss_backward_triton(grad_rows.to(DEV), s.to(DEV), t.to(DEV),
                                              valid.to(DEV), stt, divergence, BETA, 2.0, *flags)
            for a, b in zip(tri, native):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------- statistics (fast backward)
#
# forward output 3: stats [..., 8] = (mx, my, log Zp, log Zq, L, s0, s1, s2); the backward
# given them runs _kd_grad_from_stats_kernel (one pass) instead of recomputing the rows.

# backward(stats) against backward(None): (rtol, atol) per input dtype. float32: p is
# exp(lp) there and exp(xs) / Zp here; bfloat16: one ulp of the stored gradient.
TOL_FAST = {torch.float64: (1e-12, 1e-15), torch.float32: (1e-5, 1e-7),
            torch.bfloat16: (1e-2, 1e-3)}


def _special(N, V, dtype, seed):
    """Rows: 0 zero incoming gradient, 1 NaN student logit, 2 dead teacher (all -inf),
    3 -inf columns on both sides, N-1 masked; the others ordinary."""
    s = _logits((N, V), dtype, seed)
    t = _logits((N, V), dtype, seed + 1)
    s[1, 4] = math.nan
    t[2] = -math.inf
    s[3, [0, 7]] = -math.inf
    t[3, [0, 7]] = -math.inf
    valid = torch.ones(N, dtype=torch.bool, device=DEV)
    valid[N - 1] = False
    go = (torch.rand(N, generator=_gen(seed + 2), dtype=torch.float64) + 0.5).to(DEV)
    go[0] = 0.0
    return s, t, valid, go


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVS)
def test_stats_backward_matches_recompute(divergence, dtype, small_tiles):
    N, V = 6, 37
    s, t, valid, go = _special(N, V, dtype, 90)
    st = tkd.kd_loss_forward_triton(s, t, valid, divergence, BETA, 2.5, False, False)[3]
    assert st.shape == (N, 8) and st.dtype == (torch.float64 if dtype == torch.float64
                                               else torch.float32)
    st[N - 1] = math.nan  # a masked row's statistics are never read
    rtol, atol = TOL_FAST[dtype]
    for flags in ((True, True), (True, False), (False, True)):
        fast = tkd.kd_loss_backward_triton(go, s, t, valid, st, divergence, BETA, 2.5, *flags)
        slow = tkd.kd_loss_backward_triton(go, s, t, valid, None, divergence, BETA, 2.5, *flags)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)
            if b.numel():
                assert a[1].isnan().all()
                for r in (0, 2, N - 1):
                    assert torch.count_nonzero(a[r]) == 0, r


@pytest.mark.parametrize("divergence", DIVS)
def test_stats_backward_matches_oracle_and_native(divergence, small_tiles):
    """The fast backward against the float64 oracle (ordinary rows), and the statistics and
    fast gradients against the native CPU kernel's, crossing them over: native statistics
    into the Triton backward and the other way round."""
    N, V = 6, 37
    s, t, valid, go = _special(N, V, torch.float32, 91)
    args = (divergence, BETA, 1.7)
    tri = tkd.kd_loss_forward_triton(s, t, valid, *args, False, False)
    nat = ops.kd_loss_forward(s.cpu(), t.cpu(), valid.cpu(), *args, False, False)
    _stats_close(tri[3], nat[3], valid)
    fin = valid.cpu() & ~torch.isnan(nat[0])
    torch.testing.assert_close(tri[3][..., 4].cpu()[fin], nat[0][fin], rtol=1e-5, atol=1e-6)
    g_tri = tkd.kd_loss_backward_triton(go, s, t, valid, tri[3], *args, True, True)
    g_x1 = tkd.kd_loss_backward_triton(go, s, t, valid, nat[3].to(DEV), *args, True, True)
    g_nat = ops.kd_loss_backward(go.cpu(), s.cpu(), t.cpu(), valid.cpu(), nat[3], *args,
                                 True, True)
    g_x2 = ops.kd_loss_backward(go.cpu(), s.cpu(), t.cpu(), valid.cpu(), tri[3].cpu(), *args,
                                True, True)
    for a, b, c, d in zip(g_tri, g_x1, g_nat, g_x2):
        for other in (b, c, d):
            torch.testing.assert_close(a.cpu(), other.cpu(), rtol=1e-5, atol=1e-6,
                                       equal_nan=True)
    ok = torch.tensor([3, 4])  # row 4 ordinary, row 3 with -inf columns
    _, gs, gt = _oracle(s[ok], t[ok], divergence, BETA, 1.7, gout=go[ok])
    _close(g_tri[0][ok], gs, torch.float32, "grad_student")
    _close(g_tri[1][ok], gt, torch.float32, "grad_teacher")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("divergence,beta", [("skew_forward_kl", 1.0), ("skew_reverse_kl", 1.0),
                                             ("jsd", 1.0), ("skew_forward_kl", 0.0)])
def test_stats_beta_endpoints(divergence, beta, dtype):
    """SKEW with w = 1 gives zero gradients from the statistics (KL(P || P) = 0); the jsd /
    skew endpoints that map onto KL use the KL formulas."""
    s = _logits((3, 19), dtype, 92)
    t = _logits((3, 19), dtype, 93)
    go = torch.tensor([1.0, -0.5, 2.0], dtype=dtype, device=DEV)
    st = tkd.kd_loss_forward_triton(s, t, None, divergence, beta, 1.5, False, False)[3]
    fast = tkd.kd_loss_backward_triton(go, s, t, None, st, divergence, beta, 1.5, True, True)
    slow = tkd.kd_loss_backward_triton(go, s, t, None, None, divergence, beta, 1.5, True, True)
    _, gs, gt = _oracle(s, t, divergence, beta, 1.5, gout=go)
    for a, b, c in zip(fast, slow, (gs, gt)):
        torch.testing.assert_close(a, b, rtol=TOL_FAST[dtype][0], atol=TOL_FAST[dtype][1])
        _close(a, c, dtype, "grad")
    if divergence.startswith("skew") and beta == 1.0:
        assert torch.count_nonzero(fast[0]) == 0 and torch.count_nonzero(fast[1]) == 0


def test_stats_autograd_and_retain_graph():
    """kd_loss's autograd hands the statistics over: its gradient is the fast backward's,
    bit for bit, and a second backward through the retained graph repeats it."""
    s = _logits((4, 23), torch.float64, 94).requires_grad_()
    t = _logits((4, 23), torch.float64, 95)
    out = kd_loss(s, t, divergence="tvd", temperature=1.5, reduction="sum", _backend="triton")
    g1, = torch.autograd.grad(out, (s,), retain_graph=True)
    g2, = torch.autograd.grad(out, (s,))
    st = tkd.kd_loss_forward_triton(s.detach(), t, None, "tvd", 0.5, 1.5, False, False)[3]
    gf = tkd.kd_loss_backward_triton(torch.ones(4, dtype=torch.float64, device=DEV), s.detach(),
                                     t, None, st, "tvd", 0.5, 1.5, True, False)[0]
    assert torch.equal(g1, gf) and torch.equal(g2, gf)


def test_stats_argument_checks():
    s = _logits((4, 10), torch.float32, 96)
    t = _logits((4, 10), torch.float32, 97)
    go = torch.ones(4, device=DEV)
    st = tkd.kd_loss_forward_triton(s, t, None, "jsd", BETA, 1.0, False, False)[3]
    bw = tkd.kd_loss_backward_triton
    with pytest.raises(RuntimeError, match=r"stats must hold 8 values per row \(32\), got 24"):
        bw(go, s, t, None, st[:3], "jsd", BETA, 1.0, True, False)
    with pytest.raises(RuntimeError, match=r"stats must be Float \(the compute dtype"):
        bw(go, s, t, None, st.double(), "jsd", BETA, 1.0, True, False)
    sh, th = s.to(torch.bfloat16), t.to(torch.bfloat16)
    st_h = tkd.kd_loss_forward_triton(sh, th, None, "jsd", BETA, 1.0, False, False)[3]
    assert st_h.dtype == torch.float32
    with pytest.raises(RuntimeError, match="stats must be Float"):
        bw(go, sh, th, None, st_h.to(torch.bfloat16), "jsd", BETA, 1.0, True, False)
    if DEV.type == "cuda":
        with pytest.raises(RuntimeError, match="stats is on cpu"):
            bw(go, s, t, None, st.cpu(), "jsd", BETA, 1.0, True, False)
    # (a meta tensor would send the op call to the fake kernel: check the helper directly)
    with pytest.raises(RuntimeError, match="stats is on meta but student_logits is on"):
        tkd._check_stats(st.to("meta"), s, torch.float32)
    with pytest.raises(RuntimeError, match="grad_rows must have one entry per row"):
        bw(torch.ones(3, device=DEV), s, t, None, st, "jsd", BETA, 1.0, True, False)
    # the same messages as the native kernel
    with pytest.raises(RuntimeError, match=r"stats must hold 8 values per row \(32\), got 24"):
        ops.kd_loss_backward(go.cpu(), s.cpu(), t.cpu(), None, st[:3].cpu(), "jsd", BETA, 1.0,
                             True, False)
    # a non-contiguous view is accepted
    wide = torch.zeros(4, 16, device=DEV)
    wide[:, ::2] = st
    a = bw(go, s, t, None, wide[:, ::2], "jsd", BETA, 1.0, True, True)
    b = bw(go, s, t, None, st, "jsd", BETA, 1.0, True, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # top-k
    _, idx, vals = _topk_inputs(4, 10, 3, torch.float32, torch.float32, 98)
    st_k = tkd.kd_loss_topk_forward_triton(s, idx, vals, None, "jsd", BETA, 1.0, False, False)[3]
    assert st_k.shape == (4, 8)
    tb = tkd.kd_loss_topk_backward_triton
    with pytest.raises(RuntimeError, match="stats must hold 8 values per row"):
        tb(go, s, idx, vals, None, st_k.reshape(-1)[:31], "jsd", BETA, 1.0, True, False)
    with pytest.raises(RuntimeError, match="stats must be Float"):
        tb(go, s, idx, vals, None, st_k.double(), "jsd", BETA, 1.0, True, False)


# ---------------------------------------------------------------- top-k teacher

def _topk_inputs(N, V, K, dtype, tdtype, seed, idx_dtype=torch.int64):
    s = _logits((N, V), dtype, seed)
    idx = torch.stack([torch.randperm(V, generator=_gen(seed + r))[:K] for r in range(N)])
    vals = _logits((N, K), tdtype, seed + 100)
    return s, idx.to(idx_dtype).to(DEV), vals


def _topk_oracle(s, idx, vals, divergence, temperature, valid, gout):
    """Loss from ref.kd_loss_topk; gradients by autograd through a dense teacher with a finite
    stand-in off the K entries (see the module docstring)."""
    so = s.detach().double().cpu().requires_grad_()
    vo = vals.detach().double().cpu().requires_grad_()
    labels = None if valid is None else torch.where(valid.cpu(), 0, -100)
    loss = ref.kd_loss_topk(so.detach(), idx.cpu().long(), vo.detach(), divergence=divergence,
                            beta=BETA, temperature=temperature, reduction="none",
                            labels=labels)
    dense = torch.full_like(so, -1e5).scatter(-1, idx.cpu().long(), vo)
    rows = ref.divergence_rows(so, dense, divergence, BETA, temperature)
    if valid is not None:
        rows = torch.where(valid.cpu(), rows, torch.zeros_like(rows))
    torch.testing.assert_close(rows.detach(), loss, rtol=1e-12, atol=1e-14)
    (rows * gout.double().cpu()).sum().backward()
    return loss, so.grad, vo.grad


@pytest.mark.parametrize("dtype,tdtype", [(torch.float64, torch.float64),
                                          (torch.float32, torch.float32),
                                          (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("divergence", TOPK_DIVS)
def test_topk_matches_oracle(divergence, dtype, tdtype, small_tiles):
    """Masked rows included (rows without a mask: test_topk_chunked_int32_and_leading_dims)."""
    N, V, K = 5, 37, 6
    s, idx, vals = _topk_inputs(N, V, K, dtype, tdtype, 30)
    s.requires_grad_()
    vals.requires_grad_()
    labels = _labels(N, True)
    gout = (torch.rand(N, generator=_gen(31), dtype=torch.float64) + 0.5).to(dtype).to(DEV)
    out = kd_loss_topk(s, idx, vals, divergence=divergence, beta=BETA, temperature=2.5,
                       reduction="none", labels=labels, _backend="triton")
    assert out.dtype == dtype
    (out * gout).sum().backward()
    assert vals.grad.dtype == tdtype and vals.grad.shape == vals.shape
    valid = labels != -100
    loss, gs, gv = _topk_oracle(s, idx, vals, divergence, 2.5, valid, gout)
    _close(out, loss, dtype, "loss")
    _close(s.grad, gs, dtype, "grad_student")
    _close(vals.grad, gv, dtype if tdtype != torch.float16 else torch.bfloat16, "grad_teacher")


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_topk_chunked_int32_and_leading_dims(divergence, monkeypatch):
    """One row per chunk of the dense-teacher temporary, int32 indices, [2, 3, V] input,
    K = V (a full teacher) in one test and K = 1 in another row set."""
    monkeypatch.setattr(tkd, "_TOPK_CHUNK_BYTES", 1)
    for (V, K) in ((11, 11), (11, 1), (40, 7)):
        s, idx, vals = _topk_inputs(6, V, K, torch.float32, torch.float32, 40 + V + K,
                                    idx_dtype=torch.int32)
        s = s.reshape(2, 3, V).requires_grad_()
        idx = idx.reshape(2, 3, K)
        vals = vals.reshape(2, 3, K).requires_grad_()
        out = kd_loss_topk(s, idx, vals, divergence=divergence, beta=BETA, reduction="none",
                           _backend="triton")
        out.sum().backward()
        gout = torch.ones(6)
        loss, gs, gv = _topk_oracle(s.reshape(6, V), idx.reshape(6, K), vals.reshape(6, K),
                                    divergence, 1.0, None, gout)
        _close(out.reshape(6), loss, torch.float32, "loss")
        _close(s.grad.reshape(6, V), gs, torch.float32, "grad_student")
        _close(vals.grad.reshape(6, K), gv, torch.float32, "grad_teacher")


def test_topk_matches_native_cpu_op():
    s, idx, vals = _topk_inputs(5, 37, 6, torch.float32, torch.float16, 50)
    valid = torch.tensor([True, False, True, True, True])
    grad_rows = torch.tensor([0.5, 1.0, 0.0, -1.5, 2.0])
    for divergence in TOPK_DIVS:
        args = (divergence, BETA, 2.0, True, True)
        native = ops.kd_loss_topk_forward(s.cpu(), idx.cpu(), vals.cpu(), valid, *args)
        tri = tkd.kd_loss_topk_forward_triton(s, idx, vals, valid.to(DEV), *args)
        outs, wants = list(tri), list(native)
        for sn, stt in ((None, None), (native[3], tri[3])):
            wants += ops.kd_loss_topk_backward(grad_rows, s.cpu(), idx.cpu(), vals.cpu(), valid,
                                               sn, *args)
            outs += tkd.kd_loss_topk_backward_triton(grad_rows.to(DEV), s, idx, vals,
                                                     valid.to(DEV), stt, *args)
        for a, b in zip(outs, wants):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", TOPK_DIVS)
def test_topk_stats_backward(divergence, small_tiles):
    """Top-k: backward(stats) == backward(None) (zero-gradient, NaN, dead and masked rows
    included), statistics as the native kernel's, and the fast gradients the oracle's."""
    N, V, K = 6, 37, 6
    s, idx, vals = _topk_inputs(N, V, K, torch.float32, torch.float16, 99)
    s[1, 3] = math.nan
    vals[2] = -math.inf
    valid = torch.tensor([True] * (N - 1) + [False], device=DEV)
    go = torch.tensor([0.0, 1.0, 1.0, 0.5, -2.0, 1.0], device=DEV)
    args = (divergence, BETA, 2.0)
    st = tkd.kd_loss_topk_forward_triton(s, idx, vals, valid, *args, False, False)[3]
    nat = ops.kd_loss_topk_forward(s.cpu(), idx.cpu(), vals.cpu(), valid.cpu(), *args, False,
                                   False)[3]
    _stats_close(st, nat, valid)
    for flags in ((True, True), (True, False), (False, True)):
        fast = tkd.kd_loss_topk_backward_triton(go, s, idx, vals, valid, st, *args, *flags)
        slow = tkd.kd_loss_topk_backward_triton(go, s, idx, vals, valid, None, *args, *flags)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
            if b.numel():
                assert a[1].isnan().all()
                for r in (0, 2, N - 1):
                    assert torch.count_nonzero(a[r]) == 0, r
    gs, gv = tkd.kd_loss_topk_backward_triton(go, s, idx, vals, valid, st, *args, True, True)
    ok = torch.tensor([3, 4])
    _, o_s, o_v = _topk_oracle(s[ok], idx[ok], vals[ok], divergence, 2.0, None, go[ok])
    _close(gs[ok], o_s, torch.float32, "grad_student")
    _close(gv[ok], o_v, torch.bfloat16, "grad_teacher")  # float16 teacher gradient


def test_topk_rejects_bad_input():
    s, idx, vals = _topk_inputs(3, 10, 4, torch.float32, torch.float32, 60)
    op = tkd.kd_loss_topk_forward_triton
    with pytest.raises(RuntimeError, match="infinite for a top-k"):
        op(s, idx, vals, None, "reverse_kl", BETA, 1.0, True, False)
    with pytest.raises(RuntimeError, match="infinite for a top-k"):
        op(s, idx, vals, None, "jsd", 1.0, 1.0, True, False)
    bad = idx.clone()
    bad[1, 2] = bad[1, 0]
    with pytest.raises(RuntimeError, match="row 1 repeats vocabulary index"):
        op(s, bad, vals, None, "forward_kl", BETA, 1.0, True, False)
    bad = idx.clone()
    bad[2, 3] = 10
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 10\)"):
        op(s, bad, vals, None, "forward_kl", BETA, 1.0, True, False)


def test_dense_rejects_bad_input():
    s = _logits((3, 10), torch.float32, 61)
    op = tkd.kd_loss_forward_triton
    with pytest.raises(RuntimeError, match="unknown divergence"):
        op(s, s, None, "kl", BETA, 1.0, False, False)
    with pytest.raises(RuntimeError, match="temperature"):
        op(s, s, None, "jsd", BETA, 0.0, False, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op(s, s.double(), None, "jsd", BETA, 1.0, False, False)
    with pytest.raises(RuntimeError, match="one entry per row"):
        op(s, s, torch.ones(4, dtype=torch.bool, device=DEV), "jsd", BETA, 1.0, False, False)


# ---------------------------------------------------------------- opcheck / compile

@pytest.mark.parametrize("dtype,with_valid", [(torch.float64, True), (torch.float32, False)],
                         ids=["float64-valid", "float32-novalid"])
def test_opcheck_dense(dtype, with_valid):
    s = _logits((3, 9), dtype, 70).requires_grad_()
    t = _logits((3, 9), dtype, 71).requires_grad_()
    valid = torch.tensor([True, False, True], device=DEV) if with_valid else None
    torch.library.opcheck(tkd.kd_loss_forward_triton, (s, t, valid, "jsd", BETA, 2.0, True, True))
    torch.library.opcheck(tkd.kd_loss_forward_triton,
                          (s.detach(), t.detach(), valid, "tvd", BETA, 1.0, False, False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_topk(dtype):
    s, idx, vals = _topk_inputs(3, 9, 4, dtype, dtype, 72)
    valid = torch.tensor([True, False, True], device=DEV)
    torch.library.opcheck(tkd.kd_loss_topk_forward_triton,
                          (s.requires_grad_(), idx, vals.requires_grad_(), valid,
                           "skew_forward_kl", BETA, 2.0, True, True))
    torch.library.opcheck(tkd.kd_loss_topk_forward_triton,
                          (s.detach(), idx, vals.detach(), None, "forward_kl", BETA, 1.0,
                           True, False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_backward_ops(dtype):
    s, idx, vals = _topk_inputs(3, 9, 4, dtype, dtype, 73)
    t = _logits((3, 9), dtype, 74)
    grad_rows = torch.tensor([0.5, 0.0, -1.0], dtype=dtype, device=DEV)
    valid = torch.tensor([True, True, False], device=DEV)
    st = tkd.kd_loss_forward_triton(s, t, valid, "skew_reverse_kl", BETA, 2.0, False, False)[3]
    st_k = tkd.kd_loss_topk_forward_triton(s, idx, vals, None, "jsd", BETA, 1.0, False, False)[3]
    for stats, stats_k in ((None, None), (st, st_k)):
        torch.library.opcheck(tkd.kd_loss_backward_triton,
                              (grad_rows, s, t, valid, stats, "skew_reverse_kl", BETA, 2.0, True,
                               True))
        torch.library.opcheck(tkd.kd_loss_topk_backward_triton,
                              (grad_rows, s, idx, vals, None, stats_k, "jsd", BETA, 1.0, True,
                               True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    N, V = 6, 21
    s = _logits((N, V), torch.float32, 80).requires_grad_()
    t = _logits((N, V), torch.float32, 81).requires_grad_()
    labels = _labels(N, True, seed=2)

    def f(s, t, labels):
        return kd_loss(s, t, divergence="jsd", beta=BETA, temperature=2.0, labels=labels,
                       _backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = compiled(s, t, labels)
    gs, gt = torch.autograd.grad(out * 1.3, (s, t))
    s2 = s.detach().clone().requires_grad_()
    t2 = t.detach().clone().requires_grad_()
    expected = f(s2, t2, labels)
    es, et = torch.autograd.grad(expected * 1.3, (s2, t2))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gs, es)
    torch.testing.assert_close(gt, et)
