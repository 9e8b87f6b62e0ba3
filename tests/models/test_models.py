"""Reference networks (pydistill_ext.models): shapes, parameter counts, functional use,
seeding, errors, and the pretrained digit-recognizer teacher."""
import copy
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from pydistill_ext.models import (MLP, ConvNet, ResNet, get_model, known_models,
                                  load_digit_recognizer_teacher)
from pydistill_ext.models import teachers as teachers_mod

NAMES = known_models()
SHAPES = [(1, 28), (3, 32), (1, 8)]  # (channels, side)
REPO = Path(__file__).resolve().parents[2]


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def _x(c, s, n=2, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _state(m):
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------
def test_known_models():
    assert NAMES == sorted(NAMES)
    assert set(NAMES) == {"convnet", "convnet-bn", "convnet-ln", "convnet-gn", "convnet-nonorm",
                          "convnet-maxpool", "convnet-d4", "convnet-small", "resnet10",
                          "resnet18", "resnet18-in", "resnet-small", "resnet18-small", "mlp"}


def test_registry_configs_and_name_normalisation():
    m = get_model("convnet", 3, 10, 32)
    assert isinstance(m, ConvNet) and (m.width, m.depth, m.norm, m.act, m.pool) == (
        128, 3, "instancenorm", "relu", "avgpool")
    assert isinstance(m.features[1], nn.GroupNorm) and m.features[1].num_groups == 128
    assert isinstance(get_model("ConvNet_BN", 3, 10, 32).features[1], nn.BatchNorm2d)
    assert isinstance(get_model("convnet-ln", 3, 10, 32).features[1], nn.LayerNorm)
    assert get_model("convnet-gn", 3, 10, 32).features[1].num_groups == 4
    assert not any(isinstance(l, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm))
                   for l in get_model("convnet-nonorm", 3, 10, 32).modules())
    assert isinstance(get_model("convnet-maxpool", 3, 10, 32).features[3], nn.MaxPool2d)
    assert get_model("convnet-d4", 3, 10, 64).feat_shape == (128, 4, 4)
    small = get_model("convnet-small", 1, 10, 28)
    assert (small.width, small.depth) == (32, 2)
    r = get_model("resnet-small", 3, 10, 32)
    assert isinstance(r, ResNet) and (r.depth, r.width, r.norm) == (10, 16, "batchnorm")
    assert get_model("resnet18-in", 3, 10, 32).norm == "instancenorm"
    assert isinstance(get_model("mlp", 1, 10, 28), MLP)
    # overrides replace the registered defaults
    assert get_model("convnet", 3, 10, 32, width=64, norm="batchnorm").width == 64


