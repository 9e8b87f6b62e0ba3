"""CUDA kernels of kd_loss / kd_loss_topk (csrc/cuda/kd_loss_kernel.cu) against the float64
oracle in python/reference/kd_loss.py and against the CPU kernels (same semantics).

Every test is skipped without a CUDA device. Inputs are drawn on the CPU from fixed seeds and
then moved, so they are the same on every machine. The oracle runs in float64 on the same
(rounded) inputs, so the error measured is the kernel's own.
"""
import math

import pytest
import torch

import pydistill_ext as pde
from pydistill_ext._lib import has_kernel
from reference import kd_loss as ref

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

DEV = "cuda"
OPS = torch.ops.pydistill_ext
DIVS = pde.DIVERGENCES
TOPK_DIVS = ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) for the loss, and the gradient error allowed relative to the largest oracle
# gradient (+ an absolute floor for fp16 subnormals). float32 math uses __expf/__logf
# (a few ulp), so float32 is a little looser than the CPU kernel's table.
TOL = {
    torch.float64: dict(loss=(1e-10, 1e-12), grad=1e-10, floor=0.0),
    torch.float32: dict(loss=(3e-5, 3e-6), grad=3e-5, floor=0.0),
    torch.bfloat16: dict(loss=(1.6e-2, 1e-3), grad=1.6e-2, floor=0.0),
    torch.float16: dict(loss=(2e-3, 1e-4), grad=2e-3, floor=1.2e-7),
}
# Rows of 1e5+ columns: a float32 row sum (S0, S1 of JSD/skew/TVD) that enters every gradient
# element carries ~1e-6..1e-5 relative rounding (the CPU kernel, which sums ~8K terms per
# vector lane, errs by 1.1e-4 on test_llama3_vocabulary[float32-jsd]).
TOL_LONG_ROWS = {**TOL, torch.float32: dict(loss=(1e-4, 1e-5), grad=1e-4, floor=0.0)}


# ------------------------------------------------------------------ helpers

