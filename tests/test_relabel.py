"""FKD / SRe2L relabel with top-k soft-label storage (pydistill_ext.relabel)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pydistill_ext
from pydistill_ext import relabel as R

C, H, W, V = 1, 8, 8, 10


def _teacher(seed=0, classes=V, scale=1.0):
    """A small BN network in eval mode with non-trivial running statistics."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * H * W, classes))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 * scale)
        net[1].running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        net[1].running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return net.eval().requires_grad_(False)


def _images(n=12, seed=1):
    return torch.randn((n, C, H, W), generator=torch.Generator().manual_seed(seed))


def _dataset(n_test=20, seed=2):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(name="tiny", channels=C, num_classes=V, im_size=(H, W),
                           test_images=torch.randn((n_test, C, H, W), generator=g),
                           test_labels=torch.randint(0, V, (n_test,), generator=g))


KW = dict(epochs=3, batch_size=5, crop_scale=(0.25, 1.0))


# ------------------------------------------------------------------------------- plan / crops

def test_plan_deterministic_and_seed_dependent():
    a = R.make_plan(12, (H, W), seed=3, mix="cutmix", **KW)
    b = R.make_plan(12, (H, W), seed=3, mix="cutmix", **KW)
    c = R.make_plan(12, (H, W), seed=4, mix="cutmix", **KW)
    assert a.keys() == b.keys() == {"perm", "box", "flip", "mix_index", "mix_lam", "mix_box"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["box"], c["box"])


def test_plan_boxes_valid_and_permutations():
    p = R.make_plan(50, (H, W), epochs=4, batch_size=16, seed=0, crop_scale=(0.08, 1.0),
                    mix="mixup", mix_alpha=0.8)
    box = p["box"].long()
    top, left, bh, bw = box.unbind(-1)
    assert (bh >= 1).all() and (bw >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= H).all() and (left + bw <= W).all()
    assert (bh < H).any()  # crops actually crop
    for e in range(4):
        assert torch.equal(p["perm"][e].long().sort().values, torch.arange(50))
        for b in range(4):  # the mix partner is a permutation of each batch
            sl = slice(16 * b, min(50, 16 * (b + 1)))
            part = p["mix_index"][e, sl].long()
            assert torch.equal(part.sort().values, torch.arange(part.numel()))
    assert ((p["mix_lam"] >= 0) & (p["mix_lam"] <= 1)).all()


