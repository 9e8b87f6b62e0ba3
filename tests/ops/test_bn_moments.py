"""bn_moments (CPU kernel) against the float64 oracle and the anchors' hook in
python/reference/bn_moments.py."""
import pytest
import torch

import pydistill_ext as pde
from reference import bn_moments as ref

FWD = torch.ops.pydistill_ext.bn_moments_forward
BWD = torch.ops.pydistill_ext.bn_moments_backward
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Tolerances relative to the scale of each output (mean: max|x|, var: max|x - mean|^2 of the
# (rounded) input). The oracle runs in float64 on the same rounded inputs and the outputs are in
# the compute dtype (float32 for half inputs), so the error is the accumulation only: float64
# ~1e-16 * sqrt-ish growth, float32 ~6e-8 per operation over a few thousand elements.
TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
SHAPES = [(8, 5, 7, 6), (16, 3, 16, 16), (1, 4, 9, 9), (6, 7, 1, 1), (20, 9), (3, 4, 5, 3, 2),
          (2, 70, 3, 3), (33, 1, 2, 5)]


def _x(shape, dtype, seed=0, loc=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


def _check(got, want, dtype, x, per_sample=False):
    (gm, gv), (wm, wv) = got, want
    comp = torch.float64 if dtype == torch.float64 else torch.float32
    assert gm.dtype == comp and gv.dtype == comp
    assert gm.shape == wm.shape and gv.shape == wv.shape
    xd = x.double()
    ms = xd.abs().max().item()
    vs = max(wv.abs().max().item(), 1e-300)
    em = (gm.double() - wm).abs().max().item()
    ev = (gv.double() - wv).abs().max().item()
    assert em <= TOL[dtype] * ms, f"mean error {em:.3g} (scale {ms:.3g})"
    assert ev <= TOL[dtype] * 4 * vs, f"var error {ev:.3g} (scale {vs:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_sample,unbiased", [(False, False), (False, True), (True, False),
                                                 (True, True)])
def test_matches_oracle(dtype, shape, per_sample, unbiased):
    x = _x(shape, dtype)
    spatial = 1
    for d in shape[2:]:
        spatial *= d
    if unbiased and (spatial if per_sample else shape[0] * spatial) == 1:
        pytest.skip("count 1: an error with unbiased (tested below)")
    got = pde.bn_moments(x, per_sample=per_sample, unbiased=unbiased)
    _check(got, ref.bn_moments(x, per_sample, unbiased), dtype, x, per_sample)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_channels_last_and_strided(dtype, per_sample):
    x = _x((6, 20, 5, 7), dtype, seed=1)
    want = ref.bn_moments(x, per_sample)
    dense = pde.bn_moments(x, per_sample=per_sample)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    got = pde.bn_moments(cl, per_sample=per_sample)
    _check(got, want, dtype, x)
    x3 = _x((4, 6, 3, 5, 2), dtype, seed=2).contiguous(memory_format=torch.channels_last_3d)
    _check(pde.bn_moments(x3, per_sample=per_sample), ref.bn_moments(x3, per_sample), dtype, x3)
    # non-dense views: a slice, a transposed spatial pair, an expanded tensor
    big = _x((6, 40, 5, 14), dtype, seed=3)
    for v in (big[:, ::2, :, ::2], big.transpose(2, 3), x[:1].expand(5, 20, 5, 7)):
        _check(pde.bn_moments(v, per_sample=per_sample), ref.bn_moments(v, per_sample), dtype, v)
    assert dense[0].shape == got[0].shape


def test_matches_anchor_hook_literal():
    """The DeepInversion / SRe2L hook's exact lines, in float64."""
    x = _x((10, 12, 8, 8), torch.float64, seed=4)
    m, v = pde.bn_moments(x)
    hm, hv = ref.hook_moments(x)
    torch.testing.assert_close(m, hm, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(v, hv, rtol=1e-13, atol=1e-13)


def test_large_mean_small_variance_fp32():
    """mean 1e4, std 1e-2 in float32: E[x^2] - E[x]^2 cancels every digit; Welford does not."""
    x = _x((32, 8, 16, 16), torch.float32, seed=5, loc=1e4, scale=1e-2)
    _, want_v = ref.bn_moments(x)
    m, v = pde.bn_moments(x)
    rel = ((v.double() - want_v).abs() / want_v).max().item()
    assert rel < 1e-5, rel
    _, naive_v = ref.naive_moments_fp32(x)
    naive_rel = ((naive_v.double() - want_v).abs() / want_v).max().item()
    assert naive_rel > 0.5, naive_rel  # the naive formula is useless here (often negative)
    # per-sample form, channels_last, and an offset first element (the shift is x[0, c, 0])
    xs = x.clone()
    xs[0, :, 0, 0] += 50.0
    for t, ps in ((x, True), (x.contiguous(memory_format=torch.channels_last), False),
                  (xs, False), (xs.contiguous(memory_format=torch.channels_last), True)):
        _, wv = ref.bn_moments(t, ps)
        _, gv = pde.bn_moments(t, per_sample=ps)
        assert ((gv.double() - wv).abs() / wv).max().item() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_large_values_do_not_overflow(dtype):
    # |x| up to ~6e4 (fp16 max 65504): x^2 and var (~1e9) overflow fp16, not the float32 outputs
    x = _x((8, 4, 6, 6), torch.float64, seed=6, loc=0.0, scale=2e4).clamp(-6e4, 6e4).to(dtype)
    m, v = pde.bn_moments(x)
    assert m.dtype == torch.float32 and torch.isfinite(v).all() and v.max() > 65504
    _check((m, v), ref.bn_moments(x), dtype, x)
    g = torch.ones(4) * 1e-6
    a = x.clone().requires_grad_()
    mm, vv = pde.bn_moments(a)
    (mm.sum() + (vv * g).sum()).backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()


def test_deterministic_across_thread_counts():
    old = torch.get_num_threads()
    inputs = [(_x((64, 24, 12, 12), torch.float32, seed=7), ps) for ps in (False, True)]
    inputs += [(t.contiguous(memory_format=torch.channels_last), ps) for t, ps in inputs]
    inputs += [(_x((4096, 40), torch.float32, seed=8), False)]
    try:
        res = {}
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            res[nt] = [pde.bn_moments(t, per_sample=ps) for t, ps in inputs]
            res[nt] += [pde.bn_moments(t, per_sample=ps) for t, ps in inputs]  # run to run
    finally:
        torch.set_num_threads(old)
    for nt in (2, 3):
        for (m1, v1), (m2, v2) in zip(res[1], res[nt]):
            assert torch.equal(m1, m2) and torch.equal(v1, v2)


def _grad_inputs(shape, per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    out_shape = (shape[0], shape[1]) if per_sample else (shape[1],)
    return (torch.randn(out_shape, generator=g, dtype=torch.float64),
            torch.randn(out_shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 5, 7, 6), (20, 9), (3, 4, 5, 3, 2), (1, 3, 4, 4)], ids=str)
@pytest.mark.parametrize("per_sample,unbiased", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_oracle_autograd(dtype, shape, per_sample, unbiased, channels_last):
    if per_sample and len(shape) == 2:
        pytest.skip("per-sample unbiased on [N, C] has count 1")
    x = _x(shape, dtype, seed=9)
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    gm, gv = _grad_inputs(shape, per_sample, 10)
    a = x.clone().requires_grad_()
    m, v = pde.bn_moments(a, per_sample=per_sample, unbiased=unbiased)
    (m * gm.to(m.dtype)).sum().add((v * gv.to(v.dtype)).sum()).backward()
    b = x.double().requires_grad_()
    wm, wv = ref.bn_moments(b, per_sample, unbiased)
    ((wm * gm).sum() + (wv * gv).sum()).backward()
    assert a.grad.dtype == dtype and a.grad.shape == x.shape
    assert a.grad.stride() == x.stride()
    scale = b.grad.abs().max().item()
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2,
           torch.float16: 3e-3}[dtype]
    err = (a.grad.double() - b.grad).abs().max().item()
    assert err <= tol * scale, f"{err:.3g} vs scale {scale:.3g}"


def test_backward_only_one_output_used():
    x = _x((6, 4, 3, 3), torch.float64, seed=11).requires_grad_()
    m, _ = pde.bn_moments(x)
    (m * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    want = (torch.arange(4.0, dtype=torch.float64) / 54).view(1, 4, 1, 1).expand_as(x)
    torch.testing.assert_close(x.grad, want)
    x.grad = None
    _, v = pde.bn_moments(x)
    v.sum().backward()
    torch.testing.assert_close(x.grad, 2 * (x - x.mean([0, 2, 3], keepdim=True)) / 54)


@pytest.mark.parametrize("per_sample,unbiased", [(False, False), (False, True), (True, True),
                                                 (True, False)])
def test_gradcheck_and_gradgradcheck(per_sample, unbiased):
    for shape, cl in (((3, 4, 3, 2), False), ((3, 4, 3, 2), True), ((5, 3), False)):
        if per_sample and len(shape) == 2:
            continue
        x = _x(shape, torch.float64, seed=12)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        f = lambda a: pde.bn_moments(a, per_sample=per_sample, unbiased=unbiased)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


def test_gradgradcheck_of_bn_loss():
    """The real use: a non-squared-norm BN loss, differentiated twice (e.g. for a
    gradient-penalty); all four inputs of the backward op get gradients."""
    x = _x((4, 3, 2, 3), torch.float64, seed=13).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def loss(a):
        m, v = pde.bn_moments(a)
        return torch.norm(rv - v, 2) + torch.norm(rm - m, 2)

    assert torch.autograd.gradcheck(loss, (x,))
    assert torch.autograd.gradgradcheck(loss, (x,))


def test_opcheck():
    for shape, cl in (((4, 6, 3, 5), False), ((4, 6, 3, 5), True), ((7, 5), False)):
        for dtype in (torch.float32, torch.float16):
            x = _x(shape, dtype, seed=14)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            for ps, ub in ((False, False), (True, True)):
                if ps and len(shape) == 2:
                    continue
                for req in (False, True):
                    torch.library.opcheck(FWD.default, (x.clone().requires_grad_(req), ps, ub))
                m, _ = FWD(x, ps, ub)
                gm, gv = torch.randn_like(m), torch.randn_like(m)
                torch.library.opcheck(BWD.default, (gm, gv, x, m, ps, ub))


def test_torch_compile_fullgraph(compiled_matches_eager):
    x = _x((8, 6, 5, 5), torch.float32, seed=15)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5

    def f(a):
        m, v = pde.bn_moments(a)
        ms, vs = pde.bn_moments(a, per_sample=True, unbiased=True)
        return torch.norm(rv - v, 2) + torch.norm(rm - m, 2) + 0.1 * (ms.square().mean() + vs.mean())

    compiled_matches_eager(f, x)


def test_bad_inputs():
    x = _x((4, 3, 2, 2), torch.float32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pde.bn_moments(x.numpy())
    with pytest.raises(ValueError, match="x must be float64, float32, float16 or bfloat16, got torch.int64"):
        pde.bn_moments(x.long())
    with pytest.raises(ValueError, match=r"x must be \[N, C, \*\] with at least 2 dims"):
        pde.bn_moments(x[0, 0, 0])
    with pytest.raises(ValueError, match="empty reduction"):
        pde.bn_moments(x[:0])
    with pytest.raises(ValueError, match="empty reduction"):
        pde.bn_moments(x[:, :, :0], per_sample=True)
    with pytest.raises(ValueError, match="unbiased=True needs at least 2 elements per channel"):
        pde.bn_moments(x[:1, :, :1, :1], unbiased=True)
    with pytest.raises(ValueError, match=r"at least 2 elements per \(sample, channel\)"):
        pde.bn_moments(x[:, :, :1, :1], per_sample=True, unbiased=True)
    with pytest.raises(TypeError, match="per_sample must be a bool"):
        pde.bn_moments(x, per_sample=1)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        pde.bn_moments(x, unbiased="yes")
    # per-sample on N = 0 samples is not an empty reduction: [0, C] outputs
    m, v = pde.bn_moments(x[:0], per_sample=True)
    assert m.shape == (0, 3) and v.shape == (0, 3)


def test_native_op_checks_its_arguments():
    x = _x((4, 3, 2, 2), torch.float32)
    with pytest.raises(RuntimeError, match="x must be float64, float32, float16 or bfloat16"):
        FWD(x.int(), False, False)
    with pytest.raises(RuntimeError, match=r"x must be \[N, C, \*\] with at least 2 dims"):
        FWD(x[0, 0, 0], False, False)
    with pytest.raises(RuntimeError, match="empty reduction"):
        FWD(x[:0], False, False)
    with pytest.raises(RuntimeError, match="unbiased=True needs at least 2"):
        FWD(x[:, :, :1, :1], True, True)
    m, _ = FWD(x, False, False)
    with pytest.raises(RuntimeError, match=r"grad_var must have shape \[3\]"):
        BWD(m, m[:2], x, m, False, False)
    with pytest.raises(RuntimeError, match="mean must be Float"):
        BWD(m, m, x, m.double(), False, False)
    with pytest.raises(RuntimeError, match=r"grad_mean must have shape \[4, 3\]"):
        BWD(m, m, x, m, True, False)


# ------------------------------------------------------------------ frozen_bn_moments (stretch)
FFWD = torch.ops.pydistill_ext.frozen_bn_moments_forward
FBWD = torch.ops.pydistill_ext.frozen_bn_moments_backward


def _bn_params(c, dtype=torch.float64, seed=20):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype),
            torch.randn(c, generator=g, dtype=dtype) * 0.3, torch.rand(c, generator=g, dtype=dtype) + 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 5, 7, 6), (20, 9), (3, 4, 5, 3, 2), (2, 70, 3, 3)], ids=str)