def _inputs(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s.to(DEV), t.to(DEV)


def _labels(lead, seed=1, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 5, lead, generator=g)
    lab[torch.rand(lead, generator=g) < frac] = -100
    return lab.to(DEV)


def _untie(s, t, temperature, margin=1e-3):
    """Teacher logits nudged until no column has p_t within `margin` (relative) of p_s.

    TVD's sign(p_s - p_t) is discontinuous where they meet; there a float32 kernel and the
    float64 oracle may pick different signs, which moves the gradient by a whole p_j. Columns
    where both are 0 are exact ties on both sides and stay; so does V = 1 (both are 1)."""
    if s.shape[-1] == 1:
        return t
    for _ in range(60):
        ps = torch.softmax(s.double() / temperature, -1)
        pt = torch.softmax(t.double() / temperature, -1)
        hi = torch.maximum(ps, pt)
        close = ((ps - pt).abs() <= margin * hi) & (hi > 0)
        if not bool(close.any()):
            return t
        t = torch.where(close, (t.double() + 0.25 * temperature).to(t.dtype), t)
    raise AssertionError("could not separate p_s and p_t")


def _grad_err(got, exp, tol):
    if exp is None:  # the oracle's loss does not depend on this input (e.g. skew, beta=1)
        assert got is None or torch.count_nonzero(got) == 0
        return
    assert got.shape == exp.shape
    if exp.numel() == 0:
        return
    assert torch.isfinite(got).all(), "non-finite gradient"
    scale = max(exp.abs().max().item(), 1e-30)
    err = (got.double() - exp).abs().max().item()
    assert err <= tol["grad"] * scale + tol["floor"], f"grad error {err:.3g} vs scale {scale:.3g}"


def _check(student, teacher, grad_teacher=True, go=None, tol=None, **kw):
    """pde.kd_loss(_backend='cuda') and its gradients against the float64 oracle."""
    dtype = student.dtype
    tol = tol or TOL[dtype]
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_(grad_teacher)
    out = pde.kd_loss(s, t, _backend="cuda", **kw)
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_(grad_teacher)
    want = ref.kd_loss(s64, t64, **kw)
    assert out.dtype == dtype and out.device.type == "cuda"
    torch.testing.assert_close(out.double(), want, rtol=tol["loss"][0], atol=tol["loss"][1])
    if go is None:
        go = torch.ones_like(want)
    out.backward(go.to(out.dtype))
    want.backward(go)
    assert s.grad.dtype == dtype
    _grad_err(s.grad, s64.grad, tol)
    if grad_teacher:
        assert t.grad.dtype == dtype
        _grad_err(t.grad, t64.grad, tol)
    else:
        assert t.grad is None


def test_cuda_kernels_registered():
    assert pde._lib.WITH_CUDA, "pydistill_ext was built without its CUDA kernels"
    for op in ("kd_loss_forward", "kd_loss_topk_forward", "kd_loss_backward",
               "kd_loss_topk_backward"):
        assert has_kernel(op, "CUDA"), op


def test_default_cuda_backend_is_native(monkeypatch):
    import importlib
    mod = importlib.import_module("pydistill_ext.ops.kd_loss")
    monkeypatch.delenv("PYDISTILL_CUDA_BACKEND", raising=False)
    assert mod.cuda_backend() == "cuda"


# ------------------------------------------------------------------ dense: oracle

@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_oracle(divergence, dtype, temperature, masked):
    s, t = _inputs((41, 1271), dtype)
    if divergence == "tvd":
        t = _untie(s, t, temperature)
    labels = _labels((41,)) if masked else None
    for reduction in pde.REDUCTIONS:
        _check(s, t, divergence=divergence, temperature=temperature, beta=0.3,
               reduction=reduction, labels=labels)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_three_dim_grad_output(divergence, dtype):
    # V=32000: the whole bf16 row pair sits in the shared-memory cache, float32 only in part
    s, t = _inputs((3, 5, 32000), dtype, seed=3)
    if divergence == "tvd":
        t = _untie(s, t, 2.5)
    g = torch.Generator().manual_seed(7)
    go = torch.randn(3, 5, generator=g, dtype=torch.float64).to(DEV)
    _check(s, t, divergence=divergence, temperature=2.5, beta=0.7, reduction="none", go=go,
           labels=_labels((3, 5)))


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama3_vocabulary(divergence, dtype):
    # V=128256 (Llama 3): the row pair exceeds shared memory, passes B/C re-read the rest
    s, t = _inputs((3, 128256), dtype, seed=11)
    if divergence == "tvd":
        t = _untie(s, t, 1.0)
    _check(s, t, divergence=divergence, beta=0.4, reduction="sum",
           go=torch.tensor(-1.7, dtype=torch.float64, device=DEV), tol=TOL_LONG_ROWS[dtype])


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_beta_range(divergence, beta):
    s, t = _inputs((9, 130), torch.float64, seed=4)
    _check(s, t, divergence=divergence, beta=beta)


@pytest.mark.parametrize("shape", [(3, 1), (1, 7), (17, 16), (5, 33), (2, 3, 9)])
@pytest.mark.parametrize("divergence", DIVS)
def test_odd_shapes(shape, divergence):
    s, t = _inputs(shape, torch.float32)
    if divergence == "tvd":
        t = _untie(s, t, 1.0)
    for reduction in pde.REDUCTIONS:
        _check(s, t, divergence=divergence, reduction=reduction)


@pytest.mark.parametrize("shape", [(0, 11), (4, 0), (2, 0, 5)])
@pytest.mark.parametrize("divergence", DIVS)
def test_empty(shape, divergence):
    s, t = _inputs(shape, torch.float32)
    s.requires_grad_()
    out = pde.kd_loss(s, t, divergence=divergence, reduction="sum", _backend="cuda")
    assert out.item() == 0
    out.backward()
    assert s.grad.shape == s.shape and torch.count_nonzero(s.grad) == 0
    rows, gs, gt, st = OPS.kd_loss_forward(s.detach(), t, None, divergence, 0.5, 1.0, True, True)
    assert rows.shape == s.shape[:-1] and rows.dtype == torch.float32 and rows.is_cuda
    assert gs.shape == s.shape and gt.shape == t.shape
    assert torch.count_nonzero(rows) == 0 and torch.count_nonzero(gs) == 0
    assert st.shape == s.shape[:-1] + (8,) and st.dtype == torch.float32 and st.is_cuda
    go = torch.ones(s.shape[:-1], device=DEV)
    for stats in (None, st):
        bs, bt = OPS.kd_loss_backward(go, s.detach(), t, None, stats, divergence, 0.5, 1.0,
                                      True, True)
        assert bs.shape == s.shape and bt.shape == t.shape and torch.count_nonzero(bs) == 0


@pytest.mark.parametrize("divergence", DIVS)
def test_v_equal_one_is_zero(divergence):
    s, t = _inputs((6, 1), torch.float32)
    s.requires_grad_()
    loss = pde.kd_loss(s, t, divergence=divergence, reduction="sum", _backend="cuda")
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_extreme_logits(divergence, dtype):
    s, t = _inputs((8, 300), torch.float64, scale=1.0, seed=5)
    _check((s * 1e4).to(dtype), (t * 1e4).to(dtype), divergence=divergence, beta=0.4)
    if dtype == torch.bfloat16:
        return  # bf16 cannot hold logits of size 3 on top of a 1e4 offset (spacing 64)
    # large common offsets of opposite sign (softmax is shift invariant)
    s, t = _inputs((8, 300), torch.float64, scale=3.0, seed=6)
    s, t = (s + 1e4).to(dtype), (t - 1e4).to(dtype)
    if divergence == "tvd":
        t = _untie(s, t, 1.0)
    _check(s, t, divergence=divergence, beta=0.4)


@pytest.mark.parametrize("divergence", DIVS)
def test_log_probs_below_minus_104_both_sides(divergence):
    # Liger issue 1453: no NaN (0 * -inf) in interior-beta JSD / skew
    s = torch.zeros(4, 64, device=DEV)
    t = torch.zeros(4, 64, device=DEV)
    s[:, 32:] = -200.0
    t[:, 32:] = -150.0
    s[:, 0] = 3.0
    _check(s, t, divergence=divergence, beta=0.5)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_vocabulary_minus_inf(divergence, dtype):
    s, t = _inputs((6, 1000), dtype, seed=6)
    keep = torch.ones(1000, dtype=torch.bool, device=DEV)
    keep[torch.tensor([0, 1, 2, 3, 500, 501, 977, 999], device=DEV)] = False
    keep[600:700] = False
    s[:, ~keep] = -math.inf
    t[:, ~keep] = -math.inf
    if divergence == "tvd":
        t[:, keep] = _untie(s[:, keep], t[:, keep], 1.0)
    tol = TOL[dtype]
    ss = s.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    out = pde.kd_loss(ss, tt, divergence=divergence, beta=0.3, _backend="cuda")
    out.backward()
    s64 = s[:, keep].double().requires_grad_()
    t64 = t[:, keep].double().requires_grad_()
    want = ref.kd_loss(s64, t64, divergence=divergence, beta=0.3)
    want.backward()
    torch.testing.assert_close(out.double(), want, rtol=tol["loss"][0], atol=tol["loss"][1])
    assert torch.count_nonzero(ss.grad[:, ~keep]) == 0 and torch.count_nonzero(tt.grad[:, ~keep]) == 0
    _grad_err(ss.grad[:, keep], s64.grad, tol)
    _grad_err(tt.grad[:, keep], t64.grad, tol)


def test_student_minus_inf_where_teacher_has_mass_is_inf():
    s = torch.zeros(1, 4, device=DEV)
    s[0, 1] = -math.inf
    t = torch.zeros(1, 4, device=DEV)
    assert math.isinf(pde.kd_loss(s, t, _backend="cuda").item())


@pytest.mark.parametrize("divergence", DIVS)
def test_all_rows_masked_and_dead_rows(divergence):
    s, t = _inputs((5, 20), torch.float32)
    s.requires_grad_()
    labels = torch.full((5,), -100, device=DEV)
    for reduction in pde.REDUCTIONS:
        s.grad = None
        out = pde.kd_loss(s, t, divergence=divergence, reduction=reduction, labels=labels,
                          _backend="cuda")
        out.sum().backward()
        assert torch.count_nonzero(out) == 0 and torch.count_nonzero(s.grad) == 0
    s2 = s.detach().clone()
    s2[2] = -math.inf
    t2 = t.clone()
    t2[4] = -math.inf
    s2.requires_grad_()
    t2.requires_grad_()
    rows = pde.kd_loss(s2, t2, divergence=divergence, reduction="none", _backend="cuda")
    rows.sum().backward()
    assert rows[2].item() == 0 and rows[4].item() == 0 and torch.isfinite(rows).all()
    for g in (s2.grad, t2.grad):
        assert torch.count_nonzero(g[2]) == 0 and torch.count_nonzero(g[4]) == 0
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("divergence", DIVS)
def test_nan_propagates(divergence):
    s, t = _inputs((3, 1000), torch.float32)
    s[1, 4] = math.nan
    t[2, 999] = math.nan
    rows, gs, gt, _ = OPS.kd_loss_forward(s, t, None, divergence, 0.5, 1.0, True, True)
    assert torch.isfinite(rows[0]) and rows[1:].isnan().all()
    assert torch.isfinite(gs[0]).all() and gs[1:].isnan().all() and gt[1:].isnan().all()
    # a masked row stays 0 whatever it holds
    valid = torch.tensor([True, False, True], device=DEV)
    rows, gs, _, _ = OPS.kd_loss_forward(s, t, valid, divergence, 0.5, 1.0, True, False)
    assert rows[1].item() == 0 and torch.count_nonzero(gs[1]) == 0


# ------------------------------------------------------------------ dense: the op itself

@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_same_as_cpu_kernel(divergence, dtype):
    s, t = _inputs((13, 777), dtype, seed=12)
    s[3, 10:20] = -math.inf
    t[3, 10:20] = -math.inf
    s[5] = -math.inf  # dead row
    if divergence == "tvd":  # two float32 kernels may also pick different signs at a tie
        t = _untie(s, t, 1.9)
    valid = torch.ones(13, dtype=torch.bool, device=DEV)
    valid[7] = False
    args = (divergence, 0.3, 1.9, True, True)
    got = OPS.kd_loss_forward(s, t, valid, *args)
    want = OPS.kd_loss_forward(s.cpu(), t.cpu(), valid.cpu(), *args)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-6)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_cuda
        torch.testing.assert_close(a.cpu(), b, **tol)
    go = torch.randn(13, dtype=got[0].dtype).to(DEV)
    go[2] = 0.0
    for st_gpu, st_cpu in ((None, None), (got[3], want[3])):
        got_b = OPS.kd_loss_backward(go, s, t, valid, st_gpu, *args)
        want_b = OPS.kd_loss_backward(go.cpu(), s.cpu(), t.cpu(), valid.cpu(), st_cpu, *args)
        for a, b in zip(got_b, want_b):
            torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.parametrize("divergence", DIVS)
