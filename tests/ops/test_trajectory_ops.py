"""param_distance and sgd_step_accumulate (CPU kernels) against the float64 oracles in
python/reference/trajectory_ops.py."""
import pytest
import torch

import pydistill_ext as pde
from reference import trajectory_ops as ref

PD_FWD = torch.ops.pydistill_ext.param_distance_forward
PD_BWD = torch.ops.pydistill_ext.param_distance_backward
SGD = torch.ops.pydistill_ext.sgd_step_accumulate
DTYPES = [torch.float64, torch.float32]
# param_distance, relative to the float64 oracle on the same (rounded) inputs: float64 is the
# accumulation error only (~1e-16 per add); float32 accumulates in float32 within 4096-element
# blocks (<= 64 additions per lane with 4 x 16 lanes), ~1e-7 relative, and rounds num, den and
# L to float32: 1e-5 is ample. A dropped or doubled element is caught exactly by
# test_single_element_counts.
TOL = {torch.float64: 1e-13, torch.float32: 1e-5}
SIZES = [1, 7, 63, 64, 4095, 4096, 4097, 10000, 317706]


def _vec(shape, dtype, seed, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


def _triple(shape, dtype, seed=0):
    target = _vec(shape, dtype, seed)
    theta = target + _vec(shape, dtype, seed + 1, scale=0.1)
    start = target + _vec(shape, dtype, seed + 2, scale=0.3)
    return theta.to(dtype), target, start.to(dtype)


# ------------------------------------------------------------------------- param_distance
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(p,) for p in SIZES] + [(3, 1000), (1, 5), (4, 4097),
                                                           (2, 317706)], ids=str)
def test_param_distance_matches_oracle(dtype, shape):
    theta, target, start = _triple(shape, dtype)
    got = pde.param_distance(theta, target, start)
    want = ref.param_distance(theta, target, start)
    assert got.dtype == dtype and got.shape == want.shape == shape[:-1]
    rel = ((got.double() - want).abs() / want.abs()).max().item()
    assert rel <= TOL[dtype], rel
    # the raw op's second output is the denominator
    _, den = PD_FWD(theta, target, start)
    wden = (start.double() - target.double()).pow(2).sum(-1)
    assert ((den.double() - wden).abs() / wden).max().item() <= TOL[dtype]


def test_single_element_counts():
    """Every element is read: perturbing any single one (first, block edges, tail, last)
    changes the loss by the expected amount."""
    P = 3 * 4096 + 77
    target = torch.zeros(P, dtype=torch.float64)
    start = torch.ones(P, dtype=torch.float64)
    for j in (0, 4095, 4096, 8191, 3 * 4096, P - 1):
        theta = torch.zeros(P, dtype=torch.float64)
        theta[j] = 3.0
        assert pde.param_distance(theta, target, start).item() == 9.0 / P
        s2 = start.clone()
        s2[j] = 2.0
        assert pde.param_distance(start, target, s2).item() == pytest.approx(P / (P + 3.0),
                                                                             rel=1e-15)


def test_param_distance_batched_rows_are_independent():
    theta, target, start = _triple((5, 2000), torch.float32, seed=3)
    got = pde.param_distance(theta, target, start)
    for k in range(5):
        assert got[k].item() == pde.param_distance(theta[k], target[k], start[k]).item()


def test_param_distance_noncontiguous_inputs():
    theta, target, start = _triple((300, 4), torch.float64, seed=4)
    got = pde.param_distance(theta.t(), target.t(), start.t())
    want = ref.param_distance(theta.t(), target.t(), start.t())
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_param_distance_deterministic_across_thread_counts():
    theta, target, start = _triple((317706,), torch.float32, seed=5)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(PD_FWD(theta, target, start))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])


def test_param_distance_zero_denominator_is_ieee():
    """Documented choice: D = 0 is not checked; the result is that of the eager formula."""
    t = torch.ones(10)
    assert pde.param_distance(t + 1, t, t.clone()).item() == float("inf")
    assert torch.isnan(pde.param_distance(t.clone(), t, t.clone()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4097,), (3, 1000), (1,)], ids=str)
