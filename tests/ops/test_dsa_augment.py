"""The fused DSA op (pydistill_ext::dsa_apply_forward / _backward, CPU kernels) against the
float64 oracle in python/reference/dsa_augment.py (the per-op pure-torch path in float64)."""
import math

import pytest
import torch

import pydistill_ext as pde
from pydistill_ext.augment import (DEFAULT_STRATEGY, DSA_STRATEGIES, DSAOp, DSAParams,
                                   DSATransform, dsa_apply, dsa_params)
from pydistill_ext.augment import dsa_augment as augment_dsa_augment
from pydistill_ext.ops.dsa_augment import dsa_apply_fused, pack_transform
from reference import dsa_augment as ref

FWD = torch.ops.pydistill_ext.dsa_apply_forward
BWD = torch.ops.pydistill_ext.dsa_apply_backward
# Max |fused - oracle| relative to max |oracle| (output; gradient likewise). float64: rounding
# only (different summation order: 16 tap products vs two nested grid_samples). float32: the
# sampling coordinates are computed in float32 (error ~ 1e-7 * W / 2 pixels) times the image's
# local slope, plus float32 sums. float16 / bfloat16: one rounding of the output (2^-11 / 2^-8
# relative) on top of the float32 math.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(4, 3, 8, 9), (3, 2, 1, 1), (2, 1, 28, 28), (3, 3, 7, 5), (2, 2, 1, 6)]
CASES = [(g, "all") for g in DSA_STRATEGIES] + [(DEFAULT_STRATEGY, "all"),
                                                (DEFAULT_STRATEGY, "single")]