def test_backward_op_is_scaled_forward_gradient(divergence):
    s, t = _inputs((9, 300), torch.float64, seed=13)
    s[4, 3] = math.nan  # a zero scale wins over a NaN row, as on the CPU
    valid = torch.tensor([True] * 8 + [False], device=DEV)
    go = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEV)
    go[4] = 0.0
    _, gs, gt, st = OPS.kd_loss_forward(s, t, valid, divergence, 0.3, 1.5, True, True)
    keep = torch.arange(9, device=DEV) != 4
    for stats in (None, st):
        bs, bt = OPS.kd_loss_backward(go, s, t, valid, stats, divergence, 0.3, 1.5, True, True)
        torch.testing.assert_close(bs[keep], (gs * go[:, None])[keep], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(bt[keep], (gt * go[:, None])[keep], rtol=1e-12, atol=1e-15)
        assert torch.count_nonzero(bs[4]) == 0 and torch.count_nonzero(bt[4]) == 0
        bs, bt = OPS.kd_loss_backward(go, s, t, valid, stats, divergence, 0.3, 1.5, True, False)
        assert bt.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_contract(dtype):
    s, t = _inputs((2, 3, 50), dtype)
    rows, gs, gt, st = OPS.kd_loss_forward(s, t, None, "jsd", 0.5, 1.0, False, True)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert rows.shape == (2, 3) and rows.dtype == compute
    assert st.shape == (2, 3, 8) and st.dtype == compute and st.is_contiguous() and st.is_cuda
    torch.testing.assert_close(st[..., 4], rows, rtol=0, atol=0)  # L is the row loss
    assert gs.shape == (0,) and gs.dtype == dtype and gs.is_cuda
    assert gt.shape == s.shape and gt.dtype == dtype and gt.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_misaligned_and_strided_inputs(dtype):
    N, V = 7, 333
    g = torch.Generator().manual_seed(3)
    buf_s = torch.randn(N * V + 8, generator=g).to(dtype).to(DEV)
    buf_t = torch.randn(N * V + 8, generator=g).to(dtype).to(DEV)
    s = buf_s[1:1 + N * V].view(N, V)        # 1 element past a 16-byte boundary
    t = buf_t[3:3 + N * V].view(N, V)        # 3 elements past
    assert s.is_contiguous() and s.data_ptr() % 16 != 0
    for div in DIVS:
        for gs_, gt_ in ((True, True), (False, False), (True, False)):
            got = OPS.kd_loss_forward(s, t, None, div, 0.3, 1.3, gs_, gt_)
            want = OPS.kd_loss_forward(s.clone(), t.clone(), None, div, 0.3, 1.3, gs_, gt_)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
    wide = torch.randn(N, 2 * V, generator=g).to(dtype).to(DEV)
    got = OPS.kd_loss_forward(wide[:, ::2], t, None, "forward_kl", 0.5, 1.0, True, True)
    want = OPS.kd_loss_forward(wide[:, ::2].contiguous(), t, None, "forward_kl", 0.5, 1.0, True, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_deterministic():
    s, t = _inputs((64, 50257), torch.bfloat16, seed=21)
    for div in ("forward_kl", "jsd"):
        a = OPS.kd_loss_forward(s, t, None, div, 0.5, 1.0, True, True)
        b = OPS.kd_loss_forward(s, t, None, div, 0.5, 1.0, True, True)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cache_and_block_size_do_not_change_results(dtype, monkeypatch):
    # V=70001: odd (rows start mid-vector), and the row pair only partly fits the cache
    s, t = _inputs((5, 70001), dtype, seed=17)
    t = _untie(s, t, 1.7)  # TVD's sign must not depend on the last bits of the normalisers
    idx = torch.stack([torch.randperm(70001, generator=torch.Generator().manual_seed(r))[:64]
                       for r in range(5)]).to(DEV)
    tk = t[:, :64].float()
    go = torch.randn(5, generator=torch.Generator().manual_seed(3)).to(DEV)

    def run():
        out = []
        for div in DIVS:
            out += OPS.kd_loss_forward(s, t, None, div, 0.3, 1.7, True, True)
            out += OPS.kd_loss_forward(s, t, None, div, 0.3, 1.7, False, False)[:1]
            out += OPS.kd_loss_backward(go, s, t, None, None, div, 0.3, 1.7, True, False)
            st = OPS.kd_loss_forward(s, t, None, div, 0.3, 1.7, False, False)[3]
            out += OPS.kd_loss_backward(go, s, t, None, st, div, 0.3, 1.7, True, True)
        for div in TOPK_DIVS:
            out += OPS.kd_loss_topk_forward(s, idx, tk, None, div, 0.3, 1.7, True, True)
            st = out[-1]
            out += OPS.kd_loss_topk_backward(go, s, idx, tk, None, st, div, 0.3, 1.7, True, True)
        return out

    base = run()
    monkeypatch.setenv("PYDISTILL_CUDA_KD_CACHE", "0")  # same block size: bitwise equal
    for a, b in zip(base, run()):
        assert torch.equal(a, b)
    monkeypatch.setenv("PYDISTILL_CUDA_KD_CACHE", "1")
    monkeypatch.setenv("PYDISTILL_CUDA_KD_THREADS", "128")  # another reduction order
    monkeypatch.setenv("PYDISTILL_CUDA_KD_THREADS_1", "64")
    for a, b in zip(base, run()):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype == torch.bfloat16
                                   else 1e-4, atol=1e-6)


def test_dense_ops_do_not_synchronize():
    s, t = _inputs((16, 5000), torch.bfloat16)
    valid = torch.ones(16, dtype=torch.bool, device=DEV)
    go = torch.ones(16, device=DEV)
    st = OPS.kd_loss_forward(s, t, valid, "jsd", 0.3, 2.0, True, True)[3]  # warm-up (lazy init)
    OPS.kd_loss_backward(go, s, t, valid, None, "jsd", 0.3, 2.0, True, True)
    OPS.kd_loss_backward(go, s, t, valid, st, "jsd", 0.3, 2.0, True, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for div in DIVS:
            OPS.kd_loss_forward(s, t, valid, div, 0.3, 2.0, True, True)
            st = OPS.kd_loss_forward(s, t, None, div, 0.3, 2.0, False, False)[3]
            OPS.kd_loss_backward(go, s, t, valid, None, div, 0.3, 2.0, True, False)
            OPS.kd_loss_backward(go, s, t, valid, st, div, 0.3, 2.0, True, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_native_op_checks_its_arguments():
    s, t = _inputs((4, 10), torch.float32)
    op = OPS.kd_loss_forward
    with pytest.raises(RuntimeError, match="temperature"):
        op(s, t, None, "forward_kl", 0.5, 0.0, False, False)
    with pytest.raises(RuntimeError, match="unknown divergence"):
        op(s, t, None, "kl", 0.5, 1.0, False, False)
    with pytest.raises(RuntimeError, match="beta"):
        op(s, t, None, "jsd", -0.1, 1.0, False, False)
    with pytest.raises(RuntimeError, match="valid must have one entry per row"):
        op(s, t, torch.ones(3, dtype=torch.bool, device=DEV), "jsd", 0.1, 1.0, False, False)
    with pytest.raises(RuntimeError, match="valid must be a bool mask"):
        op(s, t, torch.ones(4, device=DEV), "jsd", 0.1, 1.0, False, False)
    with pytest.raises(RuntimeError, match="student_logits must be float64"):
        op(s.int(), t.int(), None, "jsd", 0.1, 1.0, False, False)
    with pytest.raises(RuntimeError, match="teacher_logits shape"):
        op(s, t[:, :9], None, "jsd", 0.1, 1.0, False, False)
    with pytest.raises(RuntimeError, match="teacher_logits dtype"):
        op(s, t.double(), None, "jsd", 0.1, 1.0, False, False)
    with pytest.raises(RuntimeError, match="same device"):
        op(s, t.cpu(), None, "jsd", 0.1, 1.0, False, False)
    with pytest.raises(RuntimeError, match="grad_rows must have one entry per row"):
        OPS.kd_loss_backward(torch.ones(3, device=DEV), s, t, None, None, "jsd", 0.1, 1.0, True,
                             False)


@pytest.mark.parametrize("divergence", DIVS)
def test_gradcheck(divergence):
    s, t = _inputs((3, 7), torch.float64, scale=1.5, seed=9)
    s.requires_grad_()
    t.requires_grad_()
    labels = torch.tensor([0, -100, 2], device=DEV)
    for red in ("batchmean", "none"):
        f = lambda a, b: pde.kd_loss(a, b, divergence=divergence, beta=0.3, temperature=1.7,
                                     reduction=red, labels=labels, _backend="cuda")
        assert torch.autograd.gradcheck(f, (s, t), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd", "skew_reverse_kl"])
def test_opcheck(divergence):
    s, t = _inputs((4, 37), torch.float32)
    valid = torch.tensor([True, False, True, True], device=DEV)
    for gs, gt in ((True, False), (True, True), (False, False)):
        args = (s.clone().requires_grad_(gs), t.clone().requires_grad_(gt), valid, divergence,
                0.3, 2.0, gs, gt)
        torch.library.opcheck(OPS.kd_loss_forward.default, args)
    go = torch.randn(4, device=DEV)
    st = OPS.kd_loss_forward(s, t, valid, divergence, 0.3, 2.0, False, False)[3]
    for stats in (None, st):
        torch.library.opcheck(OPS.kd_loss_backward.default,
                              (go, s, t, valid, stats, divergence, 0.3, 2.0, True, True))


# ------------------------------------------------------------------ statistics (fast backward)
#
# The forward's 4th output, stats [..., 8] = (mx, my, log Zp, log Zq, L, s0, s1, s2) of the
# (P, Q) pair (csrc/registration.cpp), lets kd_loss_backward run its gradient pass alone. The
# fast path must give the recomputing path's gradients (up to the rounding of 1/Z = exp(-log Z)
# against 1/Z) and the oracle's.

# gradient error allowed between backward(stats) and backward(None), relative to the largest
# gradient (+ floor): float32 differs by the rounding of log Z (~1 ulp of ~10), half types by
# one ulp of the stored gradient at most.
TOL_FAST = {torch.float64: (1e-12, 0.0), torch.float32: (1e-5, 0.0),
            torch.bfloat16: (8e-3, 0.0), torch.float16: (1e-3, 1.2e-7)}
# the same between the CUDA and the CPU kernels (their exp differ by a few ulp)
TOL_XDEV = {k: (v["grad"], v["floor"]) for k, v in TOL.items()}


def _fast_vs_recompute(got, want, dtype, tols=TOL_FAST):
    rel, floor = tols[dtype]
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel() == 0:
        return
    same_nan = torch.isnan(got) == torch.isnan(want)
    assert bool(same_nan.all()), "NaN pattern differs"
    fin = ~torch.isnan(want)
    g, w = got[fin].double(), want[fin].double()
    if w.numel() == 0:
        return
    scale = max(w.abs().max().item(), 1e-30)
    err = (g - w).abs().max().item()
    assert err <= rel * scale + floor, f"fast path differs by {err:.3g} (scale {scale:.3g})"


def _special_rows(s, t, nan_row, dead_row):
    s, t = s.clone(), t.clone()
    s[nan_row, 3] = math.nan
    t[dead_row] = -math.inf
    return s, t


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [37, 5000, 70001])
def test_stats_backward_matches_recompute(divergence, dtype, V):
    """backward(stats) == backward(None): masked rows, a zero grad_rows entry, a NaN row and a
    dead row (all -inf teacher) included; both gradient sides and each alone. V = 70001: odd
    and beyond the recomputing launch's shared-memory cache."""
    N = 9
    s, t = _inputs((N, V), dtype, seed=31)
    if divergence == "tvd":
        t = _untie(s, t, 1.7)
    s, t = _special_rows(s, t, nan_row=1, dead_row=2)
    valid = torch.ones(N, dtype=torch.bool, device=DEV)
    valid[N - 1] = False
    go = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEV)
    go[0] = 0.0
    rows, _, _, st = OPS.kd_loss_forward(s, t, valid, divergence, 0.3, 1.7, False, False)
    st[N - 1] = math.nan  # a masked row's statistics are never read
    for flags in ((True, True), (True, False), (False, True)):
        fast = OPS.kd_loss_backward(go, s, t, valid, st, divergence, 0.3, 1.7, *flags)
        slow = OPS.kd_loss_backward(go, s, t, valid, None, divergence, 0.3, 1.7, *flags)
        for a, b in zip(fast, slow):
            _fast_vs_recompute(a, b, dtype)
            if b.numel():
                assert torch.count_nonzero(a[N - 1]) == 0 and torch.count_nonzero(a[0]) == 0
                assert a[1].isnan().all() and torch.count_nonzero(a[2]) == 0


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_stats_backward_matches_oracle(divergence, dtype):
    s, t = _inputs((23, 1271), dtype, seed=32)
    if divergence == "tvd":
        t = _untie(s, t, 2.5)
    valid = torch.rand(23, generator=torch.Generator().manual_seed(3)) > 0.25
    valid = valid.to(DEV)
    go = torch.randn(23, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(DEV)
    _, _, _, st = OPS.kd_loss_forward(s, t, valid, divergence, 0.4, 2.5, False, False)
    gs, gt = OPS.kd_loss_backward(go, s, t, valid, st, divergence, 0.4, 2.5, True, True)
    s64 = s.double().requires_grad_()
    t64 = t.double().requires_grad_()
    rows = ref.divergence_rows(s64, t64, divergence, 0.4, 2.5)
    (torch.where(valid, rows, torch.zeros_like(rows)) * go).sum().backward()
    _grad_err(gs, s64.grad, TOL[dtype])
    _grad_err(gt, t64.grad, TOL[dtype])


def _stats_compare(got, want, valid, rtol, atol):
    """CUDA statistics against the CPU kernel's: rows that count and are finite compare
    value by value (maxima exactly); a NaN row has a NaN maximum on both; a dead row the same
    -inf maximum."""
    got, want = got.cpu().reshape(-1, 8), want.reshape(-1, 8)
    valid = valid.cpu().reshape(-1)
    nan_rows = torch.isnan(want[:, :2]).any(1)
    assert torch.equal(torch.isnan(got[:, :2]).any(1) & valid, nan_rows & valid)
    ok = valid & ~nan_rows
    assert torch.equal(got[ok, :2], want[ok, :2])  # maxima: exact, -inf included
    torch.testing.assert_close(got[ok], want[ok], rtol=rtol, atol=atol)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_stats_same_as_cpu_kernel(divergence, dtype):
    """The forward's statistics equal the CPU kernel's, and either kernel's statistics drive
    the other's fast backward to the same gradients."""
    s, t = _inputs((11, 777), dtype, seed=33)
    if divergence == "tvd":
        t = _untie(s, t, 1.9)
    s[3, 10:20] = -math.inf
    t[3, 10:20] = -math.inf
    s, t = _special_rows(s, t, nan_row=4, dead_row=5)
    valid = torch.ones(11, dtype=torch.bool, device=DEV)
    valid[7] = False
    args = (divergence, 0.3, 1.9)
    for flags in ((False, False), (True, True)):
        got = OPS.kd_loss_forward(s, t, valid, *args, *flags)
        want = OPS.kd_loss_forward(s.cpu(), t.cpu(), valid.cpu(), *args, *flags)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-6)
        _stats_compare(got[3], want[3], valid, **tol)
        fin = valid.cpu() & ~torch.isnan(want[0])
        torch.testing.assert_close(got[3][..., 4].cpu()[fin], want[0][fin], **tol)  # L == loss
    go = torch.randn(11, generator=torch.Generator().manual_seed(6)).to(DEV)
    go = go.double() if dtype == torch.float64 else go
    base = OPS.kd_loss_backward(go, s, t, valid, got[3], *args, True, True)
    cross = OPS.kd_loss_backward(go, s, t, valid, want[3].to(DEV), *args, True, True)
    cpu_fast = OPS.kd_loss_backward(go.cpu(), s.cpu(), t.cpu(), valid.cpu(), got[3].cpu(), *args,
                                    True, True)
    for a, b, c in zip(base, cross, cpu_fast):
        _fast_vs_recompute(b, a, dtype, TOL_XDEV)
        _fast_vs_recompute(c.to(DEV), a, dtype, TOL_XDEV)


@pytest.mark.parametrize("divergence", DIVS)
def test_stats_special_rows(divergence):
    """NaN row: a NaN maximum; dead rows (all -inf on a side): that maximum -inf and loss 0;
    the fast backward gives NaN / zero gradient rows for them, and never reads the statistics
    of a masked row or of a row with grad_rows == 0."""
    s, t = _inputs((6, 300), torch.float32, seed=34)
    s[1, 7] = math.nan
    s[2] = -math.inf
    t[3] = -math.inf
    valid = torch.tensor([True, True, True, True, False, True], device=DEV)
    rows, _, _, st = OPS.kd_loss_forward(s, t, valid, divergence, 0.3, 1.0, False, False)
    assert torch.isnan(st[1, :2]).any()
    p_is_teacher = divergence not in ("reverse_kl", "skew_reverse_kl")
    s_col, t_col = (1, 0) if p_is_teacher else (0, 1)
    assert st[2, s_col].item() == -math.inf and math.isfinite(st[2, t_col].item())
    assert st[3, t_col].item() == -math.inf and rows[2].item() == 0 and rows[3].item() == 0
    assert torch.isfinite(st[[0, 5]]).all()
    go = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0], device=DEV)
    st = st.clone()
    st[4] = math.nan   # masked
    st[5] = math.nan   # zero incoming gradient
    gs, gt = OPS.kd_loss_backward(go, s, t, valid, st, divergence, 0.3, 1.0, True, True)
    assert gs[1].isnan().all() and gt[1].isnan().all()
    for r in (2, 3, 4, 5):
        assert torch.count_nonzero(gs[r]) == 0 and torch.count_nonzero(gt[r]) == 0, r
    assert torch.isfinite(gs[0]).all() and torch.count_nonzero(gs[0]) > 0


