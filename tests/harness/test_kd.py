"""The Hinton KD recipe: loss formula against the float64 oracle, training, resume, CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

from pydistill_ext.data import load_dataset
from pydistill_ext.methods import KDConfig, hinton_kd_loss, train_student
from pydistill_ext.models import get_model
from reference.kd_loss import kd_loss as ref_kd_loss


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_hinton_loss_matches_formula(alpha, divergence):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=gen)
    T = 3.0
    got = hinton_kd_loss(s, t, y, alpha=alpha, temperature=T, divergence=divergence)
    want = alpha * F.cross_entropy(s, y) + (1 - alpha) * T * T * ref_kd_loss(
        s, t, divergence=divergence, temperature=T, reduction="batchmean")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g, = torch.autograd.grad(got, s)
    w, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_hinton_loss_needs_teacher():
    with pytest.raises(ValueError, match="teacher_logits"):
        hinton_kd_loss(torch.zeros(2, 3), None, torch.zeros(2, dtype=torch.long), alpha=0.5,
                       temperature=2.0)
    with pytest.raises(ValueError, match="alpha"):
        KDConfig(alpha=1.5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _student(ds, seed=0):
    return get_model("convnet-small", ds.channels, ds.num_classes, ds.im_size, seed=seed)


def test_kd_training_learns_and_resume_is_exact(digits, tmp_path):
    teacher = _student(digits, seed=9)
    train_student(teacher, digits.train_images, digits.train_labels,
                  KDConfig(epochs=3, alpha=1.0, batch_size=64), seed=9)
    with torch.no_grad():
        t_logits = teacher(digits.train_images)
    cfg = KDConfig(epochs=3, alpha=0.1, temperature=4.0, batch_size=64)
    test = (digits.test_images, digits.test_labels)
    a = _student(digits)
    ha = train_student(a, digits.train_images, digits.train_labels, cfg, 0,
                       soft_targets=t_logits, test=test)
    assert ha["test_acc"][-1] > 0.7
    b = _student(digits)
    ck = tmp_path / "ck.pt"
    train_student(b, digits.train_images, digits.train_labels, cfg, 0, soft_targets=t_logits,
                  test=test, checkpoint_path=ck, stop_after_epochs=1)
    b = _student(digits, seed=123)  # a fresh process would rebuild it: state comes from ck
    hb = train_student(b, digits.train_images, digits.train_labels, cfg, 0,
                       soft_targets=t_logits, test=test, checkpoint_path=ck)
    assert ha["test_acc"] == hb["test_acc"] and ha["train_loss"] == hb["train_loss"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_kd_cli_with_third_party_teacher(tmp_path):
    from pydistill_ext import cli
    try:
        from pydistill_ext.models import load_digit_recognizer_teacher
        load_digit_recognizer_teacher()
    except ImportError as e:
        pytest.skip(str(e))
    try:
        load_dataset("mnist")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert cli.main(["kd", "--dataset", "mnist", "--epochs", "1", "--seeds", "0",
                     "--train-subset", "600", "--out", str(tmp_path), "--quiet"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["teacher_test_accuracy"] > 0.98
    assert m["train_images"] == 600
    assert set(m["summary"]) == {"kd", "no_kd"}
    for v in m["summary"].values():
        assert 0.1 < v["mean"] <= 1.0
    assert m["student_parameters"] * 5 < m["teacher_parameters"]
    assert (tmp_path / "curves.png").exists()
