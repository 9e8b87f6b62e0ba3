"""DC and DSA (gradient matching) on `digits`: loss vs the eager anchor, progress, Siamese
augmentation, resume, options, CLI."""
import json

import pytest
import torch

from pydistill_ext import cli
from pydistill_ext.artifacts import load_distilled
from pydistill_ext.augment.dsa import DIGIT_STRATEGY, dsa_augment
from pydistill_ext.data import load_dataset
from pydistill_ext.methods import get_method, list_methods, run_distill
from pydistill_ext.methods import dc as dc_mod
from pydistill_ext.models import get_model
from reference.dc_eager import dc_matching_loss, distance_wb, match_loss


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_registered_and_loops():
    assert {"dc", "dsa"} <= set(list_methods())
    assert get_method("dc").default_iterations == 1000
    expect = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    for ipc, loops in expect.items():
        assert dc_mod.dc_loops(ipc) == loops
    # nearest listed IPC, ties to the smaller one
    assert dc_mod.dc_loops(2) == (1, 1)
    assert dc_mod.dc_loops(5) == (1, 1)
    assert dc_mod.dc_loops(7) == (10, 50)
    assert dc_mod.dc_loops(15) == (10, 50)
    assert dc_mod.dc_loops(100) == (50, 10)


def test_anchor_distance_drops_1d_params():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, generator=gen, dtype=torch.float64)
    assert float(distance_wb(a, -a)) == 0.0
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    assert float(distance_wb(w, w)) == pytest.approx(0.0, abs=1e-5)
    assert float(distance_wb(w, -w)) == pytest.approx(8.0, abs=1e-5)   # 4 rows x (1 - (-1))


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_loss_equals_eager_anchor_float64(digits, metric):
    net = get_model("convnet", 1, 10, digits.im_size, seed=3).double()
    idx = digits.indices_per_class()
    reals = [digits.train_images[i[:24]].double() for i in idx]
    gen = torch.Generator().manual_seed(1)
    syn = torch.randn(20, 1, 8, 8, generator=gen, dtype=torch.float64)
    syn_a = syn.clone().requires_grad_(True)
    syn_b = syn.clone().requires_grad_(True)
    ours = dc_mod.gradient_matching_loss(net, reals, [syn_a[2 * c:2 * c + 2] for c in range(10)],
                                         metric=metric)
    ref = dc_matching_loss(net, reals, [syn_b[2 * c:2 * c + 2] for c in range(10)], metric)
    assert ours.dtype == torch.float64
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ga, = torch.autograd.grad(ours, syn_a)
    gb, = torch.autograd.grad(ref, syn_b)
    assert gb.abs().max() > 0
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("compile", [False, True])
def test_chunked_compiled_real_gradients_equal_the_anchor_float64(digits, compile):
    """The fast path of the matching loss (real class gradients through a compiled view of
    the network, accumulated over 5-row chunks) equals the eager float64 anchor."""
    net = get_model("convnet", 1, 10, digits.im_size, seed=4).double()
    idx = digits.indices_per_class()
    reals = [digits.train_images[i[:23]].double() for i in idx]
    syn = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64)
    syn_a, syn_b = syn.clone().requires_grad_(True), syn.clone().requires_grad_(True)
    forward = torch.compile(net, dynamic=False) if compile else None
    ours = dc_mod.gradient_matching_loss(net, reals, [syn_a[2 * c:2 * c + 2] for c in range(10)],
                                         forward=forward, chunk=5)
    ref = dc_matching_loss(net, reals, [syn_b[2 * c:2 * c + 2] for c in range(10)], "ours")
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    ga, = torch.autograd.grad(ours, syn_a)
    gb, = torch.autograd.grad(ref, syn_b)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-12)