def test_stats_argument_checks():
    s, t = _inputs((4, 10), torch.float32)
    go = torch.ones(4, device=DEV)
    st = OPS.kd_loss_forward(s, t, None, "jsd", 0.3, 1.0, False, False)[3]
    bw = OPS.kd_loss_backward
    with pytest.raises(RuntimeError, match=r"stats must hold 8 values per row \(32\), got 24"):
        bw(go, s, t, None, st[:3], "jsd", 0.3, 1.0, True, False)
    with pytest.raises(RuntimeError, match="stats must be Float"):
        bw(go, s, t, None, st.double(), "jsd", 0.3, 1.0, True, False)
    with pytest.raises(RuntimeError, match="stats is on cpu"):
        bw(go, s, t, None, st.cpu(), "jsd", 0.3, 1.0, True, False)
    # half logits: float32 statistics
    sh, th = s.half(), t.half()
    st_h = OPS.kd_loss_forward(sh, th, None, "jsd", 0.3, 1.0, False, False)[3]
    assert st_h.dtype == torch.float32
    with pytest.raises(RuntimeError, match="stats must be Float"):
        bw(go, sh, th, None, st_h.half(), "jsd", 0.3, 1.0, True, False)
    # the existing checks still come first / still apply
    with pytest.raises(RuntimeError, match="grad_rows must have one entry per row"):
        bw(torch.ones(3, device=DEV), s, t, None, st, "jsd", 0.3, 1.0, True, False)
    # a non-contiguous [rows, 8] view is accepted
    wide = torch.zeros(4, 16, device=DEV)
    wide[:, ::2] = st
    a = bw(go, s, t, None, wide[:, ::2], "jsd", 0.3, 1.0, True, True)
    b = bw(go, s, t, None, st, "jsd", 0.3, 1.0, True, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # top-k
    _, idx, tk = _topk_inputs(4, 10, 3, torch.float32, torch.float32)
    st_k = OPS.kd_loss_topk_forward(s, idx, tk, None, "jsd", 0.3, 1.0, False, False)[3]
    tb = OPS.kd_loss_topk_backward
    with pytest.raises(RuntimeError, match="stats must hold 8 values per row"):
        tb(go, s, idx, tk, None, st_k.reshape(-1)[:31], "jsd", 0.3, 1.0, True, False)
    with pytest.raises(RuntimeError, match="stats must be Float"):
        tb(go, s, idx, tk, None, st_k.double(), "jsd", 0.3, 1.0, True, False)
    with pytest.raises(RuntimeError, match="stats is on cpu"):
        tb(go, s, idx, tk, None, st_k.cpu(), "jsd", 0.3, 1.0, True, False)


@pytest.mark.parametrize("divergence", TOPK_DIVS)
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float16)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_topk_stats_backward(divergence, dtypes):
    """Top-k: backward(stats) == backward(None) (masked, zero-gradient, NaN and dead rows
    included), the statistics equal the CPU kernel's, and the fast gradients the oracle's."""
    N, V, K = 9, 3001, 40
    s, idx, tk = _topk_inputs(N, V, K, *dtypes, seed=35)
    if divergence == "tvd":
        tk = _untie_topk(s, idx, tk, 1.3)
    s_sp = s.clone()
    tk_sp = tk.clone()
    s_sp[1, 5] = math.nan
    tk_sp[2] = -math.inf
    valid = torch.ones(N, dtype=torch.bool, device=DEV)
    valid[N - 1] = False
    go = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(DEV)
    go[0] = 0.0
    args = (divergence, 0.3, 1.3)
    _, _, _, st = OPS.kd_loss_topk_forward(s_sp, idx, tk_sp, valid, *args, False, False)
    want = OPS.kd_loss_topk_forward(s_sp.cpu(), idx.cpu(), tk_sp.cpu(), valid.cpu(), *args,
                                    False, False)[3]
    tol = dict(rtol=1e-10, atol=1e-12) if dtypes[0] == torch.float64 else dict(rtol=3e-5, atol=3e-6)
    _stats_compare(st, want, valid, **tol)
    for flags in ((True, True), (True, False), (False, True)):
        fast = OPS.kd_loss_topk_backward(go, s_sp, idx, tk_sp, valid, st, *args, *flags)
        slow = OPS.kd_loss_topk_backward(go, s_sp, idx, tk_sp, valid, None, *args, *flags)
        for a, b in zip(fast, slow):
            _fast_vs_recompute(a, b, dtypes[0] if a.dtype == dtypes[0] else a.dtype)
            if b.numel():
                assert a[1].isnan().all() and torch.count_nonzero(a[2]) == 0
                assert torch.count_nonzero(a[0]) == 0 and torch.count_nonzero(a[N - 1]) == 0
    # oracle on the ordinary rows, through autograd (which hands the statistics over)
    ok = torch.tensor([3, 4, 5, 6, 7], device=DEV)
    _check_topk(s[ok], idx[ok], tk[ok], go=go[ok].cpu().to(DEV), divergence=divergence,
                beta=0.3, temperature=1.3, reduction="none")


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_autograd_uses_the_fast_backward(divergence):
    """pde.kd_loss's backward hands the forward's statistics to the backward op: its gradient
    is bit for bit the fast path's."""
    s, t = _inputs((3, 200), torch.float32, seed=36)
    if divergence == "tvd":
        t = _untie(s, t, 1.0)
    ss = s.clone().requires_grad_()
    pde.kd_loss(ss, t, divergence=divergence, reduction="sum", _backend="cuda").backward()
    st = OPS.kd_loss_forward(s, t, None, divergence, 0.5, 1.0, False, False)[3]
    g_fast = OPS.kd_loss_backward(torch.ones(3, device=DEV), s, t, None, st, divergence, 0.5,
                                  1.0, True, False)[0]
    assert torch.equal(ss.grad, g_fast)


