"""GroupedConvNet: K ConvNets as one grouped-convolution network equal K separate ones."""
import pytest
import torch
import torch.nn.functional as F

from pydistill_ext.methods.trajectory import FlatModel
from pydistill_ext.methods.trajectory.ensemble import GroupedConvNet, grouped_supported
from pydistill_ext.models.convnet import ConvNet


def _experts(k, **arch):
    nets = [ConvNet(**arch).double() for _ in range(k)]
    fm = FlatModel(nets[0])
    theta = torch.stack([fm.flatten(n) for n in nets])
    return nets, theta


@pytest.mark.parametrize("arch", [
    dict(channels=1, num_classes=10, im_size=(12, 12), width=8, depth=2),      # instance norm
    dict(channels=3, num_classes=5, im_size=(9, 7), width=8, depth=3, norm="groupnorm",
         act="leakyrelu", pool="maxpool"),
    dict(channels=2, num_classes=4, im_size=(8, 8), width=6, depth=1, norm="none",
         act="sigmoid", pool="none"),
])
def test_grouped_logits_and_gradients_equal_each_expert(arch):
    torch.manual_seed(0)
    k, b = 3, 5
    nets, theta = _experts(k, **arch)
    ens = GroupedConvNet(nets[0])
    x = torch.randn(k, b, arch["channels"], *arch["im_size"], dtype=torch.float64)
    y = torch.randint(0, arch["num_classes"], (k, b))
    logits = ens(theta, x)
    assert logits.shape == (k, b, arch["num_classes"])
    g = ens.grad_fn()(theta, x, y)
    assert g.shape == theta.shape
    fm = FlatModel(nets[0])
    for j, net in enumerate(nets):
        torch.testing.assert_close(logits[j], net(x[j]), rtol=1e-12, atol=1e-12)
        t = theta[j].clone().requires_grad_(True)
        ref = torch.autograd.grad(F.cross_entropy(fm(t, x[j]), y[j]), t)[0]
        torch.testing.assert_close(g[j], ref, rtol=1e-10, atol=1e-12)


def test_unsupported_models_and_bad_shapes_are_refused():
    assert not grouped_supported(ConvNet(1, 10, (8, 8), width=4, norm="batchnorm"))
    assert not grouped_supported(ConvNet(1, 10, (8, 8), width=4, norm="layernorm"))
    assert not grouped_supported(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="GroupedConvNet needs a ConvNet"):
        GroupedConvNet(ConvNet(1, 10, (8, 8), width=4, norm="batchnorm"))
    nets, theta = _experts(2, channels=1, num_classes=3, im_size=(6, 6), width=4, depth=1)
    ens = GroupedConvNet(nets[0])
    with pytest.raises(ValueError, match=r"theta must be \[K, "):
        ens(theta[:, :-1], torch.zeros(2, 1, 1, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be \[K=2"):
        ens(theta, torch.zeros(3, 1, 1, 6, 6, dtype=torch.float64))
