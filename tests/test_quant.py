"""Post-training quantization (pydistill_ext.quant): round-trip error bounds, BatchNorm folding
equality, calibration ranges, an 8-bit digits teacher that agrees with its float model, and
clear errors."""
import pytest
import torch
from torch import nn

from pydistill_ext.data import load_dataset
from pydistill_ext.methods.squeeze import train_teacher
from pydistill_ext.models import get_model
from pydistill_ext.quant import (ActQuantizer, QuantLayer, asymmetric_qparams,
                                 fake_quantize_asymmetric, fold_batchnorm, fold_conv_bn,
                                 quantize_model, quantize_weight)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise_bn(model, seed=0):
    """Non-trivial BN statistics and affine parameters (a fresh BN folds to the identity)."""
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(digits):
    r = train_teacher(digits, epochs=3, seed=0)
    assert r["test_accuracy"] > 0.8
    return r["net"].eval()


# ---------------------------------------------------------------------------- weights
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_round_trip_bound(bits, per_channel):
    g = _gen(bits)
    w = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64) * \
        torch.logspace(-2, 1, 6, dtype=torch.float64).view(-1, 1, 1, 1)
    w_hat, q, scale = quantize_weight(w, bits, per_channel=per_channel)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int32 and int(q.abs().max()) <= qmax
    s = scale.view(-1, 1, 1, 1) if per_channel else scale
    assert torch.equal(w_hat, q.double() * s)
    err = (w - w_hat).abs()
    assert (err <= s / 2 * (1 + 1e-12)).all()
    # min-max: the largest |w| of each channel (or of the tensor) is a code's end point
    if per_channel:
        top = w.reshape(6, -1).abs().argmax(1)
        assert (q.reshape(6, -1).abs().gather(1, top[:, None]) == qmax).all()
    else:
        assert int(q.abs().max()) == qmax


def test_per_channel_beats_per_tensor_on_uneven_channels():
    g = _gen(1)
    w = torch.randn(8, 16, generator=g) * torch.logspace(-3, 0, 8).view(-1, 1)
    e_pc = (quantize_weight(w, 4, per_channel=True)[0] - w).pow(2).sum()
    e_pt = (quantize_weight(w, 4, per_channel=False)[0] - w).pow(2).sum()
    assert e_pc < 0.5 * e_pt


def test_zero_channel_weight():
    w = torch.zeros(2, 3)
    w[1] = torch.tensor([0.5, -1.0, 0.25])
    w_hat, q, scale = quantize_weight(w, 4)
    assert float(scale[0]) == 1.0 and (q[0] == 0).all() and torch.equal(w_hat[0], w[0])


# ---------------------------------------------------------------------------- activations
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_round_trip_bound(bits):
    lo, hi = -0.7, 2.3
    scale, zp = asymmetric_qparams(lo, hi, bits)
    assert scale == pytest.approx((hi - lo) / (2 ** bits - 1))
    x = torch.linspace(lo, hi, 1001, dtype=torch.float64)
    xq = fake_quantize_asymmetric(x, scale, zp, bits)
    assert float((x - xq).abs().max()) <= scale / 2 + 1e-12
    assert len(torch.unique(xq)) <= 2 ** bits
    assert float(fake_quantize_asymmetric(torch.zeros(1, dtype=torch.float64), scale, zp, bits)) == 0.0
    # outside the range: clamped to the end codes
    out = fake_quantize_asymmetric(torch.tensor([-50.0, 50.0], dtype=torch.float64), scale, zp, bits)
    assert float(out[0]) == pytest.approx(-zp * scale) and float(out[1]) == pytest.approx((2 ** bits - 1 - zp) * scale)


def test_range_always_contains_zero():
    scale, zp = asymmetric_qparams(0.5, 3.0, 8)  # positive-only: lo becomes 0
    assert zp == 0 and scale == pytest.approx(3.0 / 255)
    scale, zp = asymmetric_qparams(-4.0, -1.0, 8)
    assert zp == 255


def test_percentile_and_mse_clip_inside_minmax():
    g = _gen(2)
    x = torch.randn(20000, generator=g).abs()
    x[0] = 40.0  # one outlier
    ranges = {}
    for clip in ("minmax", "percentile", "mse"):
        q = ActQuantizer(4, clip, percentile=99.9)
        q(x.view(100, 200))
        q.freeze()
        ranges[clip] = (q.lo, q.hi)
        err = float((q(x) - x).pow(2).mean())
        ranges[clip + "_err"] = err
    assert ranges["minmax"] == (0.0, pytest.approx(40.0))
    assert ranges["percentile"][1] < 5.0 and ranges["mse"][1] < 40.0
    assert ranges["percentile_err"] < ranges["minmax_err"] and ranges["mse_err"] < ranges["minmax_err"]


# ---------------------------------------------------------------------------- folding
def test_fold_conv_bn_equals_conv_then_bn():
    g = _gen(3)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True).double()
    bn = _randomise_bn(nn.Sequential(nn.BatchNorm2d(5)).double(), seed=4)[0]
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    folded = fold_conv_bn(conv, bn)
    torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
    conv_nb = nn.Conv2d(3, 5, 3, bias=False).double()
    torch.testing.assert_close(fold_conv_bn(conv_nb, bn)(x), bn(conv_nb(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["convnet-bn", "resnet10"])
def test_fold_batchnorm_model(name):
    net = _randomise_bn(get_model(name, 3, 10, (16, 16), seed=0).double(), seed=5)
    x = torch.randn(3, 3, 16, 16, generator=_gen(6), dtype=torch.float64)
    folded = fold_batchnorm(net)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-10, atol=1e-10)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert n_bn > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # original untouched


def test_bn_after_a_sum_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(2, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x) + self.b(x))

    net = _randomise_bn(Net().double(), seed=7)
    folded = fold_batchnorm(net)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 2, 3, 3, generator=_gen(8), dtype=torch.float64)
    torch.testing.assert_close(folded(x), net(x))