def test_param_distance_backward_matches_oracle(dtype, shape):
    theta, target, start = _triple(shape, dtype, seed=6)
    gl = _vec(shape[:-1], dtype, 9) if len(shape) == 2 else torch.tensor(1.7, dtype=dtype)
    ins = [t.clone().requires_grad_() for t in (theta, target, start)]
    got = torch.autograd.grad(pde.param_distance(*ins), ins, gl)
    ins_d = [t.double().requires_grad_() for t in (theta, target, start)]
    want = torch.autograd.grad(ref.param_distance(*ins_d), ins_d, gl.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        scale = w.abs().max().item()
        assert (g.double() - w).abs().max().item() <= TOL[dtype] * 10 * scale
    # closed form, literally
    d, e = theta.double() - target.double(), start.double() - target.double()
    D = (e * e).sum(-1, keepdim=True)
    L = (d * d).sum(-1, keepdim=True) / D
    glk = gl.double().reshape(*shape[:-1], 1) if len(shape) == 2 else gl.double()
    torch.testing.assert_close(got[0].double(), glk * 2 * d / D,
                               rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10 * want[0].abs().max())
    torch.testing.assert_close(got[2].double(), -glk * 2 * L * e / D,
                               rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10 * want[2].abs().max())


def test_param_distance_backward_only_needed_outputs():
    theta, target, start = _triple((1000,), torch.float64, seed=7)
    th = theta.clone().requires_grad_()
    loss = pde.param_distance(th, target, start)
    g, = torch.autograd.grad(loss, th)
    d = theta - target
    torch.testing.assert_close(g, 2 * d / (start - target).pow(2).sum(), rtol=1e-13, atol=0)
    a = torch.tensor(2.0, dtype=torch.float64)
    b = torch.tensor(-3.0, dtype=torch.float64)
    gx, gt, gs = PD_BWD(a, b, theta, target, start, True, False, False)
    assert gt.shape == (0,) and gs.shape == (0,)
    torch.testing.assert_close(gx, 2 * d, rtol=0, atol=0)
    gx, gt, gs = PD_BWD(a, b, theta, target, start, False, True, True)
    assert gx.shape == (0,)
    torch.testing.assert_close(gs, -3 * (start - target), rtol=0, atol=0)
    torch.testing.assert_close(gt, -2 * d + 3 * (start - target), rtol=1e-15, atol=1e-15)


def test_param_distance_grad_of_den_output():
    """The raw op's den output is differentiable too (∂den/∂θ_0 = 2(θ_0 − θ*))."""
    theta, target, start = _triple((50,), torch.float64, seed=8)
    s = start.clone().requires_grad_()
    t = target.clone().requires_grad_()
    _, den = PD_FWD(theta, t, s)
    gs, gt = torch.autograd.grad(den, (s, t))
    torch.testing.assert_close(gs, 2 * (start - target), rtol=1e-15, atol=0)
    torch.testing.assert_close(gt, -2 * (start - target), rtol=1e-15, atol=0)


def test_param_distance_gradcheck_gradgradcheck():
    for shape in ((6,), (2, 5)):
        ins = [t.requires_grad_() for t in _triple(shape, torch.float64, seed=10)]
        assert torch.autograd.gradcheck(pde.param_distance, ins)
        assert torch.autograd.gradgradcheck(pde.param_distance, ins)
        assert torch.autograd.gradcheck(lambda *a: PD_FWD(*a), ins)


def test_param_distance_opcheck():
    for dtype in DTYPES:
        for shape in ((37,), (3, 9)):
            theta, target, start = _triple(shape, dtype, seed=11)
            for req in (False, True):
                torch.library.opcheck(PD_FWD.default, (theta.clone().requires_grad_(req), target,
                                                       start))
            k = shape[:-1]
            a, b = _vec(k, dtype, 12), _vec(k, dtype, 13)
            for flags in ((True, True, True), (True, False, False), (False, True, False)):
                torch.library.opcheck(PD_BWD.default, (a, b, theta, target, start, *flags))


def test_param_distance_errors():
    t = torch.randn(10)
    with pytest.raises(ValueError, match="target must have theta's shape"):
        pde.param_distance(t, torch.randn(11), t)
    with pytest.raises(ValueError, match="start must have theta's dtype"):
        pde.param_distance(t, t, t.double())
    with pytest.raises(ValueError, match="float32 or float64"):
        pde.param_distance(t.half(), t.half(), t.half())
    with pytest.raises(ValueError, match="flat vector"):
        pde.param_distance(t.reshape(1, 2, 5), t.reshape(1, 2, 5), t.reshape(1, 2, 5))
    with pytest.raises(ValueError, match="P = 0"):
        e = torch.randn(3, 0)
        pde.param_distance(e, e, e)
    with pytest.raises(ValueError, match="is on meta"):
        pde.param_distance(t, t, torch.randn(10, device="meta"))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        pde.param_distance(t, [1.0], t)
    # the native op checks on its own (no Python wrapper)
    with pytest.raises(RuntimeError, match="target must have theta's shape"):
        PD_FWD(t, torch.randn(11), t)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        PD_FWD(t.int(), t.int(), t.int())
    with pytest.raises(RuntimeError, match="coef_theta must be 0-dim"):
        PD_BWD(torch.ones(2), torch.ones(()), t, t, t, True, True, True)
    with pytest.raises(RuntimeError, match="coef_start must be \\[K\\]"):
        m = torch.randn(2, 5)
        PD_BWD(torch.ones(2), torch.ones(3), m, m, m, True, True, True)


# -------------------------------------------------------------------- sgd_step_accumulate
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (15,), (317706,), (3, 5, 7)], ids=str)
def test_sgd_step_matches_oracle(dtype, shape):
    theta, grad, G = (_vec(shape, dtype, s) for s in (20, 21, 22))
    lr = torch.tensor(0.037, dtype=dtype)
    copies = [t.clone() for t in (theta, grad, G, lr)]
    th1, G1 = pde.sgd_step_accumulate(theta, grad, lr, G)
    wth, wG = ref.sgd_step_accumulate(theta, grad, lr, G)
    assert th1.dtype == G1.dtype == dtype and th1.shape == G1.shape == shape
    # theta: one rounding (fma) of the exact theta - lr g, so within half an ulp of it; the
    # oracle (and the eager form) round lr g first, an error up to eps |lr g| where theta and
    # lr g nearly cancel. G: one rounding on both sides.
    eps = torch.finfo(dtype).eps
    lrg = (lr.double() * grad.double()).abs()
    assert ((th1.double() - wth).abs() <= eps * (wth.abs() + lrg)).all()
    assert ((G1.double() - wG).abs() <= eps * wG.abs()).all()
    # against the eager composition in the same dtype: G bitwise, theta within those bounds
    eth, eG = ref.sgd_step_accumulate_eager(theta, grad, lr, G)
    assert torch.equal(G1, eG)
    assert ((th1.double() - eth.double()).abs() <= 2 * eps * (eth.double().abs() + lrg)).all()
    for a, b in zip((theta, grad, G, lr), copies):  # inputs untouched
        assert torch.equal(a, b)


