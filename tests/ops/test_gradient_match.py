"""gradient_match_distance (CPU kernels) against the float64 oracle in
python/reference/gradient_match.py (DC's distance_wb / match_loss)."""
import pytest
import torch

import pydistill_ext as pde
from reference import gradient_match as ref

FWD = torch.ops.pydistill_ext.gradient_match_forward
BWD = torch.ops.pydistill_ext.gradient_match_backward
METRICS = ("ours", "mse", "cos")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# loss: rtol (the oracle runs in float64 on the same rounded inputs: the error is the float32
# sums plus the rounding of the scalar to bf16 2^-8 / fp16 2^-11); grad: max error relative to
# the largest oracle gradient entry.
TOL = {torch.float64: dict(loss=1e-12, grad=1e-10), torch.float32: dict(loss=2e-5, grad=2e-5),
       torch.bfloat16: dict(loss=8e-3, grad=1e-2), torch.float16: dict(loss=1e-3, grad=2e-3)}
# ConvNet-3-like (narrow): conv w, conv b, norm w, norm b, ..., a 3-D tensor, fc w, fc b, and a
# 1-D tensor longer than the 4096-element work chunk of mse / cos.
SHAPES = [(16, 3, 3, 3), (16,), (16,), (16,), (16, 16, 3, 3), (16,), (4, 5, 6), (10, 64), (10,),
          (5000,)]


def _grads(shapes, dtype, seed=0, corr=0.6):
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for s in shapes:
        x = torch.randn(s, generator=g, dtype=torch.float64)
        y = corr * x + torch.randn(s, generator=g, dtype=torch.float64)
        a.append(x.to(dtype))
        b.append(y.to(dtype))
    return a, b


def _check(a, b, metric, go=1.7):
    dtype = a[0].dtype
    tol = TOL[dtype]
    xa = [t.clone().requires_grad_() for t in a]
    xb = [t.clone().requires_grad_() for t in b]
    out = pde.gradient_match_distance(xa, xb, metric=metric)
    ra = [t.detach().double().clone().requires_grad_() for t in a]
    rb = [t.detach().double().clone().requires_grad_() for t in b]
    want = ref.gradient_match_distance(ra, rb, metric)
    assert out.dtype == dtype and out.shape == ()
    torch.testing.assert_close(out.double(), want, rtol=tol["loss"], atol=tol["loss"])
    (out * go).backward()
    (want * go).backward()
    for t in ra + rb:  # 1-D tensors are not in the oracle's 'ours' graph: gradient 0
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    scale = max(max(t.grad.abs().max().item() for t in ra + rb if t.numel()), 1e-30)
    for got, exp in zip(xa + xb, ra + rb):
        assert got.grad.dtype == dtype and got.grad.shape == exp.shape
        if exp.numel():
            err = (got.grad.double() - exp.grad).abs().max().item()
            assert err <= tol["grad"] * scale, f"grad error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(metric, dtype):
    a, b = _grads(SHAPES, dtype)
    _check(a, b, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_convnet3_shapes(metric):
    shapes = [(128, 3, 3, 3), (128,), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128,),
              (128, 128, 3, 3), (128,), (128,), (128,), (10, 2048), (10,)]
    a, b = _grads(shapes, torch.float32, seed=3)
    _check(a, b, metric)


def test_one_dim_tensors_contribute_zero_to_ours():
    a, b = _grads([(7,), (3,), ()], torch.float64)
    xa = [t.clone().requires_grad_() for t in a]
    out = pde.gradient_match_distance(xa, b, "ours")
    assert out.item() == 0.0
    out.backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in xa)
    # but they count for mse and cos
    assert pde.gradient_match_distance(a, b, "mse").item() > 0
    _check(a, b, "cos")


def test_identical_and_opposite_and_zero_rows():
    a, _ = _grads([(6, 9), (4, 2, 3)], torch.float64, seed=4)
    torch.testing.assert_close(pde.gradient_match_distance(a, a, "ours"),
                               ref.gradient_match_distance(a, a, "ours"), rtol=1e-12, atol=1e-15)
    assert pde.gradient_match_distance(a, a, "ours").item() < 1e-5
    neg = [-t for t in a]
    torch.testing.assert_close(pde.gradient_match_distance(a, neg, "ours"),
                               torch.tensor(20.0, dtype=torch.float64), rtol=1e-5, atol=0)
    assert pde.gradient_match_distance(a, a, "mse").item() == 0.0
    # zero rows (|a_r| = 0): distance 1 per row, gradient -b / 1e-6 w.r.t. a (torch's norm
    # subgradient 0), finite
    z = [t.clone() for t in a]
    z[0][2] = 0.0
    _check(z, a, "ours")
    _check(z, a, "cos")