# ------------------------------------------------------------------ top-k teacher

def _topk_inputs(N, V, K, dtype, tdtype, seed=0, idx_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]).to(idx_dtype)
    tk = (torch.randn(N, K, generator=g, dtype=torch.float64) * 2 + 3).to(tdtype)
    return s.to(DEV), idx.to(DEV), tk.to(DEV)


def _untie_topk(s, idx, tk, temperature):
    """_untie on the K support columns (off the support p_t = 0 < p_s: no tie)."""
    for _ in range(60):
        ps = torch.softmax(s.double() / temperature, -1).gather(-1, idx.long())
        pt = torch.softmax(tk.double() / temperature, -1)
        hi = torch.maximum(ps, pt)
        close = ((ps - pt).abs() <= 1e-3 * hi) & (hi > 0)
        if not bool(close.any()):
            return tk
        tk = torch.where(close, (tk.double() + 0.25 * temperature).to(tk.dtype), tk)
    raise AssertionError("could not separate p_s and p_t")


def _check_topk(s, idx, tk, go=None, tols=TOL, **kw):
    tol = tols[s.dtype]
    ttol = tols[tk.dtype]
    ss = s.detach().clone().requires_grad_()
    tt = tk.detach().clone().requires_grad_()
    out = pde.kd_loss_topk(ss, idx, tt, _backend="cuda", **kw)
    s64 = s.detach().double().requires_grad_()
    t64 = tk.detach().double().requires_grad_()
    want = ref.kd_loss_topk(s64, idx.long(), t64, **kw)
    assert out.dtype == s.dtype
    torch.testing.assert_close(out.double(), want, rtol=tol["loss"][0], atol=tol["loss"][1])
    if go is None:
        go = torch.ones_like(want)
    out.backward(go.to(out.dtype))
    want.backward(go)
    assert ss.grad.dtype == s.dtype and tt.grad.dtype == tk.dtype
    _grad_err(ss.grad, s64.grad, tol)
    _grad_err(tt.grad, t64.grad, dict(ttol, grad=max(ttol["grad"], tol["grad"])))


