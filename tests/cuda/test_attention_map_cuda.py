"""CUDA kernels of attention_map (csrc/cuda/attention_map_kernel.cu) against the CPU kernels
and the float64 oracle. Skipped without a CUDA device."""
import pytest
import torch

import pydistill_ext as pde
from pydistill_ext._lib import has_kernel
from reference import attention_map as ref

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
FWD = torch.ops.pydistill_ext.attention_map_forward
BWD = torch.ops.pydistill_ext.attention_map_backward
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# relative to the largest oracle value / gradient; float32 is looser than on the CPU because
# the build uses --use_fast_math (__powf for p not in {1, 2, 4})
TOL = {torch.float64: 1e-11, torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _rel(got, want):
    return (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-300)


def test_kernels_are_registered():
    assert has_kernel("attention_map_forward", "CUDA") and has_kernel("attention_map_backward", "CUDA")


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 0.5, 3.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7, 6, 9), (64, 128, 16, 16), (3, 4, 40, 40)])
def test_matches_oracle(p, dtype, shape):
    x = _inputs(shape, dtype)
    x.view(-1)[::7] = 0  # zeros: subgradient 0
    a = x.cuda().requires_grad_()
    out = pde.attention_map(a, p=p)
    b = x.double().requires_grad_()
    want = ref.attention_map(b, p=p)
    assert _rel(out.cpu(), want) <= TOL[dtype]
    go = _inputs(want.shape, torch.float64, seed=4)
    out.backward(go.to(dtype).cuda())
    want.backward(go)
    assert torch.isfinite(a.grad).all()
    assert _rel(a.grad.cpu(), b.grad) <= TOL[dtype]


def test_eps_branch_and_zero_sample():
    x = torch.full((2, 1, 2, 2), 1e-3, dtype=torch.float64)
    x[1] = 0
    a = x.cuda().requires_grad_()
    out = pde.attention_map(a, p=2.0, eps=1.0)
    b = x.clone().requires_grad_()
    want = ref.attention_map(b, p=2.0, eps=1.0)
    torch.testing.assert_close(out.cpu(), want)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(a.grad.cpu(), b.grad)


def test_opcheck_and_compile(compiled_matches_eager):
    x = _inputs((3, 5, 4, 3), torch.float32).cuda()
    torch.library.opcheck(FWD.default, (x.clone().requires_grad_(), 4.0, 1e-12))
    out, a = FWD(x, 4.0, 1e-12)
    torch.library.opcheck(BWD.default, (torch.randn_like(out), x, a, 4.0, 1e-12))
    f = lambda a: pde.attention_map(a, p=2.0).pow(2).sum()
    compiled_matches_eager(f, x)
