"""ZeroQ distilled data on sklearn digits: the loss equals the anchor's formula (conv-output
hooks, own_loss), falls, the plateau scheduler and resume are exact, options are checked, and
the set calibrates a quantized teacher through the CLI."""
import json

import pytest
import torch
from torch import nn

from pydistill_ext.artifacts import load_distilled
from pydistill_ext.cli import main as cli_main
from pydistill_ext.data import load_dataset
from pydistill_ext.methods import get_method, list_methods, run_distill
from pydistill_ext.methods.zeroq import zeroq_input_loss


def _anchor_loss(teacher, x):
    """distill_data.py's loss, written out: hooks on the first L Conv2d outputs paired with
    the L BN layers by order, per-sample mean / sqrt(unbiased var + eps), own_loss = ||A-B||^2/N,
    plus the input mean/std term."""
    eps = 1e-6
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in teacher.modules() if isinstance(m, nn.Conv2d)][:len(bns)]
    outs = []
    hs = [c.register_forward_hook(lambda m, i, o: outs.append(o)) for c in convs]
    teacher(x)
    for h in hs:
        h.remove()

    def own(a, b):
        return (a - b).norm() ** 2 / b.size(0)

    total = 0.0
    for bn, o in zip(bns, outs):
        f = o.reshape(o.size(0), o.size(1), -1)
        total = total + own(bn.running_mean, f.mean(2)) + \
            own(torch.sqrt(bn.running_var + eps), torch.sqrt(f.var(2) + eps))
    f = x.reshape(x.size(0), x.size(1), -1)
    c = x.size(1)
    total = total + own(torch.zeros(1, c), f.mean(2)) + own(torch.ones(1, c), torch.sqrt(f.var(2) + eps))
    return total


def test_registered():
    assert "zeroq" in list_methods()


