"""The `dm` method (Distribution Matching) on `digits`: the objective decreases, one step equals
the original's per-class eager loop, resume is bitwise exact, and the CLI writes the files."""
import json

import pytest
import torch

from pydistill_ext import cli
from pydistill_ext.artifacts import load_distilled
from pydistill_ext.data import load_dataset
from pydistill_ext.methods import get_method, run_distill
from pydistill_ext.methods.dm import dm_objective
from pydistill_ext.models import get_model
from reference import matching_eager as ref

OPTS = {"batch_real": 16, "model": "convnet-small"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _fixed_objective(method, ds):
    """DM objective with a FIXED network, the whole train split as the real batch, no DSA."""
    net = get_model("convnet-small", ds.channels, ds.num_classes, ds.im_size, seed=1234)
    net.requires_grad_(False)
    with torch.no_grad():
        return float(dm_objective(net, ds.train_images, ds.train_labels, method.images,
                                  method.labels, ds.num_classes))


def test_registered_with_paper_defaults(digits):
    cls = get_method("dm")
    assert cls.default_iterations == 20000
    m = cls(digits, 2, 0)
    assert m.hp == {"lr_img": 1.0, "batch_real": 256, "init": "real", "model": "convnet",
                    "dsa": True, "compile": True}
    assert cls(digits, 1, 0, compile="false").hp["compile"] is False
    assert m.opt.param_groups[0]["momentum"] == 0.5 and m.opt.param_groups[0]["lr"] == 1.0
    assert m.strategy == "color_crop_cutout_scale_rotate"   # no flip for digits
    # real init: every synthetic image is a training image of its class
    for img, lab in zip(m.images.detach(), m.labels):
        hits = (digits.train_images == img).flatten(1).all(1)
        assert hits.any() and bool((digits.train_labels[hits] == lab).all())
    noise = cls(digits, 2, 0, init="noise")
    assert not any((digits.train_images == img).flatten(1).all(1).any()
                   for img in noise.images.detach())
    with pytest.raises(ValueError, match="init"):
        cls(digits, 1, 0, init="zeros")
    with pytest.raises(ValueError, match="no option"):
        cls(digits, 1, 0, lr=3.0)


def test_objective_decreases(digits):
    m = get_method("dm")(digits, 2, 0, **OPTS)
    before = _fixed_objective(m, digits)
    losses = [m.step(i)["loss"] for i in range(20)]
    after = _fixed_objective(m, digits)
    assert all(l == l and l >= 0 for l in losses)   # finite, non-negative
    assert after < 0.7 * before, (before, after)


def test_one_step_equals_eager_per_class_loop(digits):
    """Without DSA, one step of the batched method = the original's per-class loop (same
    network, same real batch): same loss and same updated images."""
    m = get_method("dm")(digits, 3, 5, batch_real=12, model="convnet-small", dsa=False)
    x0 = m.images.detach().clone()
    g = m.gen.get_state()
    # replay the method's draws: network seed, then the real batch
    net = m._fresh_net()
    xr, yr = m._real_batch()
    m.gen.set_state(g)
    loss = m.step(0)["loss"]
    syn = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    per_class = [xr[yr == c] for c in range(digits.num_classes)]
    want = ref.dm_iteration(net, per_class, syn, opt, 3)
    assert loss == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(m.images.detach(), syn.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(m.images.detach(), x0)


def test_resume_equals_uninterrupted(digits, tmp_path):
    kw = dict(ipc=1, seed=3, iterations=5, progress=False, options=OPTS)
    a = run_distill("dm", digits, out_dir=tmp_path / "a", **kw)
    r = run_distill("dm", digits, out_dir=tmp_path / "b", stop_after=3, **kw)
    assert r["finished"] is False and (tmp_path / "b" / "checkpoint.pt").exists()
    b = run_distill("dm", digits, out_dir=tmp_path / "b", resume=True, **kw)
    assert a["history"]["loss"] == b["history"]["loss"] and len(a["history"]["loss"]) == 5
    sa, sb = load_distilled(tmp_path / "a"), load_distilled(tmp_path / "b")
    assert torch.equal(sa.images, sb.images)
    # and a different seed gives a different set (the comparison can fail)
    c = run_distill("dm", digits, out_dir=tmp_path / "c", **{**kw, "seed": 4})
    assert c["history"]["loss"] != a["history"]["loss"]


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "dm"
    assert cli.main(["distill", "--method", "dm", "--dataset", "digits", "--ipc", "1",
                     "--iterations", "3", "--out", str(out), "--quiet",
                     "--option", "batch_real=8", "--option", "model=convnet-small",
                     "--option", "lr_img=0.5"]) == 0
    for name in ("distilled.safetensors", "metrics.json", "grid.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    syn = load_distilled(out / "distilled.safetensors")
    assert syn.images.shape == (10, 1, 8, 8) and syn.labels.tolist() == list(range(10))
    hp = syn.meta["hyperparameters"]
    assert hp["lr_img"] == 0.5 and hp["batch_real"] == 8 and hp["momentum"] == 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 3


def test_chunked_channels_last_real_embedding_equals_one_forward():
    from pydistill_ext.methods.dm import embed_real
    net = get_model("convnet", 3, 10, (16, 16), seed=3).requires_grad_(False)
    x = torch.randn(23, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = embed_real(net, x, chunk=7)
    assert got.shape == (23, net.num_feat) and not got.requires_grad
    torch.testing.assert_close(got, net.embed(x).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["dm", "datadam"])
def test_compiled_objective_matches_eager_without_recompiling_per_network(method):
    """compile=True (the methods' default) runs both network passes through
    ``dm.compiled``: the loss and the image gradient equal the eager ones up to float32
    rounding, and a fresh network (new weights, as every iteration draws) reuses the graphs."""
    from torch._dynamo.utils import counters
    from pydistill_ext.methods.datadam import datadam_objective
    objective = dm_objective if method == "dm" else datadam_objective
    g = torch.Generator().manual_seed(0)
    xr = torch.randn(40, 3, 12, 12, generator=g)
    yr = torch.arange(4).repeat_interleave(10)
    xs0 = torch.randn(8, 3, 12, 12, generator=g)
    ys = torch.arange(4).repeat_interleave(2)
    graphs = []
    for seed in range(3):
        net = get_model("convnet", 3, 4, (12, 12), seed=seed, width=16).requires_grad_(False)
        out = []
        for comp in (False, True):
            xs = xs0.clone().requires_grad_(True)
            loss = objective(net, xr, yr, xs, ys, 4, compile=comp)
            loss.backward()
            out.append((loss.detach(), xs.grad))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-3, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[0], graphs