@pytest.mark.parametrize("metric", METRICS)
def test_empty_tensors_and_d_one(metric):
    a, b = _grads([(3, 0), (0, 4), (5, 1), (2, 1, 1, 1)], torch.float64, seed=6)
    _check(a, b, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck(metric):
    a, b = _grads([(3, 2, 2, 2), (3,), (2, 5), (4, 3, 2)], torch.float64, seed=8)
    xa = [t.requires_grad_() for t in a]
    xb = [t.requires_grad_() for t in b]
    n = len(xa)
    f = lambda *ts: pde.gradient_match_distance(list(ts[:n]), list(ts[n:]), metric)
    assert torch.autograd.gradcheck(f, tuple(xa + xb))


def test_dc_second_order_path_through_the_gradient_graph():
    """DC: gw_syn = grad(loss(net(x_syn)), params, create_graph=True); the distance's backward
    reaches x_syn through that graph. Same x_syn.grad as DC's eager match_loss."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 3)).double()
    params = list(net.parameters())
    x_real = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    gw_real = [t.detach() for t in
               torch.autograd.grad(torch.nn.functional.cross_entropy(net(x_real), y), params)]
    x0 = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
    grads = {}
    for name, fn in (("op", pde.gradient_match_distance), ("ref", ref.eager_match_loss)):
        for metric in METRICS:
            x_syn = x0.clone().requires_grad_()
            gw_syn = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x_syn), y), params,
                                         create_graph=True)
            fn(list(gw_syn), gw_real, metric).backward()
            grads[name, metric] = x_syn.grad
    for metric in METRICS:
        assert grads["op", metric].abs().max() > 0
        torch.testing.assert_close(grads["op", metric], grads["ref", metric], rtol=1e-9, atol=1e-12)


def test_opcheck():
    a, b = _grads([(4, 3, 2, 2), (4,), (3, 7), (5000,)], torch.float32, seed=9)
    for metric in METRICS:
        for ra, rb in ((True, False), (True, True), (False, False)):
            xa = [t.clone().requires_grad_(ra) for t in a]
            xb = [t.clone().requires_grad_(rb) for t in b]
            torch.library.opcheck(FWD.default, (xa, xb, metric))
        _, stats = FWD(a, b, metric)
        for need in ((True, False), (False, True), (True, True)):
            torch.library.opcheck(BWD.default, (torch.tensor(1.3), a, b, stats, metric, *need))


def test_torch_compile_fullgraph():
    a, b = _grads([(6, 3, 3, 3), (6,), (4, 24)], torch.float32, seed=10)

    def f(xs, ys):
        return pde.gradient_match_distance(xs, ys, "ours") * 2.0 + \
            pde.gradient_match_distance(xs, ys, "cos")

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    x1 = [t.clone().requires_grad_() for t in a]
    x2 = [t.clone().requires_grad_() for t in a]
    out1, out2 = cf(x1, b), f(x2, b)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    for u, v in zip(x1, x2):
        torch.testing.assert_close(u.grad, v.grad)


def test_bad_inputs():
    a, b = _grads([(4, 3), (4,)], torch.float32)
    with pytest.raises(ValueError, match="same length"):
        pde.gradient_match_distance(a, b[:1])
    with pytest.raises(ValueError, match="at least one tensor"):
        pde.gradient_match_distance([], [])
    with pytest.raises(ValueError, match="metric must be one of"):
        pde.gradient_match_distance(a, b, metric="l2")
    with pytest.raises(ValueError, match=r"grads_b\[0\] shape \(4, 2\) must equal grads_a\[0\]"):
        pde.gradient_match_distance(a, [b[0][:, :2], b[1]])
    with pytest.raises(ValueError, match=r"grads_a\[1\] / grads_b\[1\] dtype"):
        pde.gradient_match_distance(a, [b[0], b[1].double()])
    with pytest.raises(ValueError, match=r"grads_a\[1\] must be float"):
        pde.gradient_match_distance([a[0], a[1].long()], b)
    with pytest.raises(TypeError, match="grads_a must be a list"):
        pde.gradient_match_distance(a[0], b[0])
    with pytest.raises(ValueError, match=r"are on cpu / meta but grads_a\[0\] is on cpu"):
        pde.gradient_match_distance(a, [b[0], b[1].to("meta")])


def test_native_op_checks_its_arguments():
    a, b = _grads([(4, 3), (4,)], torch.float32)
    with pytest.raises(RuntimeError, match="metric must be 'ours', 'mse' or 'cos'"):
        FWD(a, b, "l1")
    with pytest.raises(RuntimeError, match="same length"):
        FWD(a, b[:1], "ours")
    with pytest.raises(RuntimeError, match=r"grads_b\[1\] shape"):
        FWD(a, [b[0], b[1][:2]], "ours")
    with pytest.raises(RuntimeError, match="must equal grads_a\\[0\\] dtype"):
        FWD(a, [b[0].double(), b[1]], "ours")
    _, stats = FWD(a, b, "ours")
    with pytest.raises(RuntimeError, match="row_stats must be \\[4, 3\\]"):
        BWD(torch.tensor(1.0), a, b, stats[:2], "ours", True, True)
    with pytest.raises(RuntimeError, match="grad must hold one value"):
        BWD(torch.ones(2), a, b, stats, "ours", True, True)
