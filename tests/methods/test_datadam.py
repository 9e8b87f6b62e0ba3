"""The `datadam` method on `digits`: the objective decreases, one step equals the original's
hook-based eager iteration, resume is bitwise exact, and the CLI writes the files."""
import json

import pytest
import torch

from pydistill_ext import cli
from pydistill_ext.artifacts import load_distilled
from pydistill_ext.data import load_dataset
from pydistill_ext.methods import get_method, run_distill
from pydistill_ext.methods.datadam import datadam_objective, maps_and_embedding
from pydistill_ext.models import get_model
from reference import matching_eager as ref

OPTS = {"batch_real": 16, "model": "convnet-small"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _fixed_objective(method, ds):
    net = get_model("convnet-small", ds.channels, ds.num_classes, ds.im_size, seed=99)
    net.requires_grad_(False)
    with torch.no_grad():
        return float(datadam_objective(net, ds.train_images, ds.train_labels, method.images,
                                       method.labels, ds.num_classes, p=method.hp["p"],
                                       task_balance=method.hp["task_balance"]))


def test_registered_with_defaults(digits):
    cls = get_method("datadam")
    assert cls.default_iterations == 8000
    m = cls(digits, 1, 0)
    assert m.hp == {"lr_img": 1.0, "batch_real": 64, "init": "real", "model": "convnet",
                    "dsa": True, "p": 1.0, "task_balance": 0.01, "compile": True}
    with pytest.raises(ValueError, match="p must be"):
        cls(digits, 1, 0, p=0.0)


def test_maps_and_embedding_one_pass_equals_model_api():
    net = get_model("convnet", 1, 10, (8, 8), seed=0)
    x = torch.randn(5, 1, 8, 8)
    maps, emb = maps_and_embedding(net, x)
    want_maps, _ = net.feature_maps(x)
    assert len(maps) == len(want_maps) == 3
    for a, b in zip(maps, want_maps):
        assert torch.equal(a, b)
    assert torch.equal(emb, net.embed(x))


def test_objective_decreases(digits):
    m = get_method("datadam")(digits, 2, 0, **OPTS)
    before = _fixed_objective(m, digits)
    losses = [m.step(i)["loss"] for i in range(20)]
    after = _fixed_objective(m, digits)
    assert all(l == l and l >= 0 for l in losses)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("p", [1.0, 4.0])
def test_one_step_equals_eager_hook_iteration(digits, p):
    """Without DSA: same network and real batch as the original-structured eager iteration
    (hooks on the ReLUs, eager attention, reshape means) -> same loss and updated images."""
    m = get_method("datadam")(digits, 2, 7, batch_real=10, model="convnet", dsa=False, p=p)
    x0 = m.images.detach().clone()
    g = m.gen.get_state()
    net = m._fresh_net()
    xr, yr = m._real_batch()
    m.gen.set_state(g)
    loss = m.step(0)["loss"]
    syn = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    per_class = [xr[yr == c] for c in range(digits.num_classes)]
    want = ref.datadam_iteration(net, per_class, syn, opt, 2, p=p, task_balance=0.01)
    assert loss == pytest.approx(float(want), rel=1e-4)
    torch.testing.assert_close(m.images.detach(), syn.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.equal(m.images.detach(), x0)


def test_resume_equals_uninterrupted(digits, tmp_path):
    kw = dict(ipc=1, seed=2, iterations=5, progress=False, options=OPTS)
    a = run_distill("datadam", digits, out_dir=tmp_path / "a", **kw)
    run_distill("datadam", digits, out_dir=tmp_path / "b", stop_after=3, **kw)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    b = run_distill("datadam", digits, out_dir=tmp_path / "b", resume=True, **kw)
    assert a["history"]["loss"] == b["history"]["loss"] and len(a["history"]["loss"]) == 5
    assert torch.equal(load_distilled(tmp_path / "a").images, load_distilled(tmp_path / "b").images)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "dd"
    assert cli.main(["distill", "--method", "datadam", "--dataset", "digits", "--ipc", "1",
                     "--iterations", "2", "--out", str(out), "--quiet",
                     "--option", "batch_real=8", "--option", "model=convnet-small",
                     "--option", "p=4", "--option", "dsa=false"]) == 0
    for name in ("distilled.safetensors", "metrics.json", "grid.png"):
        assert (out / name).stat().st_size > 0
    syn = load_distilled(out / "distilled.safetensors")
    hp = syn.meta["hyperparameters"]
    assert hp["p"] == 4.0 and hp["dsa"] is False and hp["dsa_strategy"] is None
    assert syn.meta["method"] == "datadam"
    assert len(json.loads((out / "metrics.json").read_text())["history"]["loss"]) == 2


@pytest.mark.parametrize("compile", [False, True])
def test_chunked_real_side_equals_one_pass(compile):
    """The real side, reduced to attention maps chunk by chunk (eager: pde.attention_map per
    chunk; compiled: the plain-torch maps fused into the network graph), equals the attention
    maps of one unchunked pass."""
    from pydistill_ext.methods.datadam import _real_side
    from pydistill_ext.ops.attention_map import attention_map
    net = get_model("convnet", 3, 10, (16, 16), seed=4).requires_grad_(False)
    x = torch.randn(19, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for p in (1.0, 4.0):
        att, emb = _real_side(net, x, 2, chunk=5, p=p, compile=compile)
        want_maps, want_emb = maps_and_embedding(net, x)
        assert len(att) == 2
        for a, m in zip(att, want_maps[:2]):
            assert a.shape == (19, m.shape[2] * m.shape[3])
            torch.testing.assert_close(a, attention_map(m.detach(), p), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(emb, want_emb.detach(), rtol=1e-4, atol=1e-5)


def test_attention_means_loss_equals_attention_match_loss():
    from pydistill_ext.losses import attention_match_loss, attention_means_loss
    from pydistill_ext.ops.attention_map import attention_map
    g = torch.Generator().manual_seed(2)
    fr = [torch.randn(12, 4, 5, 5, generator=g), torch.randn(12, 4, 3, 3, generator=g)]
    fs = [torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 4, 3, 3, generator=g)]
    yr, ys = torch.arange(3).repeat(4), torch.tensor([0, 0, 1, 1, 2, 2])
    want = attention_match_loss(fr, yr, fs, ys, 3, p=2.0)
    got = attention_means_loss([attention_map(f, 2.0) for f in fr], yr,
                               [attention_map(f, 2.0) for f in fs], ys, 3)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="1 real maps vs 2"):
        attention_means_loss([attention_map(fr[0], 2.0)], yr,
                             [attention_map(f, 2.0) for f in fs], ys, 3)
    with pytest.raises(ValueError, match="widths differ"):
        attention_means_loss([attention_map(fr[0], 2.0)], yr, [attention_map(fs[1], 2.0)], ys, 3)
