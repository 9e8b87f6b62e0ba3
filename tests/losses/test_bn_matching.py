"""BNStatMatcher / BNStatCommittee against literal transcriptions of the anchors' hooks
(REFERENCE.md 4.1): DeepInversion/SRe2L ``BNFeatureHook`` and ZeroQ's per-sample form."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pydistill_ext as pde
from pydistill_ext.losses import BNStatCommittee, BNStatMatcher


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)  # test-local: only to build the weights
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5))
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.to(dtype).eval()


def _anchor_hook_loss(net, x, first_bn_multiplier=10.0, var_weight=1.0, squared=False):
    """DeepInversion's DeepInversionFeatureHook, written out: mean over (N, H, W), biased var
    via permute/contiguous/view, non-squared L2 norms, s = [first, 1, 1, ...]."""
    feats = []

    def hook(module, inputs, _out):
        inp = inputs[0]
        c = inp.shape[1]
        if inp.dim() == 4:
            mean = inp.mean([0, 2, 3])
            var = inp.permute(1, 0, 2, 3).contiguous().view(c, -1).var(1, unbiased=False)
        else:
            mean, var = inp.mean(0), inp.var(0, unbiased=False)
        if squared:
            r = (module.running_mean - mean).pow(2).sum() + var_weight * (module.running_var - var).pow(2).sum()
        else:
            r = torch.norm(module.running_var.data - var, 2) * var_weight + \
                torch.norm(module.running_mean.data - mean, 2)
        feats.append(r)

    hs = [m.register_forward_hook(hook) for m in net.modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    out = net(x)
    for h in hs:
        h.remove()
    scales = [first_bn_multiplier] + [1.0] * (len(feats) - 1)
    return out, sum(s * f for s, f in zip(scales, feats))


def _anchor_zeroq_loss(net, x):
    """ZeroQ's distill_data: per-sample mean over H, W; std = sqrt(unbiased var + 1e-6);
    own_loss(A, B) = ||A - B||^2 / B.size(0)."""
    total = 0.0
    feats = []
    hs = [m.register_forward_hook(lambda m, i, o: feats.append((m, i[0])))
          for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net(x)
    for h in hs:
        h.remove()
    for bn, inp in feats:
        flat = inp.reshape(inp.shape[0], inp.shape[1], -1)
        tmp_mean = flat.mean(2)
        tmp_std = torch.sqrt(flat.var(2) + 1e-6)
        bn_std = torch.sqrt(bn.running_var + 1e-6)
        total = total + (bn.running_mean - tmp_mean).norm() ** 2 / tmp_mean.size(0) \
            + (bn_std - tmp_std).norm() ** 2 / tmp_std.size(0)
    return total


def _x(seed=0, n=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g, dtype=dtype) * 1.5 + 0.3).requires_grad_(True)


@pytest.mark.parametrize("first,var_weight", [(10.0, 1.0), (1.0, 11.0), (0.0, 2.0)])
def test_matches_deepinversion_hook(first, var_weight):
    net = _net()
    x = _x()
    _, want = _anchor_hook_loss(net, x, first, var_weight)
    gw, = torch.autograd.grad(want, x)
    with BNStatMatcher(net, first_bn_multiplier=first, var_weight=var_weight) as bn:
        net(x)
        got = bn.loss
        assert len(bn.layers) == 3
    gg, = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)


def test_mse_variant_and_float32():
    net = _net()
    x = _x()
    _, want = _anchor_hook_loss(net, x, 10.0, 1.0, squared=True)
    with BNStatMatcher(net, variant="mse") as bn:
        net(x)
        torch.testing.assert_close(bn.loss, want, rtol=1e-12, atol=1e-12)
    net32 = _net(dtype=torch.float32)
    x32 = x.detach().float().requires_grad_(True)
    with BNStatMatcher(net32) as bn:
        net32(x32)
        got = bn.loss
    _, want = _anchor_hook_loss(_net(), x, 10.0, 1.0)
    # float32 activations vs the float64 anchor: relative 1e-5
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_matches_zeroq():
    net = _net()
    x = _x(n=4)
    want = _anchor_zeroq_loss(net, x)
    gw, = torch.autograd.grad(want, x)
    with BNStatMatcher(net, variant="zeroq", layers=[n for n, m in net.named_modules()
                                                       if isinstance(m, nn.BatchNorm2d)]) as bn:
        assert bn.scales == [1.0, 1.0]
        net(x)
        got = bn.loss
    gg, = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)


def test_hooks_removed_and_loss_per_forward():
    net = _net()
    before = [len(m._forward_pre_hooks) for m in net.modules()]
    bn = BNStatMatcher(net)
    x1, x2 = _x(1), _x(2)
    net(x1)
    l1 = bn.loss.item()
    net(x2)
    l2 = bn.loss.item()
    assert l1 != l2  # the loss is that of the last forward, not accumulated
    _, want2 = _anchor_hook_loss(net, x2)
    assert abs(l2 - want2.item()) < 1e-10
    bn.remove()
    bn.remove()  # idempotent
    assert [len(m._forward_pre_hooks) for m in net.modules()] == before


def test_ema_straight_through():
    net = _net()
    x1, x2 = _x(1), _x(2)
    m = 0.8
    with BNStatMatcher(net, ema_momentum=m, layers=["1"], first_bn_multiplier=1.0) as bn:
        net(x1)
        net(x2)
        got = bn.loss
        g_got, = torch.autograd.grad(got, x2)
    layer = net[1]
    h1 = net[0](x1).detach()
    h2 = net[0](x2)
    mu1, var1 = h1.mean([0, 2, 3]), h1.var([0, 2, 3], unbiased=False)
    mu2, var2 = h2.mean([0, 2, 3]), h2.var([0, 2, 3], unbiased=False)
    ema_mu = m * mu1 + (1 - m) * mu2.detach()
    ema_var = m * var1 + (1 - m) * var2.detach()
    want = torch.norm(layer.running_mean - (ema_mu + mu2 - mu2.detach())) + \
        torch.norm(layer.running_var - (ema_var + var2 - var2.detach()))
    g_want, = torch.autograd.grad(want, x2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_committee_weights():
    a, b = _net(0), _net(5)
    x = _x()
    _, la = _anchor_hook_loss(a, x)
    _, lb = _anchor_hook_loss(b, x)
    with BNStatCommittee([a, b], priors=[56.4, 42.3], temperature=5.0) as c:
        a(x)
        b(x)
        w = torch.softmax(torch.tensor([56.4, 42.3], dtype=torch.float64) / 5.0, 0)
        torch.testing.assert_close(c.loss, w[0] * la + w[1] * lb, rtol=1e-12, atol=1e-12)
    with BNStatCommittee([a, b], weights=[1.0, 0.0]) as c:
        a(x)
        b(x)
        torch.testing.assert_close(c.loss, la, rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="no BatchNorm"):
        BNStatMatcher(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(TypeError, match="nn.Module"):
        BNStatMatcher("model")
    net = _net()
    with pytest.raises(ValueError, match="variant"):
        BNStatMatcher(net, variant="l1")
    with pytest.raises(ValueError, match="not a BatchNorm layer"):
        BNStatMatcher(net, layers=["0"])
    with pytest.raises(ValueError, match="first_bn_multiplier"):
        BNStatMatcher(net, first_bn_multiplier=-1.0)
    with pytest.raises(ValueError, match="ema_momentum"):
        BNStatMatcher(net, ema_momentum=1.0)
    bn = BNStatMatcher(net)
    with pytest.raises(RuntimeError, match="run a forward pass"):
        bn.loss
    net.train()
    before = net[1].running_mean.clone()
    with pytest.raises(RuntimeError, match="training mode.*model.eval"):
        net(_x())
    assert torch.equal(net[1].running_mean, before)  # raised before BN updated its buffers
    bn.remove()
    nostats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats"):
        BNStatMatcher(nostats)
    with pytest.raises(ValueError, match="weights has 1 entries for 2 models"):
        BNStatCommittee([_net(), _net()], weights=[1.0])


def test_exported():
    assert pde.BNStatMatcher is BNStatMatcher and pde.BNStatCommittee is BNStatCommittee