def test_crop_resize_matches_interpolate_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn((6, 2, 9, 7), generator=g)
    box = torch.tensor([[0, 0, 9, 7], [1, 2, 5, 3], [3, 0, 6, 7], [0, 4, 2, 3],
                        [8, 6, 1, 1], [2, 1, 4, 4]])
    flip = torch.tensor([0, 1, 0, 1, 0, 0])
    out = R.crop_resize(x, box, flip)
    for i in range(6):
        t, l, h, w = box[i].tolist()
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(9, 7), mode="bilinear",
                            align_corners=False)
        if flip[i]:
            ref = ref.flip(3)
        torch.testing.assert_close(out[i], ref[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(out[0], x[0])  # the full box is the identity


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_replay_batch_mix_by_hand(mix):
    x = _images(12)
    p = R.make_plan(12, (H, W), epochs=2, batch_size=5, seed=2, mix=mix, mix_alpha=1.0)
    for e in range(2):
        for b in range(3):
            sl = slice(5 * b, min(12, 5 * b + 5))
            idx = p["perm"][e, sl].long()
            base = R.crop_resize(x[idx], p["box"][e, sl], p["flip"][e, sl])
            part = base[p["mix_index"][e, sl].long()]
            lam = float(p["mix_lam"][e, b])
            if mix == "cutmix":
                t, l, bh, bw = p["mix_box"][e, b].tolist()
                want = base.clone()
                want[:, :, t:t + bh, l:l + bw] = part[:, :, t:t + bh, l:l + bw]
                assert lam == pytest.approx(1 - bh * bw / (H * W))
            else:
                want = lam * base + (1 - lam) * part
            got, gidx = R.replay_batch(x, p, e, b, 5)
            assert torch.equal(gidx, idx)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------- relabel

@pytest.mark.parametrize("mix", [None, "cutmix", "mixup"])
def test_relabel_deterministic(mix):
    t, x = _teacher(), _images()
    a = R.relabel(x, t, k=3, seed=5, mix=mix, **KW)
    b = R.relabel(x, t, k=3, seed=5, mix=mix, **KW)
    c = R.relabel(x, t, k=3, seed=6, mix=mix, **KW)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    assert all(torch.equal(a.plan[k], b.plan[k]) for k in a.plan)
    assert a.meta == b.meta
    assert not torch.equal(a.values, c.values)


@pytest.mark.parametrize("mix", [None, "cutmix", "mixup"])
@pytest.mark.parametrize("k", [1, 3, V])
def test_replay_reproduces_stored_topk(k, mix):
    """Re-querying the teacher on the replayed crops gives the stored top-k (within fp16)."""
    t, x = _teacher(scale=3.0), _images()
    rs = R.relabel(x, t, k=k, seed=7, mix=mix, **KW)
    assert rs.values.dtype == torch.float16
    assert (rs.indices is None) == (k == V)
    assert rs.num_batches == 3
    for e in range(rs.epochs):
        for b in range(rs.num_batches):
            xb, idx = R.replay_batch(x, rs.plan, e, b, rs.batch_size)
            logits = t(xb)
            ids, vals = rs.targets(e, b)
            if ids is None:
                got = logits
            else:
                ids = ids.long()
                got = logits.gather(1, ids)
                # the stored ids are the top-k: no other class beats the k-th stored logit
                rest = logits.scatter(1, ids, float("-inf"))
                assert (rest.max(1).values <= got[:, -1] + 1e-6).all()
                assert (got[:, :-1] >= got[:, 1:]).all()  # sorted, largest first
            # fp16 rounding: half an ulp (2^-11 relative) or the subnormal step
            tol = got.abs() * 2.0 ** -11 + 2.0 ** -24
            assert ((vals.float() - got).abs() <= tol).all()
            assert torch.equal(vals, got.half())


def test_topk_is_prefix_of_dense():
    t, x = _teacher(scale=2.0), _images()
    dense = R.relabel(x, t, k=V, seed=1, value_dtype="float32", **KW)
    top = R.relabel(x, t, k=4, seed=1, value_dtype="float32", **KW)
    vals, ids = dense.values.topk(4, dim=-1)
    torch.testing.assert_close(top.values, vals, rtol=0, atol=0)
    assert torch.equal(top.indices.long(), ids)
    assert all(torch.equal(top.plan[k], dense.plan[k]) for k in top.plan)


def test_storage_bytes_exact(tmp_path):
    e, n, bs, k = 3, 12, 5, 3
    rs = R.relabel(_images(n), _teacher(), k=k, seed=0, epochs=e, batch_size=bs)
    s = rs.storage_bytes()
    assert rs.indices.dtype == torch.uint8  # 10 classes fit a byte
    assert s["values"] == e * n * k * 2
    assert s["indices"] == e * n * k * 1
    assert s["soft_labels"] == e * n * k * 3
    # perm int16 + box 4 x int16 + flip uint8 per crop
    assert s["augmentation"] == e * n * (2 + 8 + 1)
    assert s["total"] == s["soft_labels"] + s["augmentation"]
    assert s["dense_fp32_soft_labels"] == e * n * V * 4
    assert s["dense_fp16_soft_labels"] == e * n * V * 2
    assert s["soft_labels_per_crop"] == 3 * k
    assert s["ratio_vs_dense_fp32"] == pytest.approx(9 / 40)
    path = R.save_relabel(tmp_path / "rl", rs)
    size = os.path.getsize(path)
    assert s["total"] < size < s["total"] + 4096  # tensors + the JSON header
    dense = R.relabel(_images(n), _teacher(), k=V, seed=0, epochs=e, batch_size=bs, flip=False)
    sd = dense.storage_bytes()
    assert sd["indices"] == 0 and sd["values"] == sd["dense_fp16_soft_labels"]
    assert sd["augmentation"] == e * n * (2 + 8)
    mixed = R.relabel(_images(n), _teacher(), k=2, seed=0, epochs=e, batch_size=bs,
                      mix="cutmix").storage_bytes()
    nb = 3
    assert mixed["augmentation"] == e * n * (2 + 8 + 1 + 2) + e * nb * (4 + 8)


def test_index_dtypes():
    assert R.index_dtype(10) == torch.uint8 and R.index_dtype(256) == torch.uint8
    assert R.index_dtype(257) == torch.int16 and R.index_dtype(32768) == torch.int16
    assert R.index_dtype(32769) == torch.int32
    t, x = _teacher(classes=300), _images()
    rs = R.relabel(x, t, k=5, seed=0, **KW)
    assert rs.indices.dtype == torch.int16 and int(rs.indices.max()) < 300
    assert rs.storage_bytes()["indices"] == 3 * 12 * 5 * 2


def test_save_load_roundtrip(tmp_path):
    rs = R.relabel(_images(), _teacher(), k=2, seed=0, mix="cutmix", **KW)
    path = R.save_relabel(tmp_path / "out", rs)
    assert path.name == R.RELABEL_FILE
    assert sorted(os.listdir(path.parent)) == [R.RELABEL_FILE]  # no temporary left behind
    back = R.load_relabel(tmp_path / "out")
    assert torch.equal(back.values, rs.values) and back.values.dtype == torch.float16
    assert torch.equal(back.indices, rs.indices) and back.indices.dtype == rs.indices.dtype
    assert back.plan.keys() == rs.plan.keys()
    assert all(torch.equal(back.plan[k], rs.plan[k]) for k in rs.plan)
    assert back.meta == rs.meta
    assert back.storage_bytes() == rs.storage_bytes()


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a pydistill relabel file"):
        R.load_relabel(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        R.load_relabel(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        R.load_relabel(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("k, msg", [(0, "k must be an integer >= 1"),
                                    (V + 1, "k=11 exceeds the teacher's 10 classes"),
                                    (2.0, "k must be an integer"), (True, "k must be an integer")])
def test_bad_k(k, msg):
    with pytest.raises(ValueError, match=msg):
        R.relabel(_images(), _teacher(), k=k, seed=0, **KW)


def test_bad_inputs():
    t, x = _teacher(), _images()
    with pytest.raises(ValueError, match=r"images must be a floating tensor \[N, C, H, W\]"):
        R.relabel(x[0], t, k=2, seed=0, **KW)
    with pytest.raises(ValueError, match="images must be a floating"):
        R.relabel(x.long(), t, k=2, seed=0, **KW)
    with pytest.raises(ValueError, match="training mode"):
        R.relabel(x, _teacher().train(), k=2, seed=0, **KW)
    with pytest.raises(ValueError, match="value_dtype"):
        R.relabel(x, t, k=2, seed=0, value_dtype="bfloat16", **KW)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        R.relabel(x, t, k=2, seed=0, epochs=0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        R.relabel(x, t, k=2, seed=0, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="mix must be one of"):
        R.relabel(x, t, k=2, seed=0, mix="mosaic", **KW)
    with pytest.raises(ValueError, match="crop_scale"):
        R.relabel(x, t, k=2, seed=0, epochs=1, batch_size=4, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="teacher output must be"):
        R.relabel(x, nn.Identity().eval(), k=2, seed=0, **KW)
    with pytest.raises(ValueError, match="overflow float16"):
        R.relabel(x, _teacher(scale=1e4), k=2, seed=0, **KW)
    with pytest.raises(ValueError, match="values shape"):
        rs = R.relabel(x, t, k=2, seed=0, **KW)
        R.RelabelSet(rs.values[:, :5], rs.indices, rs.plan, rs.meta)
    with pytest.raises(ValueError, match="indices must be stored exactly"):
        R.RelabelSet(rs.values, None, rs.plan, rs.meta)


def test_train_bad_inputs():
    t, x, d = _teacher(), _images(), _dataset()
    rs = R.relabel(x, t, k=2, seed=0, **KW)
    with pytest.raises(ValueError, match="11 images but the relabel set covers 12"):
        R.train_on_relabel(rs, x[:11], "convnet", d)
    with pytest.raises(ValueError, match="images are"):
        R.train_on_relabel(rs, torch.randn(12, C, 6, 6), "convnet", d)
    with pytest.raises(ValueError, match="temperature"):
        R.train_on_relabel(rs, x, "convnet", d, temperature=0.0)
    d5 = SimpleNamespace(**{**vars(d), "num_classes": 5})
    with pytest.raises(ValueError, match="relabel set has 10 classes, dataset 5"):
        R.train_on_relabel(rs, x, "convnet", d5)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        R.train_hard(x, torch.zeros(12), "convnet", d, epochs=1, batch_size=4, relabel_seed=0)
    with pytest.raises(ValueError, match="12 images but 11 labels"):
        R.train_hard(x, torch.zeros(11, dtype=torch.long), "convnet", d, epochs=1,
                     batch_size=4, relabel_seed=0)


# ------------------------------------------------------------------------------- training

TRAIN = dict(epochs=2, batch_size=6, crop_scale=(0.25, 1.0))


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mix", [None, "cutmix"])
def test_dense_storage_equals_online(mix):
    """k = V stored in fp32 trains bit-identically to querying the teacher on the fly; fp16
    storage is within its rounding of it."""
    t, x, d = _teacher(scale=2.0), _images(), _dataset()
    h_on, h32, h16 = {}, {}, {}
    on = R.train_online(x, t, "convnet", d, relabel_seed=3, mix=mix, temperature=2.0, seed=1,
                        history=h_on, **TRAIN)
    rs32 = R.relabel(x, t, k=V, seed=3, mix=mix, value_dtype="float32", **TRAIN)
    st = R.train_on_relabel(rs32, x, "convnet", d, temperature=2.0, seed=1, history=h32)
    assert torch.equal(_params(on["model"]), _params(st["model"]))
    assert h_on["train_loss"] == h32["train_loss"]
    assert on["test_accuracy"] == st["test_accuracy"]
    rs16 = R.relabel(x, t, k=V, seed=3, mix=mix, **TRAIN)
    st16 = R.train_on_relabel(rs16, x, "convnet", d, temperature=2.0, seed=1, history=h16)
    torch.testing.assert_close(torch.tensor(h16["train_loss"]), torch.tensor(h_on["train_loss"]),
                               rtol=2e-3, atol=1e-4)
    assert not torch.equal(_params(on["model"]), _params(st16["model"]))  # fp16 is not exact


def test_topk_training_uses_kd_loss_topk(monkeypatch):
    calls = {"topk": 0, "dense": 0}
    real_topk, real_dense = pydistill_ext.kd_loss_topk, pydistill_ext.kd_loss

    def topk(*a, **k):
        calls["topk"] += 1
        assert a[1].dtype == torch.int32 and a[2].dtype == torch.float16
        return real_topk(*a, **k)

    def dense(*a, **k):
        calls["dense"] += 1
        return real_dense(*a, **k)

    monkeypatch.setattr(pydistill_ext, "kd_loss_topk", topk)
    monkeypatch.setattr(pydistill_ext, "kd_loss", dense)
    t, x, d = _teacher(), _images(), _dataset()
    h = {}
    R.train_on_relabel(R.relabel(x, t, k=2, seed=0, **TRAIN), x, "convnet", d, seed=0, history=h)
    assert calls == {"topk": 4, "dense": 0}  # 2 epochs x 2 batches
    assert all(torch.isfinite(torch.tensor(h["train_loss"])))
    R.train_on_relabel(R.relabel(x, t, k=V, seed=0, **TRAIN), x, "convnet", d, seed=0)
    assert calls == {"topk": 4, "dense": 4}


def test_topk_loss_value_on_first_batch():
    """The first step's loss is the renormalised forward KL of the stored top-k (REFERENCE
    1.6) on the student's logits of the replayed crops."""
    from pydistill_ext.models import get_model
    t, x, d = _teacher(scale=2.0), _images(), _dataset()
    rs = R.relabel(x, t, k=3, seed=0, epochs=1, batch_size=12, crop_scale=(0.25, 1.0))
    h = {}
    R.train_on_relabel(rs, x, "convnet", d, temperature=2.0, seed=4, history=h)
    student = get_model("convnet", C, V, (H, W), seed=4).train()
    xb, _ = R.replay_batch(x, rs.plan, 0, 0, 12)
    with torch.no_grad():
        s = student(xb).double() / 2.0
    ids, vals = rs.targets(0, 0)
    pt = torch.softmax(vals.double() / 2.0, 1)
    log_ps = torch.log_softmax(s, 1).gather(1, ids.long())
    ref = (pt * (pt.log() - log_ps)).sum(1).mean()
    assert h["train_loss"][0] == pytest.approx(float(ref), rel=1e-4)


def test_student_learns_from_topk_labels():
    """On separable data a student trained only on stored top-1/top-2 labels of a teacher
    recovers the teacher's decisions far above chance."""
    g = torch.Generator().manual_seed(0)
    n = 60
    y = torch.arange(n) % V
    protos = torch.randn((V, C, H, W), generator=g) * 2
    x = protos[y] + 0.3 * torch.randn((n, C, H, W), generator=g)
    yt = torch.arange(200) % V
    xt = protos[yt] + 0.3 * torch.randn((200, C, H, W), generator=g)
    d = SimpleNamespace(name="tiny", channels=C, num_classes=V, im_size=(H, W),
                        test_images=xt, test_labels=yt)

    class Oracle(nn.Module):  # nearest prototype, logits = -distance
        def forward(self, z):
            return -torch.cdist(z.flatten(1), protos.flatten(1))

    rs = R.relabel(x, Oracle().eval(), k=2, seed=0, epochs=8, batch_size=20,
                   crop_scale=(0.8, 1.0), flip=False)
    out = R.train_on_relabel(rs, x, "convnet", d, temperature=1.0, seed=0)
    assert out["test_accuracy"] > 0.6
    hard = R.train_hard(x, y, "convnet", d, epochs=8, batch_size=20, relabel_seed=0,
                        crop_scale=(0.8, 1.0), flip=False, seed=0)
    assert hard["test_accuracy"] > 0.6


# ------------------------------------------------------------------------------- CLI

def test_cli_relabel(tmp_path, capsys):
    import json
    from pydistill_ext import artifacts as art
    from pydistill_ext.cli import main
    from pydistill_ext.data import load_dataset
    from pydistill_ext.methods.squeeze import train_teacher
    d = load_dataset("digits")
    train_teacher(d, epochs=1, train_subset=64, seed=0, out_dir=tmp_path / "teacher")
    art.save_distilled(tmp_path / "set" / art.DISTILLED_FILE,
                       art.DistilledSet(d.train_images[:20], d.train_labels[:20]))
    argv = ["relabel", str(tmp_path / "set"), "--teacher", str(tmp_path / "teacher"),
            "--dataset", "digits", "--epochs", "2", "--batch-size", "8", "--k", "3",
            "--out", str(tmp_path / "rl"), "--repeats", "1", "--quiet"]
    assert main(argv) == 0
    rs = R.load_relabel(tmp_path / "rl")
    assert rs.k == 3 and rs.epochs == 2 and rs.num_images == 20
    assert "flip" not in rs.plan  # digits: no flip by default
    info = json.loads((tmp_path / "rl" / "relabel.json").read_text())
    assert info["storage"]["soft_labels"] == 2 * 20 * 3 * 3
    assert len(info["accuracies"]) == 1 and 0 <= info["accuracies"][0] <= 1
    capsys.readouterr()
    bad = [a if a != "3" else "11" for a in argv[:-3]]  # --k 11, no students
    assert main(bad) == 2
    assert "k=11 exceeds the teacher's 10 classes" in capsys.readouterr().err


def test_plan_saved_as_seed(tmp_path, monkeypatch):
    rs = R.relabel(_images(), _teacher(), k=2, seed=4, mix="cutmix", **KW)
    full = R.save_relabel(tmp_path / "full", rs)
    small = R.save_relabel(tmp_path / "small", rs, store_plan=False)
    s = rs.storage_bytes()
    assert os.path.getsize(full) - os.path.getsize(small) >= s["augmentation"]
    assert os.path.getsize(small) < s["soft_labels"] + 4096
    back = R.load_relabel(small)
    assert back.plan.keys() == rs.plan.keys()
    assert all(torch.equal(back.plan[k], rs.plan[k]) for k in rs.plan)
    assert back.meta == rs.meta and torch.equal(back.values, rs.values)
    # a generator that draws other numbers (another torch version) is detected on load
    real = R.make_plan
    monkeypatch.setattr(R, "make_plan", lambda *a, **k: {**real(*a, **k),
                                                         "perm": real(*a, **k)["perm"].flip(1)})
    with pytest.raises(ValueError, match="does not match the stored sha256"):
        R.load_relabel(small)
    monkeypatch.setattr(R, "make_plan", real)
    rs.plan["box"] = rs.plan["box"].clone()
    rs.plan["box"][0, 0, 0] += 1  # a hand-edited plan cannot be saved as a seed
    with pytest.raises(ValueError, match="store_plan=True"):
        R.save_relabel(tmp_path / "edited", rs, store_plan=False)