def test_sgd_step_noncontiguous_and_float_lr():
    theta, grad, G = (_vec((40, 30), torch.float64, s).t() for s in (23, 24, 25))
    th1, G1 = pde.sgd_step_accumulate(theta, grad, 0.5, G)
    assert th1.is_contiguous() and th1.shape == (30, 40)
    torch.testing.assert_close(th1, theta - 0.5 * grad, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(G1, G + grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_step_backward_matches_oracle(dtype):
    shape = (1000,)
    ins = [_vec(shape, dtype, s) for s in (26, 27)] + [torch.tensor(0.3, dtype=dtype),
                                                      _vec(shape, dtype, 28)]
    u, w = _vec(shape, dtype, 29), _vec(shape, dtype, 30)
    a = [t.clone().requires_grad_() for t in ins]
    got = torch.autograd.grad(pde.sgd_step_accumulate(*a), a, (u, w))
    b = [t.double().requires_grad_() for t in ins]
    want = torch.autograd.grad(ref.sgd_step_accumulate(*b), b, (u.double(), w.double()))
    for g, wt in zip(got, want):
        assert g.dtype == dtype and g.shape == wt.shape
        torch.testing.assert_close(g.double(), wt, rtol=TOL[dtype], atol=TOL[dtype] * 30)
    # only theta' used: dG is zero, dg = -lr u
    a = [t.clone().requires_grad_() for t in ins]
    th1, _ = pde.sgd_step_accumulate(*a)
    g = torch.autograd.grad(th1, a, u)
    assert torch.equal(g[3], torch.zeros_like(ins[3]))
    torch.testing.assert_close(g[1], -ins[2] * u)


def test_sgd_step_gradcheck_gradgradcheck():
    ins = [_vec((7,), torch.float64, 31), _vec((7,), torch.float64, 32),
           torch.tensor(0.2, dtype=torch.float64), _vec((7,), torch.float64, 33)]
    ins = [t.requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(pde.sgd_step_accumulate, ins)
    assert torch.autograd.gradgradcheck(pde.sgd_step_accumulate, ins)


def test_sgd_step_opcheck():
    for dtype in DTYPES:
        for shape in ((37,), (3, 9)):
            theta, grad, G = (_vec(shape, dtype, s) for s in (34, 35, 36))
            lr = torch.tensor(0.1, dtype=dtype)
            for req in (False, True):
                torch.library.opcheck(SGD.default, (theta.clone().requires_grad_(req), grad,
                                                    lr.clone().requires_grad_(req), G))


def test_sgd_step_errors():
    t = torch.randn(10)
    lr = torch.tensor(0.1)
    with pytest.raises(ValueError, match="grad must have theta's shape"):
        pde.sgd_step_accumulate(t, torch.randn(9), lr, t)
    with pytest.raises(ValueError, match="grad_sum must have theta's dtype"):
        pde.sgd_step_accumulate(t, t, lr, t.double())
    with pytest.raises(ValueError, match="lr must be a 0-dim tensor"):
        pde.sgd_step_accumulate(t, t, torch.tensor([0.1]), t)
    with pytest.raises(ValueError, match="lr must have theta's dtype"):
        pde.sgd_step_accumulate(t, t, lr.double(), t)
    with pytest.raises(ValueError, match="float32 or float64"):
        pde.sgd_step_accumulate(t.half(), t.half(), lr.half(), t.half())
    with pytest.raises(ValueError, match="lr is on meta"):
        pde.sgd_step_accumulate(t, t, torch.tensor(0.1, device="meta"), t)
    with pytest.raises(TypeError, match="lr must be a 0-dim tensor or a float"):
        pde.sgd_step_accumulate(t, t, "0.1", t)
    with pytest.raises(RuntimeError, match="lr must be a 0-dim tensor"):
        SGD(t, t, torch.ones(2), t)
    with pytest.raises(RuntimeError, match="grad_sum must have theta's shape"):
        SGD(t, t, lr, torch.randn(3))


# ------------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph():
    """An unrolled two-step student with the running sum and the loss, compiled as one graph,
    forward and backward equal to eager."""
    torch._dynamo.reset()
    P = 500
    theta0, target, start = _triple((P,), torch.float32, seed=40)
    g1, g2 = _vec((P,), torch.float32, 41), _vec((P,), torch.float32, 42)

    def f(theta, lr):
        G = torch.zeros_like(theta)
        th, G = pde.sgd_step_accumulate(theta, g1 * theta, lr, G)
        th, G = pde.sgd_step_accumulate(th, g2, lr, G)
        return pde.param_distance(th, target, start) + 1e-3 * G.square().sum()

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    for fn in (f, cf):
        th = theta0.clone().requires_grad_()
        lr = torch.tensor(0.05, requires_grad=True)
        out = fn(th, lr)
        out.backward()
        if fn is f:
            want = (out.detach(), th.grad, lr.grad)
        else:
            torch.testing.assert_close(out.detach(), want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(th.grad, want[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lr.grad, want[2], rtol=1e-5, atol=1e-6)
    # and the batched loss
    cb = torch.compile(lambda a, b, c: pde.param_distance(a, b, c), fullgraph=True)
    x = _triple((3, 64), torch.float32, seed=43)
    torch.testing.assert_close(cb(*x), pde.param_distance(*x), rtol=0, atol=0)


# ------------------------------------------------------------------ in trajectory_step
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_trajectory_step_fused_equals_eager_path(dtype, tol, monkeypatch):
    """trajectory_step with the fused ops against the same code on its eager path, all modes
    (and a checkpointed exact sweep, which recomputes θ_i with the op)."""
    from pydistill_ext.methods.trajectory import unroll

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 6 * 6, 4)).to(dtype)
    fm = unroll.FlatModel(net)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(9, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.arange(9) % 4
    th0 = fm.flatten()
    tgt = th0 + 0.05 * torch.randn(fm.num_params, generator=g, dtype=dtype)
    lr = torch.tensor(0.1, dtype=dtype)
    runs = [("exact", None), ("tesla", None), ("unroll", None), ("exact", 2)]
    fused = [unroll.trajectory_step(X, y, th0, tgt, lr, 5, 4, 3, m, model=fm, checkpoint_every=k)
             for m, k in runs]
    monkeypatch.setattr(unroll, "_fused", lambda *ts: False)
    eager = [unroll.trajectory_step(X, y, th0, tgt, lr, 5, 4, 3, m, model=fm, checkpoint_every=k)
             for m, k in runs]
    for a, b in zip(fused, eager):
        assert abs(float(a.loss) - float(b.loss)) <= tol * abs(float(b.loss))
        assert float((a.grad_images - b.grad_images).norm() / b.grad_images.norm()) <= tol
        assert abs(float(a.grad_lr - b.grad_lr)) <= tol * abs(float(b.grad_lr))
        assert float((a.theta_n - b.theta_n).norm() / b.theta_n.norm()) <= tol
    assert not torch.equal(fused[0].grad_images, fused[1].grad_images)  # modes differ
