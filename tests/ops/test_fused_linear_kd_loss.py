"""fused_linear_kd_loss against the eager composite (matmul, then the float64 oracle)."""
import pytest
import torch

import pydistill_ext as pde
from reference import kd_loss as ref


def _case(n=37, h=24, v=101, ht=16, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    return dict(h=r(n, h), w=r(v, h) * 0.3, b=r(v) if bias else None, th=r(n, ht),
                tw=r(v, ht) * 0.3, tb=r(v) if bias else None, tl=r(n, v) * 2)


def _leaves(case, names):
    return {k: (case[k].clone().requires_grad_() if case[k] is not None else None) for k in names}


@pytest.mark.parametrize("divergence", pde.DIVERGENCES)
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_matches_eager(divergence, teacher, reduction, chunk):
    c = _case()
    labels = torch.randint(0, 3, (37,), generator=torch.Generator().manual_seed(2))
    labels[::4] = -100
    names = ["h", "w", "b", "tl"] if teacher == "logits" else ["h", "w", "b", "th", "tw", "tb"]
    a = _leaves(c, names)
    e = _leaves(c, names)
    kw = dict(divergence=divergence, beta=0.3, temperature=1.5, reduction=reduction, labels=labels)
    if teacher == "logits":
        out = pde.fused_linear_kd_loss(a["h"], a["w"], student_bias=a["b"], teacher_logits=a["tl"],
                                       chunk_size=chunk, **kw)
        t_logits = e["tl"]
    else:
        out = pde.fused_linear_kd_loss(a["h"], a["w"], student_bias=a["b"], teacher_hidden=a["th"],
                                       teacher_weight=a["tw"], teacher_bias=a["tb"],
                                       chunk_size=chunk, **kw)
        t_logits = e["th"] @ e["tw"].t() + e["tb"]
    want = ref.kd_loss(e["h"] @ e["w"].t() + e["b"], t_logits, **kw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(want)
    out.backward(go)
    want.backward(go)
    for k in names:
        torch.testing.assert_close(a[k].grad, e[k].grad, rtol=1e-9, atol=1e-11, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision(dtype):
    c = _case(n=64, h=32, v=257, dtype=dtype, bias=False)
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    out = pde.fused_linear_kd_loss(h, w, teacher_logits=c["tl"], chunk_size=16)
    h64, w64 = c["h"].double().requires_grad_(), c["w"].double().requires_grad_()
    want = ref.kd_loss(h64 @ w64.t(), c["tl"].double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    out.backward()
    want.backward()
    for got, exp in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert got.dtype == dtype
        assert (got.double() - exp).abs().max() <= tol * 2 * exp.abs().max()


def test_frozen_weight_gets_no_gradient_buffer():
    c = _case(bias=False)
    h = c["h"].clone().requires_grad_()
    out = pde.fused_linear_kd_loss(h, c["w"], teacher_logits=c["tl"])
    out.backward()
    assert c["w"].grad is None and h.grad is not None


def test_gradcheck_and_repeated_backward():
    c = _case(n=5, h=3, v=7, ht=2)
    a = _leaves(c, ["h", "w", "b", "th", "tw"])
    for red in ("batchmean", "none"):
        f = lambda h, w, b, th, tw: pde.fused_linear_kd_loss(  # noqa: E731
            h, w, student_bias=b, teacher_hidden=th, teacher_weight=tw, divergence="jsd",
            reduction=red, chunk_size=2)
        assert torch.autograd.gradcheck(f, tuple(a.values()), eps=1e-6, atol=1e-8)


def test_three_dim_and_compile():
    c = _case(n=12, h=8, v=33, dtype=torch.float32, bias=False)
    h = c["h"].reshape(3, 4, 8)
    tl = c["tl"].reshape(3, 4, 33)

    def f(hh, w):
        return pde.fused_linear_kd_loss(hh, w, teacher_logits=tl, chunk_size=5, temperature=2.0)

    h1, w1 = h.clone().requires_grad_(), c["w"].clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), c["w"].clone().requires_grad_()
    out1 = torch.compile(f, fullgraph=True)(h1, w1)
    out2 = f(h2, w2)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    rows = pde.fused_linear_kd_loss(h, c["w"], teacher_logits=tl, reduction="none")
    assert rows.shape == (3, 4)


def test_module_and_auto_chunk():
    c = _case()
    m = pde.FusedLinearKDLoss(divergence="tvd")
    out = m(c["h"], c["w"], teacher_logits=c["tl"], student_bias=c["b"])
    torch.testing.assert_close(out, ref.kd_loss(c["h"] @ c["w"].t() + c["b"], c["tl"], divergence="tvd"))
    from pydistill_ext.ops.fused_linear_kd_loss import MIN_CHUNK_ROWS, auto_chunk_size
    assert auto_chunk_size(10, 128256, torch.device("cpu")) == 10
    assert auto_chunk_size(100000, 128256, torch.device("cpu")) >= MIN_CHUNK_ROWS


def test_bad_inputs():
    c = _case()
    with pytest.raises(ValueError, match="exactly one of teacher_logits or teacher_hidden"):
        pde.fused_linear_kd_loss(c["h"], c["w"])
    with pytest.raises(ValueError, match="student_weight has H=24 columns|student_weight has"):
        pde.fused_linear_kd_loss(c["h"], c["w"][:, :5], teacher_logits=c["tl"])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        pde.fused_linear_kd_loss(c["h"], c["w"], teacher_logits=c["tl"][:, :5])
    with pytest.raises(ValueError, match="teacher_weight has V="):
        pde.fused_linear_kd_loss(c["h"], c["w"], teacher_hidden=c["th"], teacher_weight=c["tw"][:5])
    with pytest.raises(ValueError, match="student_bias must have shape"):
        pde.fused_linear_kd_loss(c["h"], c["w"], teacher_logits=c["tl"], student_bias=c["b"][:3])
    with pytest.raises(ValueError, match="chunk_size"):
        pde.fused_linear_kd_loss(c["h"], c["w"], teacher_logits=c["tl"], chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        pde.fused_linear_kd_loss(c["h"], c["w"], teacher_logits=c["tl"], temperature=0)
    with pytest.raises(ValueError, match="labels shape"):
        pde.fused_linear_kd_loss(c["h"], c["w"], teacher_logits=c["tl"], labels=torch.zeros(3, dtype=torch.long))


def test_retained_graph_recomputes_exactly():
    c = _case(n=9, h=5, v=11, bias=False)
    h, w = c["h"].clone().requires_grad_(), c["w"].clone().requires_grad_()
    loss = pde.fused_linear_kd_loss(h, w, teacher_logits=c["tl"], divergence="tvd", chunk_size=4)
    g1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss * 2.0, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(2.0 * a, b, rtol=1e-12, atol=1e-14)