@pytest.mark.parametrize("divergence", TOPK_DIVS)
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float16), (torch.float16, torch.float32)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_topk_matches_oracle(divergence, dtypes, temperature, masked):
    s, idx, tk = _topk_inputs(37, 1271, 50, *dtypes, seed=2,
                              idx_dtype=torch.int32 if masked else torch.int64)
    if divergence == "tvd":
        tk = _untie_topk(s, idx, tk, temperature)
    labels = _labels((37,)) if masked else None
    for reduction in ("batchmean", "none"):
        _check_topk(s, idx, tk, divergence=divergence, beta=0.3, temperature=temperature,
                    reduction=reduction, labels=labels)


@pytest.mark.parametrize("divergence", TOPK_DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_topk_llama3_vocabulary(divergence, dtype):
    s, idx, tk = _topk_inputs(4, 128256, 128, dtype, dtype, seed=5)
    if divergence == "tvd":
        tk = _untie_topk(s, idx, tk, 1.0)
    go = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEV)
    _check_topk(s, idx, tk, divergence=divergence, beta=0.6, reduction="none", go=go,
                tols=TOL_LONG_ROWS)


@pytest.mark.parametrize("divergence", TOPK_DIVS)
def test_topk_full_support_equals_dense(divergence):
    # K = V in a shuffled order: the top-k op must equal the dense op
    s, t = _inputs((6, 97), torch.float64, seed=8)
    g = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.randperm(97, generator=g) for _ in range(6)]).to(DEV)
    tk = t.gather(1, idx)
    rows_k, gs_k, gt_k, st_k = OPS.kd_loss_topk_forward(s, idx, tk, None, divergence, 0.4, 1.3,
                                                        True, True)
    rows_d, gs_d, gt_d, st_d = OPS.kd_loss_forward(s, t, None, divergence, 0.4, 1.3, True, True)
    torch.testing.assert_close(rows_k, rows_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs_k, gs_d, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gt_k, gt_d.gather(1, idx), rtol=1e-9, atol=1e-12)
    # the same statistics (the top-k ones hold the family sums with the off-support terms)
    torch.testing.assert_close(st_k, st_d, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", TOPK_DIVS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_topk_same_as_cpu_kernel(divergence, dtype):
    s, idx, tk = _topk_inputs(11, 500, 20, dtype, dtype, seed=9)
    valid = torch.ones(11, dtype=torch.bool, device=DEV)
    valid[3] = False
    if divergence == "tvd":
        tk = _untie_topk(s, idx, tk, 1.4)
    tk[6] = -math.inf  # a teacher row with no mass: loss 0, gradient 0
    args = (divergence, 0.3, 1.4, True, True)
    got = OPS.kd_loss_topk_forward(s, idx, tk, valid, *args)
    want = OPS.kd_loss_topk_forward(s.cpu(), idx.cpu(), tk.cpu(), valid.cpu(), *args)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-6)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_cuda
        torch.testing.assert_close(a.cpu(), b, **tol)
    go = torch.randn(11, dtype=got[0].dtype).to(DEV)
    for st_gpu, st_cpu in ((None, None), (got[3], want[3])):
        got_b = OPS.kd_loss_topk_backward(go, s, idx, tk, valid, st_gpu, *args)
        want_b = OPS.kd_loss_topk_backward(go.cpu(), s.cpu(), idx.cpu(), tk.cpu(), valid.cpu(),
                                           st_cpu, *args)
        for a, b in zip(got_b, want_b):
            torch.testing.assert_close(a.cpu(), b, **tol)