def test_chunked_compiled_inner_training_equals_one_batch(digits):
    """The inner loop with a compiled forward and 7-row gradient chunks makes the same SGD
    updates as one eager pass per minibatch (float64, instance norm: rows independent)."""
    nets = []
    for forward_chunk in (False, True):
        m = get_method("dc")(digits, 10, 0, inner_loop=2)
        m.images.data = m.images.data.double()
        net = get_model("convnet", 1, 10, digits.im_size, seed=9).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        m.gen.manual_seed(5)
        if forward_chunk:
            m._train_network(net, opt, torch.compile(net, dynamic=False), 7)
        else:
            m._train_network(net, opt)
        nets.append(net)
    for p, q in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    fresh = get_model("convnet", 1, 10, digits.im_size, seed=9).double()
    assert not torch.equal(next(fresh.parameters()), next(nets[0].parameters()))


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_step_loss_is_the_anchor_loss_of_its_batches(digits, monkeypatch, name):
    """Record what one step feeds the matching loss; the reported loss equals the float64
    anchor on those inputs, and (DC) each real batch is distinct images of its class."""
    calls = []
    orig = dc_mod.gradient_matching_loss

    def spy(net, reals, syns, metric="ours", classes=None, **kw):
        calls.append((net, [r.detach().clone() for r in reals],
                      [s.detach().clone() for s in syns], metric))
        return orig(net, reals, syns, metric=metric, classes=classes, **kw)

    monkeypatch.setattr(dc_mod, "gradient_matching_loss", spy)
    m = get_method(name)(digits, 1, 5, batch_real=32)
    before = m.images.detach().clone()
    out = m.step(0)
    assert len(calls) == 1                  # ipc 1: one outer step
    net, reals, syns, metric = calls[0]
    assert metric == "ours"
    if name == "dc":
        for c, (xr, xs) in enumerate(zip(reals, syns)):
            assert torch.equal(xs, before[c:c + 1])
            rows = (digits.train_images.flatten(1)[:, None, :] == xr.flatten(1)[None]) \
                .all(-1).nonzero()
            assert len(rows) >= 32 and set(digits.train_labels[rows[:, 0]].tolist()) == {c}
            assert len(set(rows[:, 1].tolist())) == 32
    ref = dc_matching_loss(net.double(), [r.double() for r in reals],
                           [s.double() for s in syns], "ours")
    assert out["loss"] == pytest.approx(float(ref.detach()) / 10, rel=1e-4)
    assert not torch.equal(m.images.detach(), before)      # the images were updated


def _fixed_loss(method, nets, reals, dsa):
    total = 0.0
    for k, net in enumerate(nets):
        syn = [method.images.detach()[c:c + 1] for c in range(10)]
        r = reals
        if dsa:   # a fixed Siamese transform per (net, class)
            r = [dsa_augment(x, seed=50 * k + c, strategy=DIGIT_STRATEGY)
                 for c, x in enumerate(reals)]
            syn = [dsa_augment(x, seed=50 * k + c, strategy=DIGIT_STRATEGY)
                   for c, x in enumerate(syn)]
        total += float(dc_mod.gradient_matching_loss(net, r, syn).detach())
    return total / len(nets)


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_matching_loss_decreases(digits, name):
    """On held-out random networks (not drawn by the method) and fixed real batches, the
    matching loss of the synthetic set drops after a few outer iterations."""
    nets = [get_model("convnet", 1, 10, digits.im_size, seed=1000 + k) for k in range(3)]
    reals = [digits.train_images[i[:64]] for i in digits.indices_per_class()]
    m = get_method(name)(digits, 1, 0)
    before = _fixed_loss(m, nets, reals, name == "dsa")
    for it in range(6):
        m.step(it)
    after = _fixed_loss(m, nets, reals, name == "dsa")
    assert after < 0.95 * before, (before, after)


def test_dsa_is_siamese_and_dc_does_not_augment(digits, monkeypatch):
    calls = []
    orig = dc_mod.dsa_augment

    def spy(x, *, seed, strategy, per_sample=False, **kw):
        calls.append((x.shape[0], seed, strategy, per_sample))
        return orig(x, seed=seed, strategy=strategy, per_sample=per_sample, **kw)

    monkeypatch.setattr(dc_mod, "dsa_augment", spy)
    get_method("dc")(digits, 1, 0, batch_real=16).step(0)
    assert calls == []
    # ipc 2 with outer_loop 2, inner_loop 1: matching, one epoch of net training, matching
    get_method("dsa")(digits, 2, 0, batch_real=16, outer_loop=2, inner_loop=1).step(0)
    assert {c[2] for c in calls} == {DIGIT_STRATEGY} and "flip" not in DIGIT_STRATEGY
    match = [c for c in calls if not c[3]]
    train = [c for c in calls if c[3]]
    assert len(match) == 2 * 2 * 10 and len(train) == 1   # 20 syn images: one batch
    assert train[0][0] == 20
    seeds = []
    for k in range(0, len(match), 2):
        (nr, sr, _, _), (ns, ss, _, _) = match[k], match[k + 1]
        assert (nr, ns) == (16, 2) and sr == ss            # same transform, real and syn
        seeds.append(sr)
    assert len(set(seeds)) == len(seeds)                   # a new seed per class and step


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_resume_is_bitwise_exact(digits, tmp_path, name):
    opts = {"batch_real": 32}
    full = run_distill(name, digits, ipc=1, seed=2, iterations=3, out_dir=tmp_path / "full",
                       progress=False, options=opts)
    part = run_distill(name, digits, ipc=1, seed=2, iterations=3, out_dir=tmp_path / "split",
                       progress=False, stop_after=1, options=opts)
    assert part["finished"] is False and (tmp_path / "split" / "checkpoint.pt").exists()
    rest = run_distill(name, digits, ipc=1, seed=2, iterations=3, out_dir=tmp_path / "split",
                       progress=False, resume=True, options=opts)
    a = load_distilled(tmp_path / "full" / "distilled.safetensors")
    b = load_distilled(tmp_path / "split" / "distilled.safetensors")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert full["history"]["loss"] == rest["history"]["loss"]
    assert len(full["history"]["loss"]) == 3
    # another seed gives another set (the comparison above can fail)
    run_distill(name, digits, ipc=1, seed=3, iterations=1, out_dir=tmp_path / "other",
                progress=False, options=opts)
    assert not torch.equal(load_distilled(tmp_path / "other" / "distilled.safetensors").images,
                           a.images)