def _x(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _rel(got, want):
    assert got.shape == want.shape
    if want.numel() == 0:
        return 0.0
    return (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-300)


def _check(x, t, tol, seed=1):
    """Fused forward and backward vs the oracle for transform t."""
    assert pack_transform(t) is not None  # really the fused op
    a = x.clone().requires_grad_()
    y = dsa_apply(a, t)
    b = x.detach().double().requires_grad_()
    want = ref.dsa_apply_ref(b, t)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    err = _rel(y, want)
    assert err <= tol, f"forward error {err:.3g}"
    go = _x(x.shape, torch.float64, seed=seed)
    y.backward(go.to(x.dtype))
    want.backward(go)
    err = _rel(a.grad, b.grad)
    assert a.grad.dtype == x.dtype
    assert err <= tol, f"grad error {err:.3g}"


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("strategy,mode", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_oracle(dtype, strategy, mode, per_sample, align_corners):
    p = DSAParams(align_corners=align_corners)
    for k, shape in enumerate(SHAPES):
        x = _x(shape, dtype, seed=k)
        for seed in range(3):  # e.g. flip on and off, several single-mode groups
            t = dsa_params(seed + 10 * k, shape, strategy=strategy, per_sample=per_sample,
                           mode=mode, params=p)
            _check(x, t, TOL[dtype], seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types(dtype):
    for per_sample in (False, True):
        x = _x((3, 3, 8, 7), dtype)
        t = dsa_params(4, x.shape, mode="all", per_sample=per_sample)
        _check(x, t, TOL[dtype])
    # computed in float32 and rounded once: equal to the float32 op's output rounded
    x = _x((4, 3, 8, 8), torch.float16).float()
    t = dsa_params(5, x.shape, mode="all", per_sample=True)
    assert torch.equal(dsa_apply(x.half(), t), dsa_apply(x, t).half())


def _one(x, names_values, align_corners=False):
    ops = tuple(DSAOp(name, vals) for name, vals in names_values)
    return DSATransform(groups=tuple(n for n, _ in names_values), ops=ops,
                        batch_size=x.shape[0], height=x.shape[2], width=x.shape[3],
                        align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
def test_extreme_parameters(align_corners):
    """Parameters far outside the default ranges: shifts past the border, boxes covering the
    image, negative / large scales, rotations up to 180 degrees, partial colour chains."""
    x = _x((6, 3, 9, 7))
    f = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    i = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    steps = [
        ("brightness", {"shift": f(0.3, -2, 0, 1, 5, -0.1)}),
        ("contrast", {"factor": f(0, 1, 2.5, -1, 0.5, 1.3)}),
        ("crop", {"shift_h": i(0, 9, -3, 2, -8, 1), "shift_w": i(0, -7, 3, 6, 1, -2)}),
        ("cutout", {"center_h": i(0, 4, 8, 9, 3, 2), "center_w": i(7, 3, 0, 2, 3, 5),
                    "size_h": i(4, 9, 1, 0, 20, 3), "size_w": i(3, 7, 2, 5, 20, 1)}),
        ("flip", {"flip": torch.tensor([True, False, True, True, False, True])}),
        ("scale", {"sx": f(1, -1, 0.3, 2.5, -0.7, 1.1), "sy": f(1, 1, -1.5, 0.4, 3, 0.9)}),
        ("rotate", {"angle": f(0, math.pi, -math.pi / 2, 0.3, 2.9, -1.2)}),
    ]
    for k in range(len(steps)):
        _check(x, _one(x, steps[k:k + 3], align_corners), 1e-12)
    _check(x, _one(x, steps, align_corners), 1e-12)
    _check(x, _one(x, [steps[0], steps[4], steps[6]], align_corners), 1e-12)
    # a saturation-only chain (beta != 0, alpha = s)
    _check(x, _one(x, [("saturation", {"factor": f(0, 1, 2, -1, 0.5, 3)})], align_corners), 1e-12)


def test_exact_integer_ops():
    """Crop, cutout and flip alone are index maps: the fused op is bitwise the pure path."""
    x = _x((5, 3, 8, 9), torch.float32)
    for seed in range(6):
        for strategy in ("crop", "cutout", "flip", "crop_cutout_flip"):
            t = dsa_params(seed, x.shape, strategy=strategy, mode="all", per_sample=True)
            assert torch.equal(dsa_apply(x, t), dsa_apply(x, t, fused=False))


def test_non_canonical_order_falls_back_to_pure_torch():
    x = _x((3, 3, 8, 9), torch.float32)
    t = dsa_params(4, x.shape, strategy="flip_crop_color", mode="all", per_sample=True)
    assert pack_transform(t) is None
    assert torch.equal(dsa_apply(x, t), dsa_apply(x, t, fused=False))
    t = dsa_params(4, x.shape, strategy="color_crop", mode="all", per_sample=True)
    assert pack_transform(t) is not None


def test_public_api_uses_the_fused_op():
    x = _x((4, 3, 8, 8), torch.float32)
    for seed in range(4):
        t = dsa_params(seed, x.shape, mode="all")
        params, flags = pack_transform(t)
        fused = dsa_apply_fused(x, params, flags, False)
        assert torch.equal(pde.dsa_augment(x, seed=seed, mode="all"), fused)
        assert torch.equal(augment_dsa_augment(x, seed=seed, mode="all"), fused)
        pure = augment_dsa_augment(x, seed=seed, mode="all", fused=False)
        torch.testing.assert_close(fused, pure, rtol=1e-5, atol=2e-5)
    # 'all' applies every op: the flag word has every geometric bit
    assert pack_transform(dsa_params(0, x.shape, mode="all"))[1] == 63


# ---------------------------------------------------------------- seeding and Siamese use

def test_determinism_and_seed_sensitivity():
    x = _x((6, 3, 10, 10), torch.float32)
    for mode in ("single", "all"):
        for ps in (False, True):
            a = pde.dsa_augment(x, seed=123, mode=mode, per_sample=ps)
            assert torch.equal(a, pde.dsa_augment(x, seed=123, mode=mode, per_sample=ps))
    a = pde.dsa_augment(x, seed=1, mode="all", per_sample=True)
    assert not torch.allclose(a, pde.dsa_augment(x, seed=2, mode="all", per_sample=True))


def test_thread_count_does_not_change_results():
    x = _x((8, 3, 12, 11), torch.float32)
    t = dsa_params(3, x.shape, mode="all", per_sample=True)
    go = _x(x.shape, torch.float32, seed=9)
    prev = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            a = x.clone().requires_grad_()
            y = dsa_apply(a, t)
            y.backward(go)
            outs.append((y.detach(), a.grad))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("mode", ["single", "all"])
def test_siamese_same_transform_for_two_batches(mode):
    real, syn = _x((7, 3, 9, 9), torch.float32, 1), _x((3, 3, 9, 9), torch.float32, 2)
    for seed in range(8):
        yr = pde.dsa_augment(real, seed=seed, mode=mode)
        ys = pde.dsa_augment(syn, seed=seed, mode=mode)
        both = pde.dsa_augment(torch.cat([real, syn]), seed=seed, mode=mode)
        # one transform for every sample of both batches: augmenting them together is
        # augmenting each alone, bitwise (each output pixel depends only on its own sample)
        assert torch.equal(both, torch.cat([yr, ys]))
        # and it is the oracle's transform for that seed
        want = ref.dsa_augment_ref(syn, seed=seed, strategy=DEFAULT_STRATEGY, mode=mode)
        assert _rel(ys, want) <= TOL[torch.float32]
    # same image in both batches -> same augmented image
    syn2 = syn.clone()
    syn2[0] = real[0]
    for seed in range(4):
        assert torch.equal(pde.dsa_augment(syn2, seed=seed, mode="all")[0],
                           pde.dsa_augment(real, seed=seed, mode="all")[0])


def test_gradient_flow():
    x = _x((4, 3, 10, 10), torch.float32).requires_grad_()
    seen_zero_grad = False
    for seed in range(6):
        x.grad = None
        y = pde.dsa_augment(x, seed=seed, mode="all", per_sample=True)
        (y * _x(y.shape, torch.float32, seed=seed)).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        for n in range(4):
            assert x.grad[n].abs().sum() > 0  # every sample gets a gradient
        seen_zero_grad |= bool((x.grad == 0).any())
    # cutout alone: the gradient is exactly zero on the box and only there
    x = (_x((2, 1, 6, 6)).abs() + 1).float().requires_grad_()
    t = dsa_params(0, x.shape, strategy="cutout", per_sample=True)
    dsa_apply(x, t).sum().backward()
    zeros = dsa_apply(x.detach(), t) == 0
    assert zeros.any() and torch.equal(x.grad == 0, zeros)


# ---------------------------------------------------------------- autograd / dispatcher

@pytest.mark.parametrize("strategy,mode", CASES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck(strategy, mode, align_corners):
    x = _x((2, 2, 4, 5)).requires_grad_()
    t = dsa_params(3, x.shape, strategy=strategy, mode=mode, per_sample=True,
                   params=DSAParams(align_corners=align_corners))
    assert torch.autograd.gradcheck(lambda a: dsa_apply(a, t), (x,))


def test_gradgradcheck():
    x = _x((2, 2, 4, 5)).requires_grad_()
    for seed in range(2):
        t = dsa_params(seed, x.shape, mode="all", per_sample=True)
        assert torch.autograd.gradgradcheck(lambda a: dsa_apply(a, t), (x,))


def test_opcheck():
    x = _x((3, 3, 6, 5), torch.float32)
    for seed, align in ((0, False), (1, True)):
        params, flags = pack_transform(dsa_params(seed, x.shape, mode="all", per_sample=True))
        torch.library.opcheck(FWD.default, (x.clone().requires_grad_(), params, flags, align))
        torch.library.opcheck(BWD.default, (torch.randn_like(x).requires_grad_(), params, flags,
                                            align))


def test_torch_compile_fullgraph(compiled_matches_eager):
    x = _x((4, 3, 8, 8), torch.float32)
    t = dsa_params(5, x.shape, mode="all", per_sample=True)
    target = _x(x.shape, torch.float32, seed=3)

    def f(a):
        return (dsa_apply(a, t) - target).pow(2).mean()

    compiled_matches_eager(f, x)

    # the packed op with the parameters as a graph input
    params, flags = pack_transform(t)

    def g(a, p):
        return torch.ops.pydistill_ext.dsa_apply_forward(a, p, flags, False).sum()

    torch.testing.assert_close(torch.compile(g, fullgraph=True)(x, params), g(x, params))


# ---------------------------------------------------------------- bad input

def test_bad_inputs_python():
    x = _x((2, 3, 4, 4), torch.float32)
    params, flags = pack_transform(dsa_params(0, x.shape, mode="all"))
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        dsa_apply_fused(x[0], params, flags)
    with pytest.raises(TypeError, match=r"x must be a floating-point"):
        dsa_apply_fused(x.int(), params, flags)
    with pytest.raises(TypeError, match="params must be a float64"):
        dsa_apply_fused(x, params.float(), flags)
    with pytest.raises(ValueError, match=r"params must be \[N, 14\]"):
        dsa_apply_fused(x, params[:1], flags)
    with pytest.raises(ValueError, match="flags must be an int in"):
        dsa_apply_fused(x, params, 64)
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        dsa_apply_fused(x, params, flags, 1)
    with pytest.raises(ValueError, match=r"transform was drawn for"):
        dsa_apply(x[:1], dsa_params(0, x.shape))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pde.dsa_augment([[1.0]], seed=0)


def test_native_op_checks_its_arguments():
    x = _x((2, 3, 4, 4), torch.float32)
    params, flags = pack_transform(dsa_params(0, x.shape, mode="all"))
    with pytest.raises(RuntimeError, match=r"x must be \[N, C, H, W\]"):
        FWD(x[0], params, flags, False)
    with pytest.raises(RuntimeError, match="x must be float64, float32"):
        FWD(x.int(), params, flags, False)
    with pytest.raises(RuntimeError, match="params must be float64"):
        FWD(x, params.float(), flags, False)
    with pytest.raises(RuntimeError, match=r"params must be \[N, 14\]"):
        FWD(x, params[:, :13], flags, False)
    with pytest.raises(RuntimeError, match=r"params must be \[N, 14\] with N = x.size\(0\) = 2"):
        FWD(x, params[:1], flags, False)
    with pytest.raises(RuntimeError, match="flags must be in"):
        FWD(x, params, -1, False)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[N, C, H, W\]"):
        BWD(x[0], params, flags, False)
    with pytest.raises(RuntimeError, match=r"params must be \[N, 14\] with N = grad_out"):
        BWD(x, params[:1], flags, False)


def test_empty_and_identity():
    x = _x((0, 3, 4, 4), torch.float32)
    assert pde.dsa_augment(x, seed=1, mode="all").shape == x.shape
    params = torch.zeros(0, 14, dtype=torch.float64)
    assert FWD(x, params, 63, False).shape == x.shape
    x = _x((2, 3, 5, 4), torch.float32)
    assert pde.dsa_augment(x, seed=0, strategy="none") is x
    # identity parameters: no colour change, no geometry -> exactly x
    ident = torch.zeros(2, 14, dtype=torch.float64)
    ident[:, 1:3] = 1.0
    assert torch.equal(FWD(x, ident, 0, False), x)
    assert torch.equal(BWD(x, ident, 0, False), x)
