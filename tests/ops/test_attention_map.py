"""attention_map (CPU kernels) against the float64 oracle in python/reference/attention_map.py."""
import pytest
import torch
import torch.nn.functional as F

import pydistill_ext as pde
from reference import attention_map as ref

FWD = torch.ops.pydistill_ext.attention_map_forward
BWD = torch.ops.pydistill_ext.attention_map_backward
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
PS = [1.0, 2.0, 4.0, 0.5, 3.0]
# Errors relative to the largest oracle value (output) / oracle gradient. The oracle runs in
# float64 on the same rounded inputs: the error is the kernel's float32 math (pow of general p
# via exp/log) and the rounding of the outputs to bf16 (2^-8) / fp16 (2^-11).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _rel_err(got, want, scale=0.0):
    assert got.shape == want.shape
    if want.numel() == 0:
        return 0.0
    scale = max(want.abs().max().item(), scale, 1e-300)
    return (got.double() - want).abs().max().item() / scale


def _term_scale(x, p, go):
    """Largest entry of the gradient without the projection (||a|| held constant): the size of
    the terms whose difference the gradient is (with H*W = 1 the gradient is exactly 0)."""
    b = x.detach().double().requires_grad_()
    a = ref._abs_pow(b, p).sum(1).flatten(1)
    (a / a.norm(dim=1, keepdim=True).clamp_min(1e-300).detach() * go).sum().backward()
    return b.grad.abs().max().item() if b.grad.numel() else 0.0


def _check(x, p, eps=1e-12, go=None):
    dtype = x.dtype
    a = x.clone().requires_grad_()
    out = pde.attention_map(a, p=p, eps=eps)
    b = x.detach().double().requires_grad_()
    want = ref.attention_map(b, p=p, eps=eps)
    assert out.dtype == dtype
    assert _rel_err(out, want) <= TOL[dtype]
    if go is None:
        go = _inputs(want.shape, torch.float64, seed=11)
    out.backward(go.to(dtype))
    want.backward(go)
    assert a.grad.dtype == dtype
    err = _rel_err(a.grad, b.grad, _term_scale(x, p, go))
    assert err <= TOL[dtype], f"grad error {err:.3g}"


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 6, 9), (3, 32, 8, 8), (2, 3, 1, 1), (1, 1, 5, 3)])
def test_matches_oracle(p, dtype, shape):
    _check(_inputs(shape, dtype), p)


def test_matches_eager_composite_of_the_anchors():
    x = _inputs((4, 16, 7, 7), torch.float32)
    for p in (1.0, 2.0, 4.0):
        torch.testing.assert_close(pde.attention_map(x, p=p), ref.eager_attention_map(x, p),
                                   rtol=1e-5, atol=1e-6)
    # attention transfer's code: l2_normalize(x.pow(2).mean(1)): the mean over C cancels
    at = F.normalize(x.pow(2).mean(1).view(4, -1))
    torch.testing.assert_close(pde.attention_map(x, p=2.0), at, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 4.0, 1.5])
def test_zeros_give_no_nan_and_zero_subgradient(p):
    x = _inputs((3, 4, 5, 5), torch.float64)
    x[:, :, 1:3] = 0.0  # zero entries in every sample
    x[2] = 0.0          # an all-zero sample: ||a|| = 0 < eps, the clamp branch
    a = x.clone().requires_grad_()
    out = pde.attention_map(a, p=p)
    assert torch.isfinite(out).all() and torch.equal(out[2], torch.zeros_like(out[2]))
    go = _inputs(out.shape, torch.float64, seed=3)
    out.backward(go)
    assert torch.isfinite(a.grad).all()
    assert torch.equal(a.grad[:, :, 1:3], torch.zeros_like(a.grad[:, :, 1:3]))
    b = x.clone().requires_grad_()
    ref.attention_map(b, p=p).backward(go)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_eps_clamp_branch():
    # ||a|| = 1e-6 * sqrt(S) < eps = 1: out = a / eps and d out / d a = I / eps
    x = torch.full((2, 1, 2, 2), 1e-3, dtype=torch.float64)
    _check(x, p=2.0, eps=1.0)
    out = pde.attention_map(x, p=2.0, eps=1.0)
    torch.testing.assert_close(out, torch.full((2, 4), 1e-6, dtype=torch.float64))


def test_n_zero_and_empty_spatial():
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    out = pde.attention_map(x)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert pde.attention_map(torch.zeros(2, 3, 0, 4)).shape == (2, 0)


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 0.7, 2.5])
def test_gradcheck(p):
    x = _inputs((2, 3, 3, 2), torch.float64, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pde.attention_map(a, p=p), (x,))
    # and the eps branch
    y = (_inputs((2, 2, 2, 2), torch.float64, seed=6) * 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pde.attention_map(a, p=p, eps=1.0), (y,))


def test_opcheck():
    x = _inputs((3, 5, 4, 3), torch.float32)
    for p in (1.0, 4.0, 0.5):
        torch.library.opcheck(FWD.default, (x.clone().requires_grad_(), p, 1e-12))
        out, a = FWD(x, p, 1e-12)
        torch.library.opcheck(BWD.default, (torch.randn_like(out), x, a, p, 1e-12))


def test_torch_compile_fullgraph(compiled_matches_eager):
    x = _inputs((4, 6, 5, 5), torch.float32)
    t = _inputs((4, 25), torch.float32, seed=2)

    def f(a):
        return (pde.attention_map(a, p=4.0) - t).pow(2).mean()

    compiled_matches_eager(f, x)


def test_non_contiguous_input():
    x = _inputs((4, 6, 5, 7), torch.float64).transpose(2, 3)
    _check(x, 4.0)


def test_bad_inputs():
    x = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="features must be \\[N, C, H, W\\]"):
        pde.attention_map(x[0])
    with pytest.raises(ValueError, match="features must be float"):
        pde.attention_map(x.int())
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="p must be finite and > 0"):
            pde.attention_map(x, p=bad)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pde.attention_map(x, eps=-1.0)
    with pytest.raises(TypeError, match="p must be a Python number"):
        pde.attention_map(x, p=torch.tensor(2.0))


def test_native_op_checks_its_arguments():
    x = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="features must be \\[N, C, H, W\\]"):
        FWD(x[0], 2.0, 1e-12)
    with pytest.raises(RuntimeError, match="p must be finite and > 0"):
        FWD(x, -2.0, 1e-12)
    with pytest.raises(RuntimeError, match="eps must be finite"):
        FWD(x, 2.0, -1.0)
    out, a = FWD(x, 2.0, 1e-12)
    assert a.shape == (2, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a, x.pow(2).sum(1).flatten(1))
    with pytest.raises(RuntimeError, match="grad_out must be \\[N, H\\*W\\]"):
        BWD(out[:, :3], x, a, 2.0, 1e-12)
    with pytest.raises(RuntimeError, match="a must be \\[N, H\\*W\\]"):
        BWD(out, x, a[:1], 2.0, 1e-12)
    with pytest.raises(RuntimeError, match="a must be Float"):
        BWD(out, x, a.double(), 2.0, 1e-12)