def test_options(digits):
    cls = get_method("dc")
    with pytest.raises(ValueError, match="metric"):
        cls(digits, 1, 0, metric="l2")
    with pytest.raises(ValueError, match="init"):
        cls(digits, 1, 0, init="zeros")
    with pytest.raises(ValueError, match="no option"):
        cls(digits, 1, 0, lr=0.1)
    with pytest.raises(ValueError, match="lr_img"):
        cls(digits, 1, 0, lr_img=-1.0)
    with pytest.raises(ValueError):
        cls(digits, 1, 0, model="nope")
    m = cls(digits, 3, 0)
    assert (m.outer_loop, m.inner_loop) == (1, 1)
    assert m.labels.tolist() == sum([[c] * 3 for c in range(10)], [])
    # real init: every synthetic image is a training image of its class
    flat = digits.train_images.flatten(1)
    for i, y in enumerate(m.labels.tolist()):
        hit = (flat == m.images.detach()[i].flatten()).all(-1).nonzero().flatten()
        assert len(hit) >= 1 and set(digits.train_labels[hit].tolist()) == {y}
    noise = cls(digits, 1, 0, init="noise")
    assert not (flat[:, None] == noise.images.detach().flatten(1)[None]).all(-1).any()
    for metric in ("mse", "cos"):
        assert torch.isfinite(torch.tensor(cls(digits, 1, 0, metric=metric,
                                                batch_real=16).step(0)["loss"]))


def test_batchnorm_model_freezes_statistics(digits, monkeypatch):
    """With convnet-bn the BatchNorm layers are in eval mode while the gradients are matched,
    with running statistics set from real images (not the defaults)."""
    seen = []
    orig = dc_mod.gradient_matching_loss

    def spy(net, reals, syns, metric="ours", classes=None, **kw):
        bns = [mod for mod in net.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        seen.append([(mod.training, mod.running_mean.abs().sum().item(), kw["chunk"])
                     for mod in bns])
        return orig(net, reals, syns, metric=metric, classes=classes, **kw)

    monkeypatch.setattr(dc_mod, "gradient_matching_loss", spy)
    out = get_method("dc")(digits, 1, 0, model="convnet-bn", batch_real=16).step(0)
    assert len(seen) == 1 and len(seen[0]) == 3
    assert all(not training and mean > 0 for training, mean, _ in seen[0])
    assert all(chunk is None for *_, chunk in seen[0])   # BatchNorm: batches are not chunked
    assert out["loss"] > 0


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "dsa"
    assert cli.main(["distill", "--method", "dsa", "--dataset", "digits", "--ipc", "1",
                     "--iterations", "2", "--out", str(out), "--quiet",
                     "--option", "batch_real=32"]) == 0
    for f in ("distilled.safetensors", "metrics.json", "grid.png"):
        assert (out / f).stat().st_size > 0
    syn = load_distilled(out / "distilled.safetensors")
    assert syn.images.shape == (10, 1, 8, 8) and syn.labels.tolist() == list(range(10))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == "dsa" and len(metrics["history"]["loss"]) == 2
    assert metrics["config"]["options"] == {"batch_real": 32}