def test_loss_equals_anchor_formula(digits, teacher_dir):
    m = get_method("zeroq")(digits, 1, 0, teacher=str(teacher_dir), batch_size=7)
    assert [x.shape[0] for x in m.images] == [7, 3]
    m2 = get_method("zeroq")(digits, 1, 0, teacher=str(teacher_dir), batch_size=32, images=64)
    assert [x.shape[0] for x in m2.images] == [32, 32]
    x = m.images[0]
    total, bn, inp = m.batch_loss(x)
    want = _anchor_loss(m.teacher, x.detach())
    assert float(total.detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(inp.detach()) == pytest.approx(float(zeroq_input_loss(x.detach())), rel=1e-6)
    # the gradient is the anchor's too
    g = torch.autograd.grad(total, x)[0]
    xa = x.detach().clone().requires_grad_(True)
    ga = torch.autograd.grad(_anchor_loss(m.teacher, xa), xa)[0]
    torch.testing.assert_close(g, ga, rtol=1e-4, atol=1e-6)


def test_loss_falls_and_set(digits, teacher_dir, tmp_path):
    run_distill("zeroq", digits, ipc=2, seed=0, iterations=40, out_dir=tmp_path, progress=False,
                options={"teacher": str(teacher_dir), "batch_size": 10})
    h = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert h["loss"][-1] < 0.3 * h["loss"][0], (h["loss"][:2], h["loss"][-2:])
    assert h["bn"][-1] < 0.3 * h["bn"][0]
    syn = load_distilled(tmp_path / "distilled.safetensors")
    assert syn.images.shape == (20, 1, 8, 8) and torch.isfinite(syn.images).all()
    assert syn.labels.min() >= 0 and syn.labels.max() < 10
    # per-image channel statistics pulled to 0 / 1 (the input term)
    f = syn.images.flatten(1)
    assert f.mean(1).abs().max() < 0.3 and (f.std(1) - 1).abs().max() < 0.3


def test_init_gaussian_vs_anchor(digits, teacher_dir):
    g = get_method("zeroq")(digits, 5, 0, teacher=str(teacher_dir))
    a = get_method("zeroq")(digits, 5, 0, teacher=str(teacher_dir), init="anchor")
    xg, xa = torch.cat([x.detach() for x in g.images]), torch.cat([x.detach() for x in a.images])
    assert float(xg.std()) == pytest.approx(1.0, abs=0.05)
    assert float(xa.std()) == pytest.approx(73.6 / 5418.75, rel=0.05)  # the released code's bug
    assert float(xa.abs().max()) <= 127.5 / 5418.75 + 1e-6


def test_plateau_scheduler_lowers_lr(digits, teacher_dir):
    # lr 2 overshoots at once: with patience 0 every worse step divides lr by 10, down to min_lr
    m = get_method("zeroq")(digits, 1, 0, teacher=str(teacher_dir), patience=0, lr=2.0,
                            batch_size=10)
    lrs = [m.step(i)["lr"] for i in range(12)]
    assert lrs[0] == 2.0 and lrs[-1] == pytest.approx(1e-4)
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_resume_is_exact(digits, teacher_dir, tmp_path):
    opts = {"teacher": str(teacher_dir), "batch_size": 6, "patience": 0}
    run_distill("zeroq", digits, ipc=1, seed=3, iterations=12, out_dir=tmp_path / "a",
                options=opts, progress=False)
    run_distill("zeroq", digits, ipc=1, seed=3, iterations=12, out_dir=tmp_path / "b",
                options=opts, progress=False, stop_after=5)
    run_distill("zeroq", digits, ipc=1, seed=3, iterations=12, out_dir=tmp_path / "b",
                options=opts, progress=False, resume=True)
    a = load_distilled(tmp_path / "a" / "distilled.safetensors")
    b = load_distilled(tmp_path / "b" / "distilled.safetensors")
    assert torch.equal(a.images, b.images)
    ha = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    hb = json.loads((tmp_path / "b" / "metrics.json").read_text())["history"]
    assert ha["lr"] == hb["lr"] and min(ha["lr"]) < 0.5  # the scheduler state travelled


@pytest.mark.parametrize("opts,match", [
    ({}, "teacher=PATH"),
    ({"init": "uniform"}, "init"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": 0.0}, "lr"),
    ({"patience": -1}, "patience"),
    ({"images": 0}, "images"),
    ({"cheese": 1}, "no option"),
])
def test_bad_options(digits, teacher_dir, opts, match):
    if opts and "cheese" not in opts:
        opts = {"teacher": str(teacher_dir), **opts}
    with pytest.raises(ValueError, match=match):
        get_method("zeroq")(digits, 1, 0, **opts)


def test_wrong_teacher_shape(teacher_dir):
    other = load_dataset("digits")
    other.im_size = (28, 28)
    with pytest.raises(ValueError, match="was trained for"):
        get_method("zeroq")(other, 1, 0, teacher=str(teacher_dir))


def test_cli_distill_then_calibrate(digits, teacher_dir, tmp_path):
    assert cli_main(["distill", "--method", "zeroq", "--dataset", "digits", "--ipc", "2",
                     "--iterations", "30", "--option", f"teacher={teacher_dir}",
                     "--out", str(tmp_path / "d"), "--quiet"]) == 0
    from pydistill_ext.evaluation.protocol import test_accuracy
    from pydistill_ext.methods.squeeze import load_teacher
    from pydistill_ext.quant import quantize_model
    syn = load_distilled(tmp_path / "d" / "distilled.safetensors")
    net = load_teacher(teacher_dir)
    fp = test_accuracy(net, digits.test_images, digits.test_labels)
    q8 = test_accuracy(quantize_model(net, syn.images, weight_bits=8, act_bits=8),
                       digits.test_images, digits.test_labels)
    assert q8 >= fp - 0.02
    # the same through `pydistill quantize`
    out = tmp_path / "q.json"
    assert cli_main(["quantize", "--teacher", str(teacher_dir), "--dataset", "digits",
                     "--calibration", str(tmp_path / "d" / "distilled.safetensors"),
                     "--weight-bits", "8", "--act-bits", "8", "--out", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["quantized_accuracy"] == pytest.approx(q8) and r["calibration_images"] == 20
    assert cli_main(["quantize", "--teacher", str(teacher_dir), "--dataset", "digits",
                     "--calibration", "noise", "--weight-bits", "1", "--quiet"]) == 2