def test_topk_skew_forward_beta_one_is_zero():
    # KL(p_t || p_t) = 0 with a zero gradient, even though p_t = 0 off the support
    s, idx, tk = _topk_inputs(5, 300, 10, torch.float32, torch.float32, seed=3)
    rows, gs, gt, st = OPS.kd_loss_topk_forward(s, idx, tk, None, "skew_forward_kl", 1.0, 1.0,
                                                True, True)
    assert torch.count_nonzero(rows) == 0
    assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0
    go = torch.ones(5, device=DEV)
    for stats in (None, st):
        gs, gt = OPS.kd_loss_topk_backward(go, s, idx, tk, None, stats, "skew_forward_kl", 1.0,
                                           1.0, True, True)
        assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0
    s2, t2 = _inputs((5, 300), torch.float32, seed=3)  # dense: the same
    rows, gs, gt, st = OPS.kd_loss_forward(s2, t2, None, "skew_forward_kl", 1.0, 1.0, True, True)
    assert torch.count_nonzero(rows) == 0 and torch.count_nonzero(gs) == 0
    assert torch.count_nonzero(gt) == 0
    for stats in (None, st):
        gs, gt = OPS.kd_loss_backward(go, s2, t2, None, stats, "skew_forward_kl", 1.0, 1.0,
                                      True, True)
        assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0


