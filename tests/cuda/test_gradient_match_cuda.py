"""CUDA kernels of gradient_match_distance (csrc/cuda/gradient_match_kernel.cu) against the
CPU kernels and the float64 oracle. Skipped without a CUDA device."""
import pytest
import torch

import pydistill_ext as pde
from pydistill_ext._lib import has_kernel
from reference import gradient_match as ref

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
FWD = torch.ops.pydistill_ext.gradient_match_forward
BWD = torch.ops.pydistill_ext.gradient_match_backward
METRICS = ("ours", "mse", "cos")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: dict(loss=1e-12, grad=1e-10), torch.float32: dict(loss=2e-5, grad=2e-5),
       torch.bfloat16: dict(loss=8e-3, grad=1e-2), torch.float16: dict(loss=1e-3, grad=2e-3)}
CONVNET3 = [(128, 3, 3, 3), (128,), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128,),
            (128, 128, 3, 3), (128,), (128,), (128,), (10, 2048), (10,), (4, 5, 6), (5000,)]


def _grads(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    b = [0.6 * x + torch.randn(x.shape, generator=g, dtype=torch.float64) for x in a]
    return [x.to(dtype) for x in a], [y.to(dtype) for y in b]


def test_kernels_are_registered():
    assert has_kernel("gradient_match_forward", "CUDA") and has_kernel("gradient_match_backward", "CUDA")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(metric, dtype):
    a, b = _grads(CONVNET3, dtype)
    tol = TOL[dtype]
    xa = [t.cuda().requires_grad_() for t in a]
    xb = [t.cuda().requires_grad_() for t in b]
    out = pde.gradient_match_distance(xa, xb, metric)
    ra = [t.double().clone().requires_grad_() for t in a]
    rb = [t.double().clone().requires_grad_() for t in b]
    want = ref.gradient_match_distance(ra, rb, metric)
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol["loss"], atol=tol["loss"])
    out.backward()
    want.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ra + rb]
    scale = max(g.abs().max().item() for g in grads)
    for got, exp in zip(xa + xb, grads):
        assert (got.grad.cpu().double() - exp).abs().max().item() <= tol["grad"] * scale


def test_deterministic_opcheck_compile():
    a, b = _grads([(6, 3, 3, 3), (6,), (4, 24), (5000,)], torch.float32, seed=2)
    a, b = [t.cuda() for t in a], [t.cuda() for t in b]
    for metric in METRICS:
        assert torch.equal(pde.gradient_match_distance(a, b, metric),
                           pde.gradient_match_distance(a, b, metric))
        torch.library.opcheck(FWD.default, ([t.clone().requires_grad_() for t in a], b, metric))
        _, stats = FWD(a, b, metric)
        torch.library.opcheck(BWD.default, (torch.tensor(1.3, device="cuda"), a, b, stats, metric,
                                            True, True))
    f = lambda xs: pde.gradient_match_distance(xs, b, "ours")
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(a), f(a))
