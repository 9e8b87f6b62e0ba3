"""CUDA kernels of the fused DSA op (csrc/cuda/dsa_augment_kernel.cu) against the CPU kernels
and the float64 oracle. Skipped without a CUDA device."""
import pytest
import torch

import pydistill_ext as pde
from pydistill_ext._lib import has_kernel
from pydistill_ext.augment import DEFAULT_STRATEGY, DSA_STRATEGIES, DSAParams, dsa_apply, dsa_params
from pydistill_ext.ops.dsa_augment import pack_transform
from reference import dsa_augment as ref

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
FWD = torch.ops.pydistill_ext.dsa_apply_forward
BWD = torch.ops.pydistill_ext.dsa_apply_backward
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# relative to the largest oracle value / gradient; float32 looser than on the CPU: the build
# uses --use_fast_math (approximate divisions in the sampling coordinates) and the backward
# sums with atomics in any order
TOL = {torch.float64: 1e-11, torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CASES = [(g, "all") for g in DSA_STRATEGIES] + [(DEFAULT_STRATEGY, "all"),
                                                (DEFAULT_STRATEGY, "single")]


def _x(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _rel(got, want):
    return (got.double().cpu() - want).abs().max().item() / max(want.abs().max().item(), 1e-300)


def test_kernels_are_registered():
    assert has_kernel("dsa_apply_forward", "CUDA") and has_kernel("dsa_apply_backward", "CUDA")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("strategy,mode", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 8, 9), (256, 3, 32, 32), (7, 1, 28, 28), (2, 2, 1, 1)])
def test_matches_oracle_and_cpu(shape, dtype, strategy, mode, align_corners):
    x = _x(shape, dtype)
    for seed in range(2):
        t = dsa_params(seed, shape, strategy=strategy, mode=mode, per_sample=True,
                       params=DSAParams(align_corners=align_corners))
        a = x.cuda().requires_grad_()
        y = dsa_apply(a, t)
        b = x.double().requires_grad_()
        want = ref.dsa_apply_ref(b, t)
        assert y.device.type == "cuda" and y.dtype == dtype
        assert _rel(y, want) <= TOL[dtype]
        go = _x(shape, torch.float64, seed=seed + 1)
        y.backward(go.to(dtype).cuda())
        want.backward(go)
        assert torch.isfinite(a.grad).all()
        assert _rel(a.grad, b.grad) <= TOL[dtype]
        # the CPU kernel on the same input: same math, same taps
        c = x.clone().requires_grad_()
        yc = dsa_apply(c, t)
        yc.backward(go.to(dtype))
        assert _rel(y, yc.double()) <= TOL[dtype]
        assert _rel(a.grad, c.grad.double()) <= TOL[dtype]


def test_siamese_and_determinism_on_cuda():
    real, syn = _x((64, 3, 32, 32), torch.float32).cuda(), _x((10, 3, 32, 32), torch.float32, 1).cuda()
    for seed in range(4):
        both = pde.dsa_augment(torch.cat([real, syn]), seed=seed, mode="all")
        assert torch.equal(both, torch.cat([pde.dsa_augment(real, seed=seed, mode="all"),
                                            pde.dsa_augment(syn, seed=seed, mode="all")]))
        assert torch.equal(pde.dsa_augment(syn, seed=seed), pde.dsa_augment(syn, seed=seed))


def test_opcheck_and_compile(compiled_matches_eager):
    x = _x((3, 3, 6, 5), torch.float32).cuda()
    params, flags = pack_transform(dsa_params(1, x.shape, mode="all", per_sample=True))
    params = params.cuda()
    torch.library.opcheck(FWD.default, (x.clone().requires_grad_(), params, flags, False))
    torch.library.opcheck(BWD.default, (torch.randn_like(x), params, flags, True))
    t = dsa_params(2, x.shape, mode="all", per_sample=True)
    f = lambda a: dsa_apply(a, t).pow(2).sum()  # noqa: E731
    compiled_matches_eager(f, x)


def test_params_on_another_device_is_an_error():
    x = _x((2, 3, 4, 4), torch.float32).cuda()
    params, flags = pack_transform(dsa_params(0, x.shape, mode="all"))
    with pytest.raises(RuntimeError, match="params is on cpu but x is on cuda"):
        FWD(x, params, flags, False)