@pytest.mark.parametrize("per_sample,unbiased", [(False, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_bn_moments_matches_batch_norm_and_oracle(dtype, shape, per_sample, unbiased,
                                                         channels_last):
    if per_sample and len(shape) == 2:
        pytest.skip("count 1 with unbiased")
    x = _x(shape, dtype, seed=21)
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = _bn_params(shape[1])
    y, m, v = pde.frozen_bn_moments(x, w, b, rm, rv, 1e-5, per_sample=per_sample, unbiased=unbiased)
    want_y = torch.nn.functional.batch_norm(x.double(), rm, rv, w, b, training=False, eps=1e-5)
    assert y.dtype == dtype and y.stride() == x.stride()
    ytol = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert (y.double() - want_y).abs().max().item() <= ytol * want_y.abs().max().item()
    _check((m, v), ref.bn_moments(x, per_sample, unbiased), dtype, x)
    # the moments are bitwise those of bn_moments (same kernel, same order)
    m2, v2 = pde.bn_moments(x, per_sample=per_sample, unbiased=unbiased)
    assert torch.equal(m, m2) and torch.equal(v, v2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_bn_moments_backward(dtype, channels_last):
    x = _x((6, 5, 4, 3), dtype, seed=22)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = [p.to(dtype) for p in _bn_params(5)]
    gy = _x((6, 5, 4, 3), dtype, seed=23)
    gm, gv = _grad_inputs((6, 5), False, 24)

    def run(fn, xx, ps):
        xx = xx.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in ps]
        y, m, v = fn(xx, *ps)
        ((y * gy).sum() + (m * gm.to(m.dtype)).sum() + (v * gv.to(v.dtype)).sum()).backward()
        return [xx.grad] + [p.grad for p in ps]

    def composite(xx, w, b, rm, rv):
        view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731  (eval BN, differentiable in all)
        y = (xx - view(rm)) / (view(rv) + 1e-3).sqrt() * view(w) + view(b)
        m, v = ref.bn_moments(xx)
        return y, m, v

    got = run(lambda xx, w, b, rm, rv: pde.frozen_bn_moments(xx, w, b, rm, rv, 1e-3), x, params)
    want = run(composite, x.double(), [p.double() for p in params])
    assert got[0].stride() == x.stride()
    tol = 1e-12 if dtype == torch.float64 else 3e-5
    for gg, ww in zip(got, want):
        assert (gg.double() - ww).abs().max().item() <= tol * ww.abs().max().item()


def test_frozen_bn_moments_gradcheck_opcheck_compile_errors(compiled_matches_eager):
    x = _x((3, 4, 3, 2), torch.float64, seed=25).requires_grad_()
    w, b, rm, rv = [p.requires_grad_() for p in _bn_params(4)]
    assert torch.autograd.gradcheck(
        lambda *a: pde.frozen_bn_moments(*a, 1e-2), (x, w, b, rm, rv))
    y, m, v = pde.frozen_bn_moments(x, None, None, rm, rv)
    torch.testing.assert_close(y, (x - rm.view(1, 4, 1, 1)) / (rv.view(1, 4, 1, 1) + 1e-5).sqrt())
    g, = torch.autograd.grad(y.sum() + v.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()
    xf = _x((4, 6, 3, 5), torch.float32, seed=26)
    k, h = torch.rand(6) + 0.5, torch.randn(6)
    for xx in (xf, xf.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(FFWD.default, (xx.clone().requires_grad_(), k, h, False, False))
        _, m, _ = FFWD(xx, k, h, True, True)
        torch.library.opcheck(FBWD.default, (torch.randn_like(xx), torch.randn_like(m),
                                             torch.randn_like(m), xx, m, k, True, True))
    wf, bf, rmf, rvf = [p.float() for p in _bn_params(6)]

    def f(a):
        y, m, v = pde.frozen_bn_moments(a, wf, bf, rmf, rvf)
        return y.square().mean() + torch.norm(rvf - v, 2) + torch.norm(rmf - m, 2)

    compiled_matches_eager(f, xf)
    with pytest.raises(ValueError, match=r"running_var must be a \[C\] = \[6\] tensor"):
        pde.frozen_bn_moments(xf, wf, bf, rmf, rvf[:3])
    with pytest.raises(ValueError, match="eps must be a float >= 0"):
        pde.frozen_bn_moments(xf, wf, bf, rmf, rvf, -1.0)
    with pytest.raises(NotImplementedError, match="CPU kernel only"):
        pde.frozen_bn_moments(xf.to("meta"), wf, bf, rmf, rvf)
    with pytest.raises(RuntimeError, match=r"scale must be \[C\] = \[6\]"):
        FFWD(xf, k[:2], h, False, False)
    with pytest.raises(RuntimeError, match="shift must be Float"):
        FFWD(xf, k, h.double(), False, False)