# --------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("c,s", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", NAMES)
def test_output_embed_feature_map_shapes(name, c, s):
    m = get_model(name, c, 10, (s, s), seed=0)
    x = _x(c, s)
    with torch.no_grad():
        y = m(x)
        emb = m.embed(x)
        maps, logits = m.feature_maps(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert emb.shape == (2, m.num_feat)
    torch.testing.assert_close(logits, y)
    torch.testing.assert_close(m.classifier(emb), y)
    n_maps = {ConvNet: lambda: m.depth, ResNet: lambda: 4, MLP: lambda: m.depth - 1}
    assert len(maps) == n_maps[type(m)]()
    assert all(a.shape[0] == 2 for a in maps)
    if isinstance(m, ConvNet):
        assert [tuple(a.shape[1:]) for a in maps] == list(m.block_shapes)
    if isinstance(m, ResNet):
        assert [a.shape[1] for a in maps] == [m.width * k for k in (1, 2, 4, 8)]
        assert maps[-1].shape[-1] == max(1, -(-s // 8))


def test_convnet_feature_arithmetic():
    # MNIST: padding 3 on the first conv makes 28 -> 32 -> 16 -> 8 -> 4
    assert ConvNet(1, 10, (28, 28)).feat_shape == (128, 4, 4)
    assert ConvNet(3, 10, (32, 32)).feat_shape == (128, 4, 4)
    # 8x8 digits: 12 -> 6 -> 3 -> 1, and pooling stops shrinking at 1
    m = ConvNet(1, 10, (8, 8))
    assert [b[1:] for b in m.block_shapes] == [(12, 12), (6, 6), (3, 3)]
    assert m.feat_shape == (128, 1, 1)
    assert ConvNet(1, 10, (8, 8), depth=5, width=8).feat_shape == (8, 1, 1)
    # non-square, one side collapsing early; no pooling; an int im_size
    for m, feat in [(ConvNet(3, 5, (32, 2), width=8), (8, 4, 1)),
                    (ConvNet(3, 5, (9, 7), width=8, pool="none"), (8, 9, 7)),
                    (ConvNet(3, 5, 16, width=8, norm="layernorm", act="sigmoid"), (8, 2, 2)),
                    (ConvNet(3, 5, 16, width=8, pool="maxpool", act="leakyrelu"), (8, 2, 2))]:
        assert m.feat_shape == feat
        h, w = m.im_size
        assert m(torch.randn(2, 3, h, w)).shape == (2, 5)


def test_convnet_maps_match_activation_hooks():
    """feature_maps returns what hooks on the activation modules see (after act, pre-pool)."""
    m = get_model("convnet", 3, 10, 32, seed=0)
    seen = []
    hooks = [mod.register_forward_hook(lambda _m, _i, o: seen.append(o))
             for mod in m.features if isinstance(mod, nn.ReLU)]
    x = _x(3, 32)
    with torch.no_grad():
        maps, _ = m.feature_maps(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for a, b in zip(maps, seen):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------
def test_param_counts():
    assert _nparams(get_model("convnet", 3, 10, (32, 32))) == 320_010  # CIFAR-10
    assert _nparams(get_model("convnet", 1, 10, (28, 28))) == 317_706  # MNIST
    assert _nparams(ConvNet(3, 100)) == 504_420  # CIFAR-100
    assert _nparams(get_model("convnet-d4", 3, 200, 64)) == 857_160  # Tiny ImageNet
    assert _nparams(get_model("resnet18", 3, 10, 32)) == 11_173_962
    assert _nparams(get_model("mlp", 1, 10, 28)) == 784 * 128 + 128 + 128 * 128 + 128 + 1290


# --------------------------------------------------------------------------------------
# functional use
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_functional_call_matches_module(name, train):
    c, s = 3, 16
    shell = get_model(name, c, 10, s, seed=0).train(train)
    other = get_model(name, c, 10, s, seed=1).train(train)
    x = _x(c, s, n=3)
    with torch.no_grad():
        ref = other(x)
        out = functional_call(shell, _state(other), (x,))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _stack(name, n, c=3, s=16):
    models = [get_model(name, c, 10, s, seed=i) for i in range(n)]
    params, buffers = stack_module_state(models)
    shell = copy.deepcopy(models[0]).to("meta")
    return models, shell, params, buffers


def test_vmap_stacked_convnet_instancenorm():
    models, shell, params, buffers = _stack("convnet", 3)
    x = _x(3, 16, n=4)

    def f(p, b, xx):
        return functional_call(shell, (p, b), (xx,))

    out = vmap(f, in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        ref = torch.stack([m(x) for m in models])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    # per-expert gradients in one call (trajectory matching)
    y = torch.tensor([0, 1, 2, 3])

    def loss(p, b, xx):
        return nn.functional.cross_entropy(f(p, b, xx), y)

    g = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    m1 = models[1]
    m1.zero_grad()
    nn.functional.cross_entropy(m1(x), y).backward()
    for k, p in m1.named_parameters():
        torch.testing.assert_close(g[k][1], p.grad, rtol=1e-4, atol=1e-6)


def test_vmap_batchnorm_train_with_stacked_buffers():
    """Train-mode BatchNorm vmaps when the buffers are stacked (in_dims=0): each model's
    running statistics are updated in its slice. Shared buffers work in eval mode."""
    models, shell, params, buffers = _stack("convnet-bn", 3)
    x = _x(3, 16, n=4)
    out = vmap(lambda p, b, xx: functional_call(shell, (p, b), (xx,)),
               in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        ref = torch.stack([m(x) for m in models])  # also updates each model's running stats
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffers["features.1.running_mean"],
                               torch.stack([m.features[1].running_mean for m in models]))
    assert buffers["features.1.num_batches_tracked"].tolist() == [1, 1, 1]

    shell.eval()
    for m in models:
        m.eval()
    shared = dict(models[0].named_buffers())
    out = vmap(lambda p, b, xx: functional_call(shell, (p, b), (xx,)),
               in_dims=(0, None, None))(params, shared, x)
    with torch.no_grad():
        for i, m in enumerate(models):
            m.load_state_dict(shared, strict=False)
            torch.testing.assert_close(out[i], m(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# seeding
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_seed_deterministic_and_global_rng_untouched(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = get_model(name, 3, 10, 16, seed=7)
    b = get_model(name, 3, 10, 16, seed=7)
    c = get_model(name, 3, 10, 16, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_seed_none_uses_global_rng():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = get_model("convnet-small", 3, 10, 16)
    assert not torch.equal(torch.get_rng_state(), before)  # advanced as usual
    torch.manual_seed(5)
    b = get_model("convnet-small", 3, 10, 16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # seeded construction is the same as constructing right after manual_seed(seed)
    torch.manual_seed(11)
    c = get_model("convnet-small", 3, 10, 16)
    d = get_model("convnet-small", 3, 10, 16, seed=11)
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown model 'vgg11'.*convnet.*resnet18"):
        get_model("vgg11", 3, 10, 32)
    with pytest.raises(ValueError, match="known models"):
        get_model(None, 3, 10, 32)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(channels=0), "channels"), (dict(channels=True), "channels"),
    (dict(channels=3.0), "channels"), (dict(num_classes=-1), "num_classes"),
    (dict(num_classes="10"), "num_classes"), (dict(im_size=(0, 32)), "im_size"),
    (dict(im_size=(32,)), "im_size"), (dict(im_size=(32, 32, 3)), "im_size"),
    (dict(im_size="32"), "im_size"), (dict(im_size=None), "im_size"),
    (dict(seed=1.5), "seed"),
])
@pytest.mark.parametrize("name", ["convnet", "resnet-small", "mlp"])
def test_bad_arguments_name_the_argument(name, kwargs, arg):
    args = dict(channels=3, num_classes=10, im_size=(32, 32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        get_model(name, **args)


def test_bad_constructor_options():
    with pytest.raises(TypeError, match="allowed overrides"):
        get_model("convnet", 3, 10, 32, widht=64)
    with pytest.raises(ValueError, match="norm"):
        ConvNet(3, 10, norm="weird")
    with pytest.raises(ValueError, match="act"):
        ConvNet(3, 10, act="gelu")
    with pytest.raises(ValueError, match="pool"):
        ConvNet(3, 10, pool="avgpooling")
    with pytest.raises(ValueError, match="width"):
        ConvNet(3, 10, width=6, norm="groupnorm")
    with pytest.raises(ValueError, match="depth"):
        ConvNet(3, 10, depth=0)
    with pytest.raises(ValueError, match="depth"):
        ResNet(3, 10, depth=12)
    with pytest.raises(ValueError, match="norm"):
        ResNet(3, 10, norm="layernorm")
    with pytest.raises(ValueError, match="width"):
        MLP(1, 10, 8, width=0)


# --------------------------------------------------------------------------------------
# pretrained teacher
# --------------------------------------------------------------------------------------
def _wheel_installed():
    try:
        importlib.metadata.distribution("digit-recognizer-py")
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec("digit_recognizer") is not None


needs_wheel = pytest.mark.skipif(not _wheel_installed(),
                                 reason="pip install --no-deps digit-recognizer-py")


def _mnist_path():
    root = os.environ.get("PYDISTILL_DATA")
    for d in ([Path(root)] if root else []) + [REPO.parent / "shared" / "data"]:
        if (d / "mnist.npz").is_file():
            return d / "mnist.npz"
    return None


@needs_wheel
def test_teacher_loads_frozen_without_importing_package():
    was_imported = "digit_recognizer" in sys.modules
    t = load_digit_recognizer_teacher()
    if not was_imported:  # the package (and so torchvision) was never imported
        assert "digit_recognizer" not in sys.modules
    assert not t.training
    assert not any(p.requires_grad for p in t.parameters())
    assert _nparams(t) == 390_410
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in t.modules())
    assert t.input_mean == (0.1307,) and t.input_std == (0.3081,)
    assert (t.channels, t.num_classes, t.im_size) == (1, 10, (28, 28))
    with torch.no_grad():
        assert t(_x(1, 28)).shape == (2, 10)
    # loaded twice -> same weights, module source executed once
    t2 = load_digit_recognizer_teacher()
    assert type(t2) is type(t)
    assert all(torch.equal(p, q) for p, q in zip(t.parameters(), t2.parameters()))


def test_teacher_missing_package_message(monkeypatch):
    monkeypatch.setattr(teachers_mod, "DIST_NAME", "no-such-dist-pydistill")
    monkeypatch.setattr(teachers_mod, "_PKG", "no_such_pkg_pydistill")
    with pytest.raises(ImportError, match=r"pip install --no-deps digit-recognizer-py"):
        load_digit_recognizer_teacher()
    with pytest.raises(ImportError, match="torchvision"):
        load_digit_recognizer_teacher()


@needs_wheel
def test_teacher_mnist_test_accuracy():
    path = _mnist_path()
    if path is None:
        pytest.skip("mnist.npz not found (set PYDISTILL_DATA or provide ../shared/data)")
    d = np.load(path)
    x = torch.from_numpy(d["x_test"]).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(d["y_test"]).long()
    t = load_digit_recognizer_teacher()
    x = (x - t.input_mean[0]) / t.input_std[0]
    with torch.no_grad():
        pred = torch.cat([t(xb).argmax(1) for xb in x.split(2500)])
    acc = (pred == y).float().mean().item()
    print(f"digit-recognizer-py teacher MNIST test accuracy: {acc:.4f}")
    assert acc >= 0.98