def test_topk_output_contract_and_edges():
    s, idx, tk = _topk_inputs(3, 40, 5, torch.bfloat16, torch.float16)
    rows, gs, gt, st = OPS.kd_loss_topk_forward(s, idx, tk, None, "jsd", 0.5, 1.0, True, True)
    assert rows.dtype == torch.float32 and rows.shape == (3,)
    assert st.dtype == torch.float32 and st.shape == (3, 8) and st.is_contiguous()
    assert gs.dtype == torch.bfloat16 and gs.shape == s.shape
    assert gt.dtype == torch.float16 and gt.shape == tk.shape
    rows, gs, gt, _ = OPS.kd_loss_topk_forward(s, idx, tk, None, "jsd", 0.5, 1.0, False, False)
    assert gs.shape == (0,) and gt.shape == (0,) and gt.dtype == torch.float16
    # K = 0: the teacher has no mass anywhere -> loss 0, gradient 0
    e_idx = idx[:, :0]
    rows, gs, gt, _ = OPS.kd_loss_topk_forward(s, e_idx, tk[:, :0], None, "forward_kl", 0.5,
                                               1.0, True, True)
    assert torch.count_nonzero(rows) == 0 and torch.count_nonzero(gs) == 0 and gt.shape == (3, 0)
    # N = 0
    rows, gs, gt, st = OPS.kd_loss_topk_forward(s[:0], idx[:0], tk[:0], None, "tvd", 0.5, 1.0,
                                                True, True)
    assert rows.shape == (0,) and gs.shape == (0, 40) and gt.shape == (0, 5)
    assert st.shape == (0, 8)
    # masked rows stay 0, a dead student row gives 0
    s2 = s.clone()
    s2[1] = -math.inf
    valid = torch.tensor([True, True, False], device=DEV)
    rows, gs, gt, _ = OPS.kd_loss_topk_forward(s2, idx, tk, valid, "tvd", 0.5, 1.0, True, True)
    assert rows[1].item() == 0 and rows[2].item() == 0 and rows[0].item() > 0
    assert torch.count_nonzero(gs[1:]) == 0 and torch.count_nonzero(gt[1:]) == 0


def test_topk_index_checks():
    s, idx, tk = _topk_inputs(4, 30, 6, torch.float32, torch.float32)
    op = OPS.kd_loss_topk_forward
    bad = idx.clone()
    bad[2, 3] = 30
    with pytest.raises(ValueError, match="must lie in"):
        pde.kd_loss_topk(s, bad, tk, _backend="cuda")
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 30\)"):
        op(s, bad, tk, None, "forward_kl", 0.5, 1.0, False, False)
    bad[2, 3] = -1
    with pytest.raises(RuntimeError, match="must lie in"):
        op(s, bad, tk, None, "forward_kl", 0.5, 1.0, False, False)
    dup = idx.clone()
    dup[1, 4] = dup[1, 0]
    with pytest.raises(RuntimeError, match=f"row 1 repeats vocabulary index {int(dup[1, 0])}"):
        op(s, dup, tk, None, "forward_kl", 0.5, 1.0, False, False)
    with pytest.raises(RuntimeError, match="repeats vocabulary index"):
        pde.kd_loss_topk(s, dup.int(), tk, _backend="cuda")
    # checked on every row, masked or not (as the CPU kernel)
    with pytest.raises(RuntimeError, match="repeats vocabulary index"):
        op(s, dup, tk, torch.tensor([True, False, True, True], device=DEV), "tvd", 0.5, 1.0,
           False, False)
    with pytest.raises(RuntimeError, match="infinite for a top-k teacher"):
        op(s, idx, tk, None, "reverse_kl", 0.5, 1.0, False, False)
    with pytest.raises(RuntimeError, match="exceeds the vocabulary"):
        op(s[:, :5], idx, tk, None, "forward_kl", 0.5, 1.0, False, False)
    with pytest.raises(RuntimeError, match="teacher_indices must be int64 or int32"):
        op(s, idx.float(), tk, None, "forward_kl", 0.5, 1.0, False, False)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_topk_gradcheck(divergence):
    s, idx, tk = _topk_inputs(3, 9, 4, torch.float64, torch.float64, seed=6)
    s.requires_grad_()
    tk.requires_grad_()
    labels = torch.tensor([1, 2, -100], device=DEV)
    f = lambda a, b: pde.kd_loss_topk(a, idx, b, divergence=divergence, beta=0.3,
                                      temperature=1.3, labels=labels, reduction="sum",
                                      _backend="cuda")
    assert torch.autograd.gradcheck(f, (s, tk), eps=1e-6, atol=1e-8)


def test_topk_opcheck():
    s, idx, tk = _topk_inputs(4, 37, 5, torch.float32, torch.float32)
    valid = torch.tensor([True, False, True, True], device=DEV)
    for gs, gt in ((True, False), (True, True), (False, False)):
        args = (s.clone().requires_grad_(gs), idx, tk.clone().requires_grad_(gt), valid, "jsd",
                0.3, 2.0, gs, gt)
        torch.library.opcheck(OPS.kd_loss_topk_forward.default, args)


# ------------------------------------------------------------------ torch.compile (last: slow)

def test_compile_fullgraph_native_op():
    s, t = _inputs((6, 1000), torch.float32)
    valid = torch.tensor([True, True, False, True, True, True], device=DEV)

    def f(a, b):
        rows = OPS.kd_loss_forward(a, b, valid, "jsd", 0.3, 2.0, False, False)[0]
        return rows.sum() * 3.0

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    a1 = s.clone().requires_grad_()
    a2 = s.clone().requires_grad_()
    out1, out2 = cf(a1, t), f(a2, t)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(a1.grad, a2.grad)


def test_compile_fullgraph_public_api():
    s, t = _inputs((6, 1000), torch.float32)
    labels = _labels((6,))

    def f(a, b, lab):
        return pde.kd_loss(a, b, divergence="jsd", beta=0.3, temperature=2.0, labels=lab,
                           _backend="cuda") * 3.0

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    a1 = s.clone().requires_grad_()
    a2 = s.clone().requires_grad_()
    out1, out2 = cf(a1, t, labels), f(a2, t, labels)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(a1.grad, a2.grad)
