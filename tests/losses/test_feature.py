"""Feature-level KD losses (pydistill_ext.losses.feature) against the float64 loop oracles in
python/reference/feature_losses.py, plus gradcheck, torch.compile(fullgraph=True), errors and
one small training run."""
import pytest
import torch
import torch.nn.functional as F

import pydistill_ext as pde
from pydistill_ext.losses import feature as fl
from reference import feature_losses as ref

# float32 math against the float64 oracle: relative error of a few float32 ulps on O(1) sums.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
DTYPES = [torch.float64, torch.float32]


def _randn(shape, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _close(got, want, dtype, what="value", floor=1e-12):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(want.abs().max().item(), floor)
    err = (got - want).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def _compare(fn, oracle, inputs, dtype):
    """Value and gradients w.r.t. every input of fn(*inputs in dtype) vs oracle(*float64)."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    rs = [x.detach().double().requires_grad_() for x in xs]  # same rounded values
    out, want = fn(*xs), oracle(*rs)
    _close(out, want, dtype)
    out.backward()
    want.backward()
    for i, (x, r) in enumerate(zip(xs, rs)):
        assert x.grad is not None and r.grad is not None
        _close(x.grad, r.grad, dtype, f"grad of input {i}")


def test_public_names_are_reexported():
    for name in fl.__all__:
        assert getattr(pde.losses, name) is getattr(fl, name)
        assert name in pde.losses.__all__


# ---------------------------------------------------------------------------- FitNets


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("half", [True, False])
def test_hint_loss_matches_oracle(dtype, reduction, half):
    r, u = _randn((3, 4, 5, 6), 0), _randn((3, 4, 5, 6), 1)
    _compare(lambda a, b: fl.hint_loss(a, b, reduction, half),
             lambda a, b: ref.hint_loss(a, b, reduction, half), [r, u], dtype)


@pytest.mark.parametrize("kernel_size,bn,relu", [(1, False, False), (3, False, False),
                                                 (1, True, True), (3, True, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hint_module_matches_oracle(kernel_size, bn, relu, dtype):
    torch.manual_seed(0)
    mod = fl.HintLoss(3, 5, kernel_size, batch_norm=bn, relu=relu).to(dtype)
    if bn:  # non-trivial affine parameters
        with torch.no_grad():
            mod.regressor[1].weight.copy_(_randn((5,), 7, dtype) + 1.5)
            mod.regressor[1].bias.copy_(_randn((5,), 8, dtype))
    conv = mod.regressor[0]
    f_s, f_t = _randn((4, 3, 5, 6), 2), _randn((4, 5, 5, 6), 3)

    def oracle(a, b, w, bias):
        bnp = (mod.regressor[1].weight, mod.regressor[1].bias, mod.regressor[1].eps) if bn else None
        return ref.hint_module_loss(a, b, w, bias, bnp, relu)

    xs = [f_s.to(dtype).requires_grad_(), f_t.to(dtype).requires_grad_()]
    rs = [x.detach().double().requires_grad_() for x in xs]
    w = conv.weight.detach().double().requires_grad_()
    b = conv.bias.detach().double().requires_grad_()
    out, want = mod(*xs), oracle(*rs, w, b)
    _close(out, want, dtype)
    out.backward()
    want.backward()
    _close(xs[0].grad, rs[0].grad, dtype, "grad f_s")
    _close(xs[1].grad, rs[1].grad, dtype, "grad f_t")
    _close(conv.weight.grad, w.grad, dtype, "grad weight")
    # with BN after the conv the bias gradient is 0 analytically: compare on the weight's scale
    _close(conv.bias.grad, b.grad, dtype, "grad bias",
           floor=w.grad.abs().max().item() if bn else 1e-12)


def test_hint_spatial_mismatch_errors_or_pools():
    f_s, f_t = _randn((2, 3, 8, 8), 0), _randn((2, 4, 4, 4), 1)
    with pytest.raises(ValueError, match=r"f_s is \(8, 8\) spatially but f_t is \(4, 4\)"):
        fl.HintLoss(3, 4).double()(f_s, f_t)
    mod = fl.HintLoss(3, 4, spatial="adaptive_pool").double()
    got = mod(f_s, f_t)
    r = mod.regressor(f_s)
    pooled = r.reshape(2, 4, 4, 2, 4, 2).mean((3, 5))  # 2×2 block means
    _close(got, ref.hint_loss(pooled, f_t), torch.float64)


def test_hint_shape_errors_name_the_argument():
    mod = fl.HintLoss(3, 4)
    with pytest.raises(ValueError, match="f_s has 5 channels"):
        mod(torch.randn(2, 5, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="f_t has 6 channels"):
        mod(torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match="f_s must be 4-D"):
        mod(torch.randn(2, 3, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="f_s has batch size 2 but f_t has 3"):
        mod(torch.randn(2, 3, 4, 4), torch.randn(3, 4, 4, 4))
    with pytest.raises(ValueError, match="regressed has shape"):
        fl.hint_loss(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 5))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        fl.HintLoss(3, 4, kernel_size=2)
    with pytest.raises(ValueError, match="reduction"):
        fl.HintLoss(3, 4, reduction="avg")


# ------------------------------------------------------------------ attention transfer


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("p", [2.0, 1.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_transfer_matches_oracle(mode, p, dtype):
    # two pairs, channels differ within a pair (student 3 / 6, teacher 5 / 2)
    ins = [_randn((3, 3, 4, 5), 0), _randn((3, 6, 2, 3), 1),
           _randn((3, 5, 4, 5), 2), _randn((3, 2, 2, 3), 3)]
    _compare(lambda a, b, c, d: fl.attention_transfer_loss([a, b], [c, d], p=p, mode=mode),
             lambda a, b, c, d: ref.attention_transfer_loss([a, b], [c, d], p=p, mode=mode),
             ins, dtype)


def test_attention_transfer_code_mode_equals_the_authors_channel_mean_formula():
    """szagoruyko/attention-transfer: at(x) = l2_normalize(x.pow(2).mean(1).view(B, -1)),
    at_loss = (at(x) - at(y)).pow(2).mean(); the channel mean vs sum cancels."""
    f_s, f_t = _randn((4, 3, 5, 5), 0), _randn((4, 7, 5, 5), 1)

    def at(x):
        return F.normalize(x.pow(2).mean(1).view(x.shape[0], -1))

    want = (at(f_s) - at(f_t)).pow(2).mean()
    _close(fl.attention_transfer_loss(f_s, f_t), want, torch.float64)


def test_attention_transfer_module_weights_code_beta_paper_half_beta():
    f_s, f_t = _randn((4, 3, 5, 5), 0), _randn((4, 7, 5, 5), 1)
    code = fl.AttentionTransferLoss(beta=1e3)(f_s, f_t)
    paper = fl.AttentionTransferLoss(beta=10.0, mode="paper")(f_s, f_t)
    _close(code, 1e3 * ref.attention_transfer_loss(f_s, f_t, mode="code"), torch.float64)
    _close(paper, 5.0 * ref.attention_transfer_loss(f_s, f_t, mode="paper"), torch.float64)


def test_attention_transfer_equal_maps_zero_loss_finite_grad():
    f = _randn((3, 4, 5, 5), 0)
    g = (f * 2.0).requires_grad_()  # same attention map (scale cancels)
    for mode in ("code", "paper"):
        g.grad = None
        loss = fl.attention_transfer_loss(g, f, mode=mode)
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
        loss.backward()
        assert torch.isfinite(g.grad).all()


def test_attention_transfer_errors_name_the_argument():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match="f_s has 2 feature maps but f_t has 1"):
        fl.attention_transfer_loss([a, a], [b])
    with pytest.raises(ValueError, match=r"f_s\[1\] is \(4, 4\) spatially but f_t\[1\] is \(3, 4\)"):
        fl.attention_transfer_loss([a, a], [b, torch.randn(2, 5, 3, 4)])
    with pytest.raises(ValueError, match="f_t must be 4-D"):
        fl.attention_transfer_loss(a, torch.randn(2, 16))
    with pytest.raises(ValueError, match="mode"):
        fl.attention_transfer_loss(a, b, mode="eq2")


# ----------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_matches_oracle(reduction, dtype):
    # student [N, C, H, W], teacher [N, D] with D = C*H*W: only the flattened width matters
    ins = [_randn((5, 2, 3, 3), 0), _randn((5, 18), 1)]
    _compare(lambda a, b: fl.cosine_feature_loss(a, b, reduction).sum(),
             lambda a, b: ref.cosine_feature_loss(a, b, reduction).sum(), ins, dtype)
    if reduction == "none":
        assert fl.cosine_feature_loss(*ins, reduction="none").shape == (5,)


def test_cosine_aligned_zero_opposite_two_and_zero_vector_finite():
    s = _randn((4, 6), 0)
    assert fl.cosine_feature_loss(s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-12)
    assert fl.cosine_feature_loss(s, -s).item() == pytest.approx(2.0, abs=1e-12)
    z = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    loss = fl.CosineFeatureLoss()(z, s)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_cosine_width_mismatch_errors():
    with pytest.raises(ValueError, match="f_s has 12 features per sample"):
        fl.cosine_feature_loss(torch.randn(3, 12), torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="reduction"):
        fl.cosine_feature_loss(torch.randn(3, 4), torch.randn(3, 4), "batchmean")


# -------------------------------------------------------------------------------- RKD


def _rkd_dist_inputs():
    """The teacher has an outlier sample, so some normalised distances differ from the
    student's by more than the Huber threshold 1 (linear branch) and the rest by less."""
    t = _randn((6, 3, 2, 2), 1)
    t[0] += 6.0
    return _randn((6, 6), 0), t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rkd_distance_matches_oracle(dtype):
    # widths differ (student 6, teacher 3x2x2)
    _compare(fl.rkd_distance_loss, ref.rkd_distance_loss, list(_rkd_dist_inputs()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rkd_angle_matches_oracle(dtype):
    ins = [_randn((5, 4), 2), _randn((5, 7), 3)]
    _compare(fl.rkd_angle_loss, ref.rkd_angle_loss, ins, dtype)


def test_rkd_huber_hits_both_branches():
    """The oracle comparison above is only meaningful if both Huber branches occur."""
    s, t = (x.reshape(6, -1) for x in _rkd_dist_inputs())
    ds, dt = fl._normalised_pdist(s, 1e-12), fl._normalised_pdist(t, 1e-12)
    diff = (ds - dt).abs()
    assert (diff > 1).any() and ((diff < 1) & (diff > 0)).any()
    diff = (fl._angles(_randn((5, 4), 2)) - fl._angles(_randn((5, 7), 3))).abs()
    assert (diff > 1).any() and ((diff < 1) & (diff > 0)).any()


def test_rkd_module_weights_and_invariances():
    s, t = _randn((5, 4), 0), _randn((5, 6), 1)
    got = fl.RKDLoss()(s, t)
    _close(got, ref.rkd_loss(s, t, 25.0, 50.0), torch.float64)
    only_d = fl.RKDLoss(w_dist=2.0, w_angle=0.0)(s, t)
    _close(only_d, 2.0 * ref.rkd_distance_loss(s, t), torch.float64)
    # distances are normalised by their mean, angles by construction: both invariant to a
    # global scale and translation of the student
    moved = 7.5 * s + torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    _close(fl.RKDLoss()(moved, t), got, torch.float64)
    # ... but not to a non-rigid change
    assert abs(fl.RKDLoss()(s * torch.tensor([1.0, 5.0, 1.0, 1.0], dtype=torch.float64), t).item()
               - got.item()) > 1e-3


def test_rkd_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        fl.rkd_distance_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="f_s has batch size 3 but f_t has 4"):
        fl.RKDLoss()(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(TypeError, match="f_t must be a torch.Tensor"):
        fl.rkd_angle_loss(torch.randn(3, 4), [1.0, 2.0])


def test_low_precision_hint_and_attention_transfer():
    r, u = _randn((3, 4, 5, 5), 0).bfloat16(), _randn((3, 4, 5, 5), 1).bfloat16()
    got = fl.hint_loss(r, u)
    assert got.dtype == torch.float32
    want = ref.hint_loss(r.double(), u.double())
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    # the attention maps themselves come back in bfloat16 (8 bits of mantissa)
    f_s, f_t = _randn((3, 4, 5, 5), 2).bfloat16(), _randn((3, 6, 5, 5), 3).bfloat16()
    got = fl.attention_transfer_loss(f_s, f_t, mode="paper")
    want = ref.attention_transfer_loss(f_s.double(), f_t.double(), mode="paper")
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 2e-2 * abs(want.item())


def test_low_precision_inputs_are_computed_in_float32():
    s, t = _randn((6, 8), 0), _randn((6, 8), 1)
    for fn, oracle in ((fl.rkd_distance_loss, ref.rkd_distance_loss),
                       (fl.rkd_angle_loss, ref.rkd_angle_loss),
                       (fl.cosine_feature_loss, ref.cosine_feature_loss)):
        sb, tb = s.bfloat16(), t.bfloat16()
        got = fn(sb, tb)
        assert got.dtype == torch.float32
        want = oracle(sb.double(), tb.double())  # same rounded inputs
        assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


# ---------------------------------------------------------------- gradcheck, compile


def _gc_inputs(*shapes):
    return [_randn(s, i + 10).requires_grad_() for i, s in enumerate(shapes)]


def test_gradcheck_float64():
    a, b = _gc_inputs((2, 3, 3, 3), (2, 4, 3, 3))
    mod = fl.HintLoss(3, 4, 3, batch_norm=True, relu=True).double()
    assert torch.autograd.gradcheck(lambda x, y: mod(x, y), (a, b))
    for mode in ("code", "paper"):
        assert torch.autograd.gradcheck(
            lambda x, y: fl.attention_transfer_loss(x, y, mode=mode), (a, b))
    c, d = _gc_inputs((4, 5), (4, 5))
    assert torch.autograd.gradcheck(lambda x, y: fl.cosine_feature_loss(x, y), (c, d))
    e, f = _gc_inputs((5, 3), (5, 4))
    assert torch.autograd.gradcheck(fl.rkd_distance_loss, (e, f))
    assert torch.autograd.gradcheck(fl.rkd_angle_loss, (e, f))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    f_s, f_t = _randn((3, 4, 5, 5), 0, torch.float32), _randn((3, 6, 5, 5), 1, torch.float32)
    hint = fl.HintLoss(4, 6)
    cases = [
        (lambda a, b: hint(a, b), (f_s, f_t)),
        (lambda a, b: fl.AttentionTransferLoss(mode="paper")([a, a], [b, b]), (f_s, f_t)),
        (fl.attention_transfer_loss, (f_s, f_t)),
        (fl.cosine_feature_loss, (f_s, f_t[:, :4])),
        (lambda a, b: fl.RKDLoss()(a, b), (f_s, f_t)),
    ]
    for fn, args in cases:
        # aot_eager traces forward and backward with fullgraph=True without the (slow on
        # this CPU) C++ code generation of inductor
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        xs = [x.clone().requires_grad_() for x in args]
        ys = [x.clone().requires_grad_() for x in args]
        got, want = compiled(*xs), fn(*ys)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got.backward()
        want.backward()
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ it trains


def test_hint_loss_trains_a_student_conv_to_the_teacher_map():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    with torch.no_grad():
        f_t = teacher(x)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    hint = fl.HintLoss(4, 8, reduction="batchmean")
    opt = torch.optim.Adam(list(student.parameters()) + list(hint.parameters()), lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = hint(student(x), f_t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_attention_and_rkd_train_an_embedding():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 6, 6)
    teacher = torch.nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        f_t = F.relu(teacher(x))
    student = torch.nn.Conv2d(3, 4, 3, padding=1)
    at, rkd = fl.AttentionTransferLoss(), fl.RKDLoss()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)

    def total():
        f_s = F.relu(student(x))
        return at(f_s, f_t), rkd(f_s, f_t)

    with torch.no_grad():
        at0, rkd0 = total()
    for _ in range(60):
        opt.zero_grad()
        a, r = total()
        (a + r).backward()
        opt.step()
    with torch.no_grad():
        at1, rkd1 = total()
    assert at1 < 0.7 * at0 and rkd1 < 0.7 * rkd0, (at0, at1, rkd0, rkd1)