# ---------------------------------------------------------------------------- the model
def test_eight_bit_teacher_matches_float(teacher, digits):
    cal = digits.train_images[:128]
    x = digits.test_images
    with torch.no_grad():
        ref = teacher(x)
        q8 = quantize_model(teacher, cal, weight_bits=8, act_bits=8)(x)
        q16 = quantize_model(teacher, cal, weight_bits=16, act_bits=16)(x)
        q3 = quantize_model(teacher, cal, weight_bits=3, act_bits=3)(x)
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert rel(q8) < 0.05
    assert rel(q16) < rel(q8) / 20
    assert rel(q3) > rel(q8)
    agree = float((q8.argmax(1) == ref.argmax(1)).float().mean())
    assert agree >= 0.97


def test_quantized_structure_and_calibrated_ranges(teacher, digits):
    cal = digits.train_images[:64]
    q = quantize_model(teacher, cal, weight_bits=4, act_bits=4)
    layers = [m for m in q.modules() if isinstance(m, QuantLayer)]
    assert len(layers) == 4 and q.quant_config["act_bits"] == 4
    assert layers[0].act is None  # the network input stays float (ZeroQ)
    assert all(l.act is not None for l in layers[1:])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    # the weights used are the dequantized codes
    for l in layers:
        s = l.weight_scale.view((-1,) + (1,) * (l.layer.weight.dim() - 1))
        torch.testing.assert_close(l.layer.weight, l.weight_int.float() * s, rtol=1e-6, atol=0)
        assert int(l.weight_int.abs().max()) <= 7
    # min-max ranges are the observed extremes of each layer's input in the folded,
    # weight-quantized model with float activations
    seen = {}
    for l in layers[1:]:
        l.act.observing = True  # temporarily: pass-through
    hooks = [l.register_forward_pre_hook(lambda m, i, k=k: seen.__setitem__(k, i[0]))
             for k, l in enumerate(layers)]
    with torch.no_grad():
        q(cal)
    for h in hooks:
        h.remove()
    for k, l in enumerate(layers[1:], 1):
        assert l.act.hi == pytest.approx(max(float(seen[k].max()), 0.0), rel=1e-6)
        assert l.act.lo == pytest.approx(min(float(seen[k].min()), 0.0), abs=1e-6)
        l.act.observing = False
    # a quantized input takes at most 2^4 values
    got = {}
    h = layers[2].layer.register_forward_pre_hook(lambda m, i: got.setdefault("x", i[0]))
    with torch.no_grad():
        q(digits.test_images[:50])
    h.remove()
    assert len(torch.unique(got["x"])) <= 16
    # quantize_input=True: the first layer's input is quantized too
    q_in = quantize_model(teacher, cal, weight_bits=8, act_bits=8, quantize_input=True)
    assert [m for m in q_in.modules() if isinstance(m, QuantLayer)][0].act is not None


def test_original_model_untouched_and_batches_equal_tensor(teacher, digits):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cal = digits.train_images[:40]
    a = quantize_model(teacher, cal, weight_bits=4, act_bits=4, batch_size=7)
    b = quantize_model(teacher, [cal[:13], cal[13:]], weight_bits=4, act_bits=4)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = digits.test_images[:20]
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_weight_only_equals_manual(teacher, digits):
    q = quantize_model(teacher, digits.train_images[:8], weight_bits=4, act_bits=None)
    folded = fold_batchnorm(teacher)
    for m in folded.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.copy_(quantize_weight(m.weight, 4)[0])
    x = digits.test_images[:30]
    with torch.no_grad():
        torch.testing.assert_close(q(x), folded(x))


def test_flattened_input_counts_as_the_image():
    net = get_model("mlp", 1, 10, (8, 8), seed=0).eval()
    x = torch.randn(16, 1, 8, 8, generator=_gen(9))
    q = quantize_model(net, x)
    layers = [m for m in q.modules() if isinstance(m, QuantLayer)]
    assert len(layers) >= 2 and layers[0].act is None and all(l.act is not None for l in layers[1:])


def test_no_fold_keeps_bn(teacher, digits):
    q = quantize_model(teacher, digits.train_images[:8], fold_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in q.modules())


@pytest.mark.parametrize("kwargs,err,match", [
    ({"weight_bits": 1}, ValueError, "weight_bits"),
    ({"weight_bits": 17}, ValueError, "weight_bits"),
    ({"act_bits": 0}, ValueError, "act_bits"),
    ({"act_bits": 8.0}, ValueError, "act_bits"),
    ({"weight_bits": True}, ValueError, "weight_bits"),
    ({"act_clip": "kl"}, ValueError, "act_clip"),
    ({"percentile": 30.0, "act_clip": "percentile"}, ValueError, "percentile"),
    ({"batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_arguments(teacher, digits, kwargs, err, match):
    with pytest.raises(err, match=match):
        quantize_model(teacher, digits.train_images[:4], **kwargs)


def test_bad_calibration(teacher, digits):
    with pytest.raises(ValueError, match="empty"):
        quantize_model(teacher, digits.train_images[:0])
    with pytest.raises(ValueError, match="empty"):
        quantize_model(teacher, [])
    bad = digits.train_images[:4].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(teacher, bad)
    with pytest.raises(TypeError, match="floating"):
        quantize_model(teacher, torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="tensor"):
        quantize_model(teacher, "images")
    with pytest.raises(ValueError, match="no Conv/Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.ones(2, 2), 1)
