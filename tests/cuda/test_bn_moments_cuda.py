"""CUDA kernels of bn_moments (csrc/cuda/bn_moments_kernel.cu) against the float64 oracle and
the CPU kernel. Skipped without a CUDA device."""
import pytest
import torch

import pydistill_ext as pde
from pydistill_ext._lib import has_kernel
from reference import bn_moments as ref

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
FWD = torch.ops.pydistill_ext.bn_moments_forward
BWD = torch.ops.pydistill_ext.bn_moments_backward
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# relative to max|x| (mean) and max var (var): the CPU table (float32 Welford / Chan merges)
TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def _x(shape, dtype, seed=0, loc=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


def test_kernels_are_registered():
    assert has_kernel("bn_moments_forward", "CUDA") and has_kernel("bn_moments_backward", "CUDA")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 64, 32, 32), (8, 5, 7, 6), (1, 4, 9, 9), (300, 9),
                                   (3, 4, 5, 3, 2), (2, 70, 1, 1), (128, 512, 4, 4)], ids=str)
@pytest.mark.parametrize("per_sample,unbiased", [(False, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_oracle_and_cpu(dtype, shape, per_sample, unbiased, channels_last):
    if per_sample and len(shape) == 2 or (per_sample and shape[2:] == (1, 1)):
        pytest.skip("count 1 with unbiased")
    x = _x(shape, dtype)
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    gm, gv = pde.bn_moments(x.cuda(), per_sample=per_sample, unbiased=unbiased)
    wm, wv = ref.bn_moments(x, per_sample, unbiased)
    comp = torch.float64 if dtype == torch.float64 else torch.float32
    assert gm.dtype == comp and gv.dtype == comp and gm.shape == wm.shape
    ms, vs = x.double().abs().max().item(), wv.abs().max().item()
    assert (gm.cpu().double() - wm).abs().max().item() <= TOL[dtype] * ms
    assert (gv.cpu().double() - wv).abs().max().item() <= 4 * TOL[dtype] * vs
    cm, cv = pde.bn_moments(x, per_sample=per_sample, unbiased=unbiased)
    assert (gv.cpu().double() - cv.double()).abs().max().item() <= 8 * TOL[dtype] * vs


def test_large_mean_small_variance_and_determinism():
    x = _x((64, 16, 32, 32), torch.float32, seed=3, loc=1e4, scale=1e-2).cuda()
    _, want = ref.bn_moments(x.cpu())
    m1, v1 = pde.bn_moments(x)
    assert ((v1.cpu().double() - want).abs() / want).max().item() < 1e-5
    for _ in range(3):
        m2, v2 = pde.bn_moments(x)
        assert torch.equal(m1, m2) and torch.equal(v1, v2)
    xc = x.contiguous(memory_format=torch.channels_last)
    _, v3 = pde.bn_moments(xc)
    assert ((v3.cpu().double() - want).abs() / want).max().item() < 1e-5
    assert torch.equal(v3, pde.bn_moments(xc)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample,unbiased", [(False, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_cpu_and_oracle(dtype, per_sample, unbiased, channels_last):
    x = _x((16, 24, 9, 7), dtype, seed=4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(5)
    shp = (16, 24) if per_sample else (24,)
    gm, gv = torch.randn(shp, generator=g, dtype=torch.float64), torch.randn(shp, generator=g, dtype=torch.float64)
    a = x.cuda().requires_grad_()
    m, v = pde.bn_moments(a, per_sample=per_sample, unbiased=unbiased)
    ((m * gm.to(m).cuda()).sum() + (v * gv.to(v).cuda()).sum()).backward()
    assert a.grad.stride() == x.stride() and a.grad.dtype == dtype
    b = x.double().requires_grad_()
    wm, wv = ref.bn_moments(b, per_sample, unbiased)
    ((wm * gm).sum() + (wv * gv).sum()).backward()
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert (a.grad.cpu().double() - b.grad).abs().max().item() <= tol * b.grad.abs().max().item()


def test_gradcheck_opcheck_compile(compiled_matches_eager):
    x = _x((3, 4, 3, 2), torch.float64, seed=6).cuda().requires_grad_()
    f = lambda a: pde.bn_moments(a, per_sample=False, unbiased=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    xf = _x((8, 6, 5, 5), torch.float32, seed=7).cuda()
    for xx in (xf, xf.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(FWD.default, (xx.clone().requires_grad_(), False, False))
        m, _ = FWD(xx, True, True)
        torch.library.opcheck(BWD.default, (torch.randn_like(m), torch.randn_like(m), xx, m, True, True))
    rm, rv = torch.randn(6, device="cuda"), torch.rand(6, device="cuda") + 0.5

    def loss(a):
        m, v = pde.bn_moments(a)
        return torch.norm(rv - v, 2) + torch.norm(rm - m, 2)

    compiled_matches_eager(loss, xf)
