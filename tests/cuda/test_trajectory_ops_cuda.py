"""CUDA kernels of param_distance / sgd_step_accumulate (csrc/cuda/traj_kernels.cu) against the
float64 oracle and the CPU kernels. Skipped without a CUDA device."""
import pytest
import torch

import pydistill_ext as pde
from pydistill_ext._lib import has_kernel
from reference import trajectory_ops as ref

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
PD_FWD = torch.ops.pydistill_ext.param_distance_forward
TOL = {torch.float64: 1e-13, torch.float32: 1e-5}


def _vec(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _triple(shape, dtype, seed=0):
    target = _vec(shape, dtype, seed)
    return (target + _vec(shape, dtype, seed + 1, 0.1), target,
            target + _vec(shape, dtype, seed + 2, 0.3))


def test_kernels_are_registered():
    for op in ("param_distance_forward", "param_distance_backward", "sgd_step_accumulate"):
        assert has_kernel(op, "CUDA"), op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1,), (4097,), (317706,), (3_000_000,), (4, 4097), (8, 1000)],
                         ids=str)
def test_param_distance_matches_oracle_and_cpu(dtype, shape):
    theta, target, start = _triple(shape, dtype)
    want = ref.param_distance(theta, target, start)
    ins = [t.cuda().requires_grad_() for t in (theta, target, start)]
    got = pde.param_distance(*ins)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert ((got.double().cpu() - want).abs() / want).max().item() <= TOL[dtype]
    cpu = pde.param_distance(theta, target, start)
    assert ((got.double().cpu() - cpu.double()).abs() / want).max().item() <= 2 * TOL[dtype]
    # deterministic: a second run is bitwise equal
    assert torch.equal(pde.param_distance(*[t.detach() for t in ins]), got.detach())
    gl = torch.rand(shape[:-1], dtype=dtype) + 0.5
    grads = torch.autograd.grad(got, ins, gl.cuda())
    ins_d = [t.double().requires_grad_() for t in (theta, target, start)]
    wgrads = torch.autograd.grad(ref.param_distance(*ins_d), ins_d, gl.double())
    for g, w in zip(grads, wgrads):
        assert (g.double().cpu() - w).abs().max().item() <= TOL[dtype] * 10 * w.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sgd_step_matches_cpu(dtype):
    shape = (317706,)
    theta, grad, G = (_vec(shape, dtype, s) for s in (10, 11, 12))
    lr = torch.tensor(0.02, dtype=dtype)
    c_th, c_G = pde.sgd_step_accumulate(theta, grad, lr, G)
    ins = [t.cuda().requires_grad_() for t in (theta, grad, lr, G)]
    th1, G1 = pde.sgd_step_accumulate(*ins)
    # both backends round theta - lr g once (fma): bitwise equal
    assert torch.equal(th1.detach().cpu(), c_th) and torch.equal(G1.detach().cpu(), c_G)
    u, w = _vec(shape, dtype, 13), _vec(shape, dtype, 14)
    got = torch.autograd.grad((th1, G1), ins, (u.cuda(), w.cuda()))
    b = [t.double().requires_grad_() for t in (theta, grad, lr, G)]
    want = torch.autograd.grad(ref.sgd_step_accumulate(*b), b, (u.double(), w.double()))
    for g, wt in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), wt, rtol=TOL[dtype], atol=TOL[dtype] * 1e3)


def test_opcheck_and_compile_cuda():
    theta, target, start = (t.cuda() for t in _triple((300,), torch.float32, seed=20))
    torch.library.opcheck(PD_FWD.default, (theta.clone().requires_grad_(), target, start))
    lr = torch.tensor(0.1, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.pydistill_ext.sgd_step_accumulate.default,
                          (theta.clone().requires_grad_(), target, lr, start))

    def f(th, lr):
        th1, G = pde.sgd_step_accumulate(th, target, lr, torch.zeros_like(th))
        return pde.param_distance(th1, target, start) + G.sum()

    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(theta, lr), f(theta, lr), rtol=1e-5, atol=1e-6)
