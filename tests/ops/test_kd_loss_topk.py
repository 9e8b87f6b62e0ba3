"""kd_loss_topk (CPU kernel) against the float64 oracle (dense teacher, -inf off the top-k)."""
import pytest
import torch

import pydistill_ext as pde
from reference import kd_loss as ref

DIVS = [d for d in pde.DIVERGENCES if d != "reverse_kl"]


def _case(n=7, v=300, k=16, dtype=torch.float64, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (lead or (n,)) + (v,)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    teacher = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    vals, idx = teacher.topk(k, dim=-1)
    perm = torch.randperm(k, generator=g)  # order of the K entries must not matter
    return s, idx[..., perm], vals[..., perm]


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_topk_matches_oracle(divergence, temperature, masked):
    s, idx, vals = _case()
    labels = torch.tensor([1, -100, 2, 3, -100, 0, 1]) if masked else None
    for reduction in pde.REDUCTIONS:
        ss = s.clone().requires_grad_()
        tv = vals.clone().requires_grad_()
        out = pde.kd_loss_topk(ss, idx, tv, divergence=divergence, beta=0.3,
                               temperature=temperature, reduction=reduction, labels=labels)
        s64 = s.clone().requires_grad_()
        t64 = vals.clone().requires_grad_()
        want = ref.kd_loss_topk(s64, idx, t64, divergence=divergence, beta=0.3,
                                temperature=temperature, reduction=reduction, labels=labels)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        go = torch.randn_like(want)
        out.backward(go)
        want.backward(go)
        torch.testing.assert_close(ss.grad, s64.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(tv.grad, t64.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_topk_low_precision_and_fp16_cache(dtype):
    s, idx, vals = _case(lead=(2, 3), dtype=dtype)
    vals16 = vals.half()  # an fp16 top-k cache beside a float32/bf16 student
    ss = s.clone().requires_grad_()
    out = pde.kd_loss_topk(ss, idx.int(), vals16, divergence="forward_kl")
    s64 = s.double().requires_grad_()
    want = ref.kd_loss_topk(s64, idx, vals16.double(), divergence="forward_kl")
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * 0.1)
    out.backward()
    want.backward()
    err = (ss.grad.double() - s64.grad).abs().max()
    assert err <= tol * s64.grad.abs().max()


def test_topk_with_k_equal_v_is_dense_kd():
    s, idx, vals = _case(v=20, k=20)
    dense = torch.empty_like(s).scatter_(-1, idx, vals)
    for d in DIVS:
        torch.testing.assert_close(pde.kd_loss_topk(s, idx, vals, divergence=d),
                                   pde.kd_loss(s, dense, divergence=d))


def test_topk_gradcheck():
    s, idx, vals = _case(n=3, v=9, k=4)
    s.requires_grad_()
    vals.requires_grad_()
    for d in ("forward_kl", "jsd", "tvd", "skew_reverse_kl"):
        assert torch.autograd.gradcheck(
            lambda a, b: pde.kd_loss_topk(a, idx, b, divergence=d, beta=0.4, temperature=1.3),
            (s, vals), eps=1e-6, atol=1e-8)


def test_topk_opcheck_and_compile():
    s, idx, vals = _case(n=4, v=40, k=5, dtype=torch.float32)
    valid = torch.tensor([True, True, False, True])
    for gs, gt in ((True, False), (True, True)):
        torch.library.opcheck(torch.ops.pydistill_ext.kd_loss_topk_forward.default,
                              (s.clone().requires_grad_(gs), idx, vals.clone().requires_grad_(gt),
                               valid, "jsd", 0.5, 1.0, gs, gt))
        stats = torch.ops.pydistill_ext.kd_loss_topk_forward(s, idx, vals, valid, "jsd", 0.5, 1.0,
                                                             False, False)[3]
        for st in (stats, None):
            torch.library.opcheck(torch.ops.pydistill_ext.kd_loss_topk_backward.default,
                                  (torch.randn(4), s, idx, vals, valid, st, "jsd", 0.5, 1.0, gs, gt))

    def f(a, i, b):
        return pde.kd_loss_topk(a, i, b, divergence="skew_forward_kl", beta=0.1, temperature=2.0)

    a1, a2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    out1 = torch.compile(f, fullgraph=True)(a1, idx, vals)
    out2 = f(a2, idx, vals)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(a1.grad, a2.grad)


def test_topk_bad_inputs():
    s, idx, vals = _case(n=3, v=10, k=4)
    with pytest.raises(ValueError, match="infinite for a top-k teacher"):
        pde.kd_loss_topk(s, idx, vals, divergence="reverse_kl")
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        big = torch.arange(12).expand(3, 12)
        pde.kd_loss_topk(s, big, torch.zeros(3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="teacher_indices must be an int64"):
        pde.kd_loss_topk(s, idx.double(), vals)
    with pytest.raises(ValueError, match="must equal teacher_logits_topk shape"):
        pde.kd_loss_topk(s, idx, vals[:, :3])
    with pytest.raises(ValueError, match="leading shape"):
        pde.kd_loss_topk(s, idx[:2], vals[:2])
    bad = idx.clone()
    bad[1, 2] = 10
    with pytest.raises(RuntimeError, match=r"teacher_indices must lie in \[0, 10\)"):
        pde.kd_loss_topk(s, bad, vals)
    bad[1, 2] = -1
    with pytest.raises(RuntimeError, match=r"teacher_indices must lie in"):
        pde.kd_loss_topk(s, bad, vals)
    dup = idx.clone()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(RuntimeError, match="repeats vocabulary index"):
        pde.kd_loss_topk(s, dup, vals)



@pytest.mark.parametrize("divergence", DIVS)
def test_topk_backward_from_stats_equals_recompute(divergence):
    s, idx, vals = _case(n=5, v=64, k=6)
    op = torch.ops.pydistill_ext
    stats = op.kd_loss_topk_forward(s, idx, vals, None, divergence, 0.3, 1.5, False, False)[3]
    go = torch.randn(5, dtype=torch.float64)
    fast = op.kd_loss_topk_backward(go, s, idx, vals, None, stats, divergence, 0.3, 1.5, True, True)
    slow = op.kd_loss_topk_backward(go, s, idx, vals, None, None, divergence, 0.3, 1.5, True, True)
    for f, w in zip(fast, slow):
        torch.testing.assert_close(f, w, rtol=1e-12, atol=1e-15)
