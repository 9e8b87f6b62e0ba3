"""Differentiable Siamese Augmentation (pydistill_ext.augment.dsa): semantics, seeding, Siamese
property, per-op expectations and float64 gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from pydistill_ext.augment import (DEFAULT_STRATEGY, DSA_OPS, DSA_STRATEGIES, DSAOp, DSAParams,
                                   DSATransform, dsa_apply, dsa_augment, dsa_params)


def _x(n=4, c=3, h=8, w=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)


def _one(x, name, **values):
    """A transform of the single op `name` with the given per-sample values."""
    return DSATransform(groups=(name,), ops=(DSAOp(name, values),), batch_size=x.shape[0],
                        height=x.shape[2], width=x.shape[3])


def _op(t, name):
    (op,) = [o for o in t.ops if o.name == name]
    return op.values


# ---------------------------------------------------------------- API, defaults, validation

def test_defaults_match_original_paramdiffaug():
    p = DSAParams()
    assert (p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad, p.ratio_cutout,
            p.brightness, p.saturation, p.contrast, p.align_corners) == \
        (0.5, 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5, False)
    assert DSA_STRATEGIES == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert DEFAULT_STRATEGY == "color_crop_cutout_flip_scale_rotate"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["single", "all"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_shape_dtype_preserved(dtype, mode, per_sample):
    x = _x(3, 2, 7, 5, dtype=dtype)
    y = dsa_augment(x, seed=11, mode=mode, per_sample=per_sample)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.is_contiguous() and torch.isfinite(y.float()).all()


def test_half_matches_float32_up_to_rounding():
    x = _x(4, 3, 8, 8).half().float()
    y32 = dsa_augment(x, seed=5, mode="all", per_sample=True)
    y16 = dsa_augment(x.half(), seed=5, mode="all", per_sample=True)
    assert torch.equal(y16, y32.half())  # computed in float32, rounded once


@pytest.mark.parametrize("strategy", ["none", "None", ""])
def test_none_is_identity(strategy):
    x = _x()
    assert dsa_augment(x, seed=0, strategy=strategy) is x
    assert dsa_params(0, x.shape, strategy=strategy).ops == ()


def test_empty_batch():
    x = _x(0)
    assert dsa_augment(x, seed=1, mode="all", per_sample=True).shape == x.shape


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"x must be 4-D.*\(3, 4, 5\)"):
        dsa_augment(torch.zeros(3, 4, 5), seed=0)
    with pytest.raises(TypeError, match=r"x must be a floating-point.*torch.int64"):
        dsa_augment(torch.zeros(1, 1, 4, 4, dtype=torch.int64), seed=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        dsa_augment([[1.0]], seed=0)
    with pytest.raises(ValueError, match=r"unknown group.*'blur'.*color.*rotate"):
        dsa_augment(_x(), seed=0, strategy="color_blur")
    with pytest.raises(ValueError, match="unknown group"):
        dsa_augment(_x(), seed=0, strategy="color__crop")
    with pytest.raises(ValueError, match="mode must be one of"):
        dsa_augment(_x(), seed=0, mode="S")
    with pytest.raises(ValueError, match="seed must be in"):
        dsa_augment(_x(), seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        dsa_augment(_x(), seed=1.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        dsa_augment(_x(), seed=True)
    with pytest.raises(TypeError, match="per_sample must be a bool"):
        dsa_augment(_x(), seed=0, per_sample=1)
    with pytest.raises(TypeError, match="params must be a DSAParams"):
        dsa_augment(_x(), seed=0, params={"prob_flip": 1.0})
    with pytest.raises(ValueError, match="prob_flip"):
        DSAParams(prob_flip=1.5)
    with pytest.raises(ValueError, match="ratio_scale"):
        DSAParams(ratio_scale=0.0)
    with pytest.raises(ValueError, match="transform was drawn for"):
        dsa_apply(_x(5), dsa_params(0, (4, 3, 8, 9)))
    with pytest.raises(ValueError, match=r"needs values\['angle'\]"):
        dsa_apply(_x(), _one(_x(), "rotate", angle=torch.zeros(3)))


# ---------------------------------------------------------------- seeding

def test_determinism_and_seed_sensitivity():
    x = _x(6)
    for mode in ("single", "all"):
        for ps in (False, True):
            a = dsa_augment(x, seed=123, mode=mode, per_sample=ps)
            assert torch.equal(a, dsa_augment(x, seed=123, mode=mode, per_sample=ps))
    # continuous colour parameters: different seeds give different outputs
    a = dsa_augment(x, seed=1, mode="all", per_sample=True)
    assert not torch.allclose(a, dsa_augment(x, seed=2, mode="all", per_sample=True))
    # single mode: every group gets picked; the continuous groups never repeat an output
    picked = [dsa_params(s, x.shape).groups[0] for s in range(40)]
    assert set(picked) == set(DSA_STRATEGIES)
    outs = [dsa_augment(x, seed=s) for s in range(40) if picked[s] in ("color", "scale", "rotate")]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == len(outs) > 5


def test_global_rng_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    x = _x(5)
    for mode in ("single", "all"):
        for ps in (False, True):
            dsa_augment(x, seed=7, mode=mode, per_sample=ps)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    a = dsa_augment(x, seed=3, mode="all")
    torch.manual_seed(100)
    assert torch.equal(a, dsa_augment(x, seed=3, mode="all"))


def test_large_seed():
    x = _x(2)
    assert torch.equal(dsa_augment(x, seed=2**64 - 1, mode="all"),
                       dsa_augment(x, seed=2**64 - 1, mode="all"))


# ---------------------------------------------------------------- Siamese property

@pytest.mark.parametrize("mode", ["single", "all"])
def test_siamese_shared_any_batch_sizes(mode):
    """per_sample=False (default): the transformation is independent of N and of the pixels."""
    real, syn = _x(7, seed=1), _x(3, seed=2)
    for seed in range(12):
        tr, ts = dsa_params(seed, real.shape, mode=mode), dsa_params(seed, syn.shape, mode=mode)
        assert tr.groups == ts.groups
        for a, b in zip(tr.ops, ts.ops):
            assert a.name == b.name
            for k in a.values:
                assert torch.equal(a.values[k], a.values[k][:1].expand(7))  # shared
                assert torch.equal(a.values[k][:3], b.values[k])
        # augmenting each batch alone == augmenting them together
        both = dsa_augment(torch.cat([real, syn]), seed=seed, mode=mode)
        alone = torch.cat([dsa_augment(real, seed=seed, mode=mode),
                           dsa_augment(syn, seed=seed, mode=mode)])
        torch.testing.assert_close(both, alone, rtol=1e-6, atol=1e-6)


def test_siamese_flip_same_indices():
    real, syn = _x(16, seed=1), _x(16, seed=2)
    for ps in (False, True):
        seen = set()
        for seed in range(6):
            yr = dsa_augment(real, seed=seed, strategy="flip", per_sample=ps)
            ys = dsa_augment(syn, seed=seed, strategy="flip", per_sample=ps)
            fr = [torch.equal(yr[i], real[i].flip(-1)) for i in range(16)]
            fs = [torch.equal(ys[i], syn[i].flip(-1)) for i in range(16)]
            assert fr == fs
            for i in range(16):  # every sample is either flipped or untouched
                assert fr[i] or torch.equal(yr[i], real[i])
            seen.add(any(fr))
            if not ps:
                assert len(set(fr)) == 1  # one decision for the batch
            else:
                assert len(set(fr)) == 2  # 16 samples: both outcomes (fixed seeds)
        if not ps:
            assert seen == {True, False}


def test_siamese_per_sample_swap():
    """per_sample=True: output i depends only on input i and the seed (same N)."""
    a, b = _x(6, seed=1), _x(6, seed=2)
    mix = a.clone()
    mix[2], mix[4] = b[2], b[4]
    for seed in range(8):
        kw = dict(seed=seed, mode="all", per_sample=True)
        ya, yb, ym = dsa_augment(a, **kw), dsa_augment(b, **kw), dsa_augment(mix, **kw)
        torch.testing.assert_close(ym[[0, 1, 3, 5]], ya[[0, 1, 3, 5]], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ym[[2, 4]], yb[[2, 4]], rtol=1e-6, atol=1e-6)


def test_siamese_crop_same_shifts():
    real, syn = _x(5, seed=1), _x(5, seed=2)
    for seed in range(5):
        t = dsa_params(seed, real.shape, strategy="crop", per_sample=True)
        v = _op(t, "crop")
        for x in (real, syn):
            y = dsa_augment(x, seed=seed, strategy="crop", per_sample=True)
            for i in range(5):
                dh, dw = int(v["shift_h"][i]), int(v["shift_w"][i])
                ref = F.pad(x[i], (4, 4, 4, 4))[:, 4 + dh:4 + dh + 8, 4 + dw:4 + dw + 9]
                assert torch.equal(y[i], ref)


# ---------------------------------------------------------------- parameter distributions

def test_parameter_ranges():
    n, h, w = 4000, 32, 20
    t = dsa_params(0, (n, 3, h, w), mode="all", per_sample=True)
    v = {op.name: op.values for op in t.ops}
    assert [op.name for op in t.ops] == ["brightness", "saturation", "contrast", "crop",
                                         "cutout", "flip", "scale", "rotate"]
    b = v["brightness"]["shift"]
    assert -0.5 <= b.min() < -0.49 and 0.49 < b.max() < 0.5
    s = v["saturation"]["factor"]
    assert 0 <= s.min() < 0.01 and 1.99 < s.max() < 2.0
    c = v["contrast"]["factor"]
    assert 0.5 <= c.min() < 0.51 and 1.49 < c.max() < 1.5
    # crop: int(32*0.125+0.5) = 4, int(20*0.125+0.5) = 3; every shift in [-b, b] occurs
    assert set(v["crop"]["shift_h"].tolist()) == set(range(-4, 5))
    assert set(v["crop"]["shift_w"].tolist()) == set(range(-3, 4))
    # cutout: sizes 16 (even: centre in [0, 32]) and 10 (even: [0, 20])
    assert set(v["cutout"]["size_h"].tolist()) == {16} and set(v["cutout"]["size_w"].tolist()) == {10}
    assert set(v["cutout"]["center_h"].tolist()) == set(range(0, 33))
    assert set(v["cutout"]["center_w"].tolist()) == set(range(0, 21))
    assert abs(v["flip"]["flip"].double().mean().item() - 0.5) < 0.04
    for k in ("sx", "sy"):
        assert 1 / 1.2 <= v["scale"][k].min() < 1 / 1.2 + 0.01 and 1.19 < v["scale"][k].max() < 1.2
    deg = v["rotate"]["angle"] * 180 / math.pi
    assert -15 <= deg.min() < -14.9 and 14.9 < deg.max() < 15
    # odd cutout size: centre in [0, H - 1]
    t = dsa_params(1, (2000, 1, 7, 7), strategy="cutout", per_sample=True)
    vc = _op(t, "cutout")
    assert set(vc["size_h"].tolist()) == {4}  # int(3.5 + 0.5)
    t = dsa_params(1, (2000, 1, 5, 5), strategy="cutout", per_sample=True)
    vc = _op(t, "cutout")
    assert set(vc["size_h"].tolist()) == {3} and set(vc["center_h"].tolist()) == set(range(5))


def test_single_mode_group_choice_uniform():
    counts = {g: 0 for g in DSA_STRATEGIES}
    for s in range(600):
        (g,) = dsa_params(s, (1, 1, 4, 4)).groups
        counts[g] += 1
    assert all(70 < c < 130 for c in counts.values()), counts


def test_custom_params():
    p = DSAParams(prob_flip=1.0, ratio_crop_pad=0.0)
    x = _x()
    assert torch.equal(dsa_augment(x, seed=3, strategy="flip", params=p), x.flip(-1))
    assert torch.equal(dsa_augment(x, seed=3, strategy="crop", params=p, per_sample=True), x)
    assert torch.equal(dsa_augment(x, seed=3, strategy="flip", params=DSAParams(prob_flip=0.0)), x)


# ---------------------------------------------------------------- each op vs an independent expectation

def test_flip_op():
    x = _x(4)
    for seed in range(4):
        t = dsa_params(seed, x.shape, strategy="flip", per_sample=True)
        f = _op(t, "flip")["flip"]
        y = dsa_apply(x, t)
        ref = x.clone()
        ref[f] = torch.flip(x[f], dims=[3])
        assert torch.equal(y, ref)


def test_crop_op():
    x = _x(3, 2, 6, 7)
    zero = torch.zeros(3, dtype=torch.int64)
    assert torch.equal(dsa_apply(x, _one(x, "crop", shift_h=zero, shift_w=zero)), x)
    sh, sw = torch.tensor([1, -2, 6]), torch.tensor([-3, 0, 2])
    y = dsa_apply(x, _one(x, "crop", shift_h=sh, shift_w=sw))
    pad = F.pad(x, (8, 8, 8, 8))
    for i in range(3):
        a, b = 8 + int(sh[i]), 8 + int(sw[i])
        assert torch.equal(y[i], pad[i, :, a:a + 6, b:b + 7])
    assert (y[2] == 0).all()  # shifted by the full height: nothing left


def test_cutout_op():
    x = _x(3, 2, 7, 6).abs() + 1  # no zeros of its own
    ch, cw = torch.tensor([0, 3, 6]), torch.tensor([5, 0, 3])
    sh, sw = torch.tensor([4, 3, 1]), torch.tensor([2, 5, 6])
    y = dsa_apply(x, _one(x, "cutout", center_h=ch, center_w=cw, size_h=sh, size_w=sw))
    for i in range(3):
        ref = x[i].clone()
        r0, c0 = int(ch[i]) - int(sh[i]) // 2, int(cw[i]) - int(sw[i]) // 2
        ref[:, max(r0, 0):max(r0 + int(sh[i]), 0), max(c0, 0):max(c0 + int(sw[i]), 0)] = 0
        assert torch.equal(y[i], ref)
    # drawn: each box has the default size (int(7*0.5+0.5)=4 x int(6*0.5+0.5)=3) clipped
    x = _x(50, 1, 7, 6).abs() + 1
    t = dsa_params(0, x.shape, strategy="cutout", per_sample=True)
    v = _op(t, "cutout")
    zeros = (dsa_apply(x, t) == 0)[:, 0]
    for i in range(50):
        r0, c0 = int(v["center_h"][i]) - 2, int(v["center_w"][i]) - 1
        rows = [r for r in range(r0, r0 + 4) if 0 <= r < 7]
        cols = [c for c in range(c0, c0 + 3) if 0 <= c < 6]
        assert int(zeros[i].sum()) == len(rows) * len(cols)
        for r in rows:
            for c in cols:
                assert zeros[i, r, c]


def test_color_ops():
    x = _x(4, 3, 5, 6)
    t = dsa_params(0, x.shape, strategy="color", per_sample=True)
    assert t.groups == ("color",) and [o.name for o in t.ops] == ["brightness", "saturation",
                                                                   "contrast"]
    bv = _op(t, "brightness")["shift"].float().view(-1, 1, 1, 1)
    assert torch.equal(dsa_apply(x, _one(x, "brightness", **_op(t, "brightness"))), x + bv)
    sv = _op(t, "saturation")["factor"].float().view(-1, 1, 1, 1)
    m = x.mean(1, keepdim=True)
    torch.testing.assert_close(dsa_apply(x, _one(x, "saturation", **_op(t, "saturation"))),
                               m + (x - m) * sv)
    cv = _op(t, "contrast")["factor"].float().view(-1, 1, 1, 1)
    m = x.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(dsa_apply(x, _one(x, "contrast", **_op(t, "contrast"))),
                               m + (x - m) * cv)
    # saturation factor 1 / contrast factor 1 are identities; saturation 0 gives grey
    ones = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(dsa_apply(x, _one(x, "saturation", factor=ones)), x)
    torch.testing.assert_close(dsa_apply(x, _one(x, "contrast", factor=ones)), x)
    grey = dsa_apply(x, _one(x, "saturation", factor=0 * ones))
    torch.testing.assert_close(grey, x.mean(1, keepdim=True).expand_as(x))
    # the group = the three in sequence
    y = dsa_apply(x, t)
    z = x + bv
    z = (z - z.mean(1, keepdim=True)) * sv + z.mean(1, keepdim=True)
    z = (z - z.mean((1, 2, 3), keepdim=True)) * cv + z.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(y, z)


@pytest.mark.parametrize("align_corners", [False, True])
def test_geometric_identities(align_corners):
    x = _x(3, 2, 6, 6, dtype=torch.float64)
    one, zero = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)

    def run(name, **v):
        t = _one(x, name, **v)
        return dsa_apply(x, DSATransform(t.groups, t.ops, 3, 6, 6, align_corners))

    torch.testing.assert_close(run("scale", sx=one, sy=one), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(run("rotate", angle=zero), x, rtol=0, atol=1e-6)
    # sx = -1 mirrors the normalised x axis: a horizontal flip; sy = -1 a vertical one
    torch.testing.assert_close(run("scale", sx=-one, sy=one), x.flip(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(run("scale", sx=one, sy=-one), x.flip(2), rtol=0, atol=1e-6)
    # rotation by +90 degrees (anticlockwise) on a square image = rot90, by 180 = both flips
    torch.testing.assert_close(run("rotate", angle=one * math.pi / 2),
                               torch.rot90(x, 1, dims=(2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(run("rotate", angle=one * math.pi), x.flip(2, 3), rtol=0,
                               atol=1e-6)


def test_geometric_vs_grid_sample_float32():
    x = _x(4, 3, 8, 10)
    for name in ("scale", "rotate"):
        t = dsa_params(2, x.shape, strategy=name, per_sample=True)
        v = _op(t, name)
        if name == "scale":
            theta = torch.zeros(4, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1] = v["sx"].float(), v["sy"].float()
        else:
            a = v["angle"]
            theta = torch.stack([torch.stack([a.cos(), -a.sin(), 0 * a], 1),
                                 torch.stack([a.sin(), a.cos(), 0 * a], 1)], 1).float()
        ref = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False),
                            align_corners=False)
        torch.testing.assert_close(dsa_apply(x, t), ref)
        assert not torch.allclose(dsa_apply(x, t), x)


def test_all_mode_applies_groups_in_order():
    x = _x(3)
    t = dsa_params(4, x.shape, strategy="flip_crop_color", mode="all", per_sample=True)
    assert t.groups == ("flip", "crop", "color")
    assert [o.name for o in t.ops] == ["flip", "crop", "brightness", "saturation", "contrast"]
    y = x
    for op in t.ops:  # the per-op torch path (the fused op rounds the colour maps differently)
        y = dsa_apply(y, DSATransform((op.name,), (op,), 3, 8, 9), fused=False)
    # this order is not the fused op's canonical one: dsa_apply falls back to the torch path
    torch.testing.assert_close(dsa_apply(x, t), y, rtol=0, atol=0)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("group", DSA_STRATEGIES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck(group, per_sample):
    x = _x(2, 2, 5, 6, dtype=torch.float64).requires_grad_()
    kw = dict(strategy=group, mode="all", per_sample=per_sample)
    assert torch.autograd.gradcheck(lambda x: dsa_augment(x, seed=3, **kw), (x,))


def test_gradgradcheck_all():
    x = _x(2, 2, 4, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x: dsa_augment(x, seed=1, mode="all", per_sample=True), (x,))


def test_gradient_masks():
    x = _x(2, 1, 6, 6).requires_grad_()
    t = dsa_params(0, x.shape, strategy="cutout", per_sample=True)
    dsa_apply(x, t).sum().backward()
    zeros = dsa_apply(x.detach().abs() + 1, t) == 0
    assert torch.equal(x.grad == 0, zeros)


def test_all_ops_covered():
    x = _x(2)
    names = [o.name for o in dsa_params(0, x.shape, mode="all").ops]
    assert sorted(names) == sorted(DSA_OPS)


def test_default_strategy_drops_flip_for_digits():
    from pydistill_ext.augment import DEFAULT_STRATEGY, default_strategy
    assert "flip" not in default_strategy("mnist").split("_")
    assert "flip" not in default_strategy("digits").split("_")
    assert default_strategy("fashion_mnist") == DEFAULT_STRATEGY
    assert default_strategy("cifar10") == DEFAULT_STRATEGY
