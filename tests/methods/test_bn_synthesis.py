"""squeeze (BN teacher) and the BN-statistic synthesis methods on sklearn digits: each lowers
its loss in a few iterations, resumes exactly, and rejects bad options clearly."""
import json
import math

import pytest
import torch

from pydistill_ext.artifacts import load_distilled
from pydistill_ext.cli import main as cli_main
from pydistill_ext.data import load_dataset
from pydistill_ext.methods import get_method, run_distill
from pydistill_ext.methods.bn_synthesis import BNSynthesis, image_prior_losses
from pydistill_ext.methods.squeeze import load_teacher, train_teacher


def test_squeeze_resume_refuses_other_config(digits, tmp_path):
    train_teacher(digits, epochs=1, train_subset=100, out_dir=tmp_path)
    with pytest.raises(ValueError, match="resume"):
        train_teacher(digits, epochs=2, train_subset=100, out_dir=tmp_path, resume=True)


def test_squeeze_resume_after_interrupt(digits, tmp_path, monkeypatch):
    ref = train_teacher(digits, epochs=2, train_subset=300, out_dir=tmp_path / "ref")
    import pydistill_ext.methods.squeeze as sq
    real_save = sq.art.save_checkpoint
    calls = {"n": 0}

    def save_then_stop(path, state):
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sq.art, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(digits, epochs=2, train_subset=300, out_dir=tmp_path / "int")
    monkeypatch.setattr(sq.art, "save_checkpoint", real_save)
    resumed = train_teacher(digits, epochs=2, train_subset=300, out_dir=tmp_path / "int",
                            resume=True)
    a, b = load_teacher(tmp_path / "ref"), load_teacher(tmp_path / "int")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert resumed["history"]["train_loss"] == ref["history"]["train_loss"]


@pytest.mark.parametrize("method,extra", [
    ("deepinversion", {}), ("sre2l", {}), ("cda", {}), ("cvdd", {"committee": 2, "init": "noise"}),
])
def test_method_lowers_loss(digits, teacher_dir, tmp_path, method, extra):
    opts = {"teacher": str(teacher_dir), **extra}
    if method == "cvdd":
        opts = {"teachers": f"{teacher_dir},{teacher_dir}", **extra}
    run_distill(method, digits, ipc=2, seed=0, iterations=40, out_dir=tmp_path, options=opts,
                progress=False)
    h = json.loads((tmp_path / "metrics.json").read_text())["history"]
    first = sum(h["loss"][:3]) / 3
    last = sum(h["loss"][-3:]) / 3
    assert last < 0.8 * first, (h["loss"][:3], h["loss"][-3:])
    syn = load_distilled(tmp_path / "distilled.safetensors")
    assert syn.images.shape == (20, 1, 8, 8) and torch.isfinite(syn.images).all()
    assert syn.labels.tolist() == torch.arange(10).repeat_interleave(2).tolist()


def test_cvdd_real_init(digits, teacher_dir):
    m = get_method("cvdd")(digits, 2, 0, teachers=f"{teacher_dir},{teacher_dir}")
    rows = digits.train_images.flatten(1)
    for img, lab in zip(m.images.detach(), m.labels):
        hit = (rows == img.flatten()).all(1).nonzero().flatten()
        assert len(hit) >= 1 and int(digits.train_labels[hit[0]]) == int(lab)


def test_deepinversion_bn_term_falls(digits, teacher_dir, tmp_path):
    run_distill("deepinversion", digits, ipc=2, seed=0, iterations=25, out_dir=tmp_path,
                options={"teacher": str(teacher_dir)}, progress=False)
    h = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert h["bn"][-1] < 0.5 * h["bn"][0]


def test_adi_competition_runs(digits, teacher_dir, tmp_path):
    run_distill("deepinversion", digits, ipc=1, seed=0, iterations=3, out_dir=tmp_path,
                options={"teacher": str(teacher_dir), "adi_scale": 0.2,
                         "student": str(teacher_dir)}, progress=False)
    with pytest.raises(ValueError, match="student=PATH"):
        get_method("deepinversion")(digits, 1, 0, teacher=str(teacher_dir), adi_scale=0.2)


def test_resume_is_exact(digits, teacher_dir, tmp_path):
    opts = {"teacher": str(teacher_dir), "ema_momentum": 0.8}
    run_distill("cda", digits, ipc=1, seed=3, iterations=8, out_dir=tmp_path / "a",
                options=opts, progress=False)
    run_distill("cda", digits, ipc=1, seed=3, iterations=8, out_dir=tmp_path / "b",
                options=opts, progress=False, stop_after=3)
    run_distill("cda", digits, ipc=1, seed=3, iterations=8, out_dir=tmp_path / "b",
                options=opts, progress=False, resume=True)
    a = load_distilled(tmp_path / "a" / "distilled.safetensors")
    b = load_distilled(tmp_path / "b" / "distilled.safetensors")
    assert torch.equal(a.images, b.images)


def test_cda_curriculum_schedule(digits, teacher_dir):
    m = get_method("cda")(digits, 1, 0, teacher=str(teacher_dir))
    m.set_total_iterations(100)
    vals = [m._crop_scale_min(t) for t in (0, 50, 100, 150)]
    assert vals[0] == pytest.approx(1.0) and vals[1] == pytest.approx(0.08 + 0.92 / 2)
    assert vals[2] == pytest.approx(0.08) and vals[3] == pytest.approx(0.08)


def test_image_priors_match_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    tv_l2, tv_l1 = image_prior_losses(x)
    want = 0.0
    for dh, dw in ((0, 1), (1, 0), (1, -1), (1, 1)):
        # explicit loops: difference x[i, j] - x[i + dh, j + dw] wherever both exist
        s = 0.0
        for i in range(5):
            for j in range(4):
                i2, j2 = i + dh, j + dw
                if 0 <= i2 < 5 and 0 <= j2 < 4:
                    s = s + (x[:, :, i, j] - x[:, :, i2, j2]).pow(2).sum()
        want = want + math.sqrt(float(s))
    assert float(tv_l2) == pytest.approx(want, rel=1e-12)
    assert float(tv_l1) > 0


def test_errors(digits, teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="teacher=PATH"):
        get_method("sre2l")(digits, 1, 0)
    with pytest.raises(FileNotFoundError, match="pydistill squeeze"):
        get_method("sre2l")(digits, 1, 0, teacher=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="crop"):
        get_method("sre2l")(digits, 1, 0, teacher=str(teacher_dir), crop="big")
    mnist_like = load_dataset("digits")
    mnist_like.im_size = (28, 28)  # a teacher for 8x8 images must be refused
    with pytest.raises(ValueError, match="was trained for"):
        get_method("sre2l")(mnist_like, 1, 0, teacher=str(teacher_dir))
    assert issubclass(get_method("cvdd"), BNSynthesis)


def test_cli_squeeze_and_distill(tmp_path):
    assert cli_main(["squeeze", "--dataset", "digits", "--epochs", "1", "--train-subset", "200",
                     "--out", str(tmp_path / "t"), "--quiet"]) == 0
    assert cli_main(["distill", "--method", "sre2l", "--dataset", "digits", "--ipc", "1",
                     "--iterations", "3", "--option", f"teacher={tmp_path / 't'}",
                     "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert (tmp_path / "d" / "distilled.safetensors").exists()
