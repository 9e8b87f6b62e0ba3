"""The `pydistill` command line end to end on `digits`, resume, and torchrun evaluation."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from pydistill_ext import cli
from pydistill_ext.artifacts import DistilledSet, load_distilled
from pydistill_ext.methods import DistillMethod, register_method, unregister_method


def run(argv):
    assert cli.main(argv) == 0


def test_baseline_then_eval(tmp_path, capsys):
    out = tmp_path / "rand"
    run(["baseline", "--kind", "random", "--dataset", "digits", "--ipc", "5", "--seed", "1",
         "--out", str(out), "--quiet"])
    for name in ("distilled.safetensors", "metrics.json", "grid.png"):
        assert (out / name).stat().st_size > 0
    syn = load_distilled(out / "distilled.safetensors")
    assert syn.images.shape[0] == 50 and syn.images.dtype == torch.float32
    assert syn.labels.dtype == torch.int64
    run(["eval", str(out / "distilled.safetensors"), "--dataset", "digits", "--model",
         "convnet-small", "--epochs", "20", "--repeats", "2", "--augment", "none", "--quiet"])
    rec = json.loads((out / "eval_convnet-small.json").read_text())
    assert rec["seeds"] == [0, 1] and len(rec["accuracies"]) == 2
    assert 0.4 < rec["mean"] <= 1.0   # chance is 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluation"]["convnet-small"]["mean"] == rec["mean"]
    assert metrics["config"]["seed"] == 1 and metrics["versions"]["torch"] == torch.__version__
    assert "digits | random | 50 images" in capsys.readouterr().out
    # cross-architecture: several models in one call; a directory path writes beside the set
    run(["eval", str(out), "--dataset", "DIGITS", "--model", "mlp", "resnet-small", "--epochs",
         "2", "--repeats", "1", "--augment", "none", "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["evaluation"]) == {"convnet-small", "mlp", "resnet-small"}


def test_method_list_and_errors(tmp_path, capsys):
    run(["distill", "--method", "list"])
    listed = capsys.readouterr().out
    for name in ("random", "herding", "full"):
        assert name in listed
    assert cli.main(["distill", "--method", "nope", "--dataset", "digits", "--ipc", "1",
                     "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli.main(["baseline", "--kind", "random", "--dataset", "imagenet", "--ipc", "1",
                     "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mnist" in err and "digits" in err   # lists the known datasets


def test_eval_rejects_other_dataset(tmp_path):
    run(["baseline", "--kind", "random", "--dataset", "digits", "--ipc", "1", "--out",
         str(tmp_path), "--quiet"])
    import numpy as np
    gen = np.random.default_rng(0)
    other = tmp_path / "other.npz"   # same image shape, another dataset
    np.savez(other, images=gen.integers(0, 255, (40, 8, 8), dtype=np.uint8),
             labels=np.arange(40) % 10)
    with pytest.raises(SystemExit, match="'digits', not 'other'"):
        cli.main(["eval", str(tmp_path), "--dataset", str(other), "--epochs", "1"])


class ToyMatch(DistillMethod):
    """A test-only method with every ingredient resume must get right: images and labels
    state, an Adam optimiser, a generator drawing minibatches and noise each step."""
    name = "toy-match"
    default_iterations = 6

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        super().__init__(dataset, ipc, seed, device, **options)
        self.gen = torch.Generator().manual_seed(seed)
        n = ipc * dataset.num_classes
        self.images = torch.randn(n, dataset.channels, *dataset.im_size, generator=self.gen)
        self.images.requires_grad_(True)
        self.labels = torch.arange(dataset.num_classes).repeat_interleave(ipc)
        self.opt = torch.optim.Adam([self.images], lr=0.1)

    def step(self, it):
        idx = torch.randint(0, self.dataset.train_images.shape[0], (64,), generator=self.gen)
        x, y = self.dataset.train_images[idx], self.dataset.train_labels[idx]
        noise = 0.01 * torch.randn(self.images.shape, generator=self.gen)
        loss = 0.0
        for c in range(self.dataset.num_classes):
            if (y == c).any():
                target = x[y == c].mean(0)
                loss = loss + ((self.images[self.labels == c] + noise[self.labels == c])
                               .mean(0) - target).pow(2).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if it == getattr(self, "interrupt_at", -1):
            os.kill(os.getpid(), signal.SIGINT)
        return {"loss": float(loss.detach())}

    def synthetic_set(self):
        return DistilledSet(self.images.detach().clone(), self.labels.clone(), {})

    def state_dict(self):
        return {"images": self.images.detach(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state()}

    def load_state_dict(self, s):
        with torch.no_grad():
            self.images.copy_(s["images"])
        self.opt.load_state_dict(s["opt"])
        self.gen.set_state(s["gen"])


@pytest.fixture
def toy_method():
    register_method(ToyMatch)
    yield ToyMatch
    unregister_method("toy-match")


def _distill(out, *extra):
    return cli.main(["distill", "--method", "toy-match", "--dataset", "digits", "--ipc", "2",
                     "--seed", "4", "--out", str(out), "--quiet", *extra])


def test_resume_equals_uninterrupted(tmp_path, toy_method):
    assert _distill(tmp_path / "full") == 0
    assert _distill(tmp_path / "split", "--stop-after", "2") == 0
    assert (tmp_path / "split" / "checkpoint.pt").exists()
    assert not (tmp_path / "split" / "distilled.safetensors").exists()
    assert _distill(tmp_path / "split", "--stop-after", "1", "--resume") == 0
    assert _distill(tmp_path / "split", "--resume") == 0
    a = load_distilled(tmp_path / "full")
    b = load_distilled(tmp_path / "split")
    assert torch.equal(a.images, b.images)
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert ma["history"]["loss"] == mb["history"]["loss"]
    assert len(ma["history"]["loss"]) == 6
    assert (tmp_path / "full" / "curves.png").exists()
    assert not (tmp_path / "split" / "checkpoint.pt").exists()
    # a checkpoint made with another configuration is refused
    assert _distill(tmp_path / "other", "--stop-after", "1") == 0
    assert cli.main(["distill", "--method", "toy-match", "--dataset", "digits", "--ipc", "3",
                     "--out", str(tmp_path / "other"), "--resume", "--quiet"]) == 2


def test_ctrl_c_checkpoints_after_the_step(tmp_path, toy_method, monkeypatch):
    assert _distill(tmp_path / "full") == 0
    monkeypatch.setattr(ToyMatch, "interrupt_at", 2, raising=False)
    with pytest.raises(KeyboardInterrupt):
        _distill(tmp_path / "cut")
    monkeypatch.setattr(ToyMatch, "interrupt_at", -1, raising=False)
    assert _distill(tmp_path / "cut", "--resume") == 0
    assert torch.equal(load_distilled(tmp_path / "full").images,
                       load_distilled(tmp_path / "cut").images)


def _torchrun_eval(args, out):
    # PYTHONFAULTHANDLER: a rank killed by SIGABRT / SIGSEGV prints its Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "pydistill_ext.cli", "eval", *args,
                           "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_match_one(tmp_path):
    run(["baseline", "--kind", "random", "--dataset", "digits", "--ipc", "3", "--out",
         str(tmp_path), "--quiet"])
    args = [str(tmp_path / "distilled.safetensors"), "--dataset", "digits", "--model",
            "convnet-small", "--epochs", "3", "--repeats", "3", "--augment", "dsa", "--quiet"]
    # (a rank that aborted at exit here once was gloo's worker thread freeing the tensors of
    # all_gather_object during interpreter shutdown; the ranks now exchange rows via the store)
    proc = _torchrun_eval(args, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    two = json.loads((tmp_path / "two" / "eval_convnet-small.json").read_text())
    assert two["processes"] == 2 and two["seeds"] == [0, 1, 2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same thread count as the ranks: identical float results
    try:
        run(["eval", *args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    one = json.loads((tmp_path / "one" / "eval_convnet-small.json").read_text())
    assert one["processes"] == 1
    assert one["accuracies"] == two["accuracies"]


def test_module_entry_point_info():
    proc = subprocess.run([sys.executable, "-m", "pydistill_ext.cli", "info"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kd_loss" in proc.stdout


def test_eval_resume_skips_finished_repeats(tmp_path, monkeypatch):
    import pydistill_ext.evaluation as ev
    run(["baseline", "--kind", "random", "--dataset", "digits", "--ipc", "2", "--out",
         str(tmp_path), "--quiet"])
    args = ["eval", str(tmp_path), "--dataset", "digits", "--model", "convnet-small",
            "--epochs", "3", "--repeats", "3", "--augment", "dsa", "--quiet"]
    run(args + ["--out", str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "whole" / "eval_convnet-small.json").read_text())

    real = ev.evaluate_synset
    calls = []

    def interrupted(*a, on_result=None, seeds=(), **k):
        calls.append(list(seeds))

        def stop_after_first(seed, acc, secs):
            on_result(seed, acc, secs)
            raise KeyboardInterrupt
        return real(*a, on_result=stop_after_first, seeds=seeds, **k)

    monkeypatch.setattr(ev, "evaluate_synset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(ev, "evaluate_synset",
                        lambda *a, seeds=(), **k: calls.append(list(seeds)) or real(*a, seeds=seeds, **k))
    run(args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert calls == [[0, 1, 2], [1, 2]]
    cut = json.loads((tmp_path / "cut" / "eval_convnet-small.json").read_text())
    assert cut["accuracies"] == whole["accuracies"] and cut["seeds"] == [0, 1, 2]
    assert not list((tmp_path / "cut").glob(".eval_*partial*"))


def test_zca_sets_evaluate_in_zca_space(tmp_path):
    from pydistill_ext.data import load_dataset
    run(["baseline", "--kind", "random", "--dataset", "digits", "--ipc", "2", "--zca",
         "--out", str(tmp_path), "--quiet"])
    syn = load_distilled(tmp_path)
    assert syn.meta["dataset"]["zca"] is True
    plain = load_dataset("digits")
    white = load_dataset("digits", zca=True)
    idx = torch.tensor(syn.meta["indices"])
    torch.testing.assert_close(syn.images, white.train_images[idx])
    # un-whitened for viewing: back to the real pixels
    torch.testing.assert_close(white.to_pixels(syn.images), plain.to_pixels(plain.train_images[idx]),
                               atol=1e-4, rtol=0)
    run(["eval", str(tmp_path), "--dataset", "digits", "--model", "convnet-small", "--epochs",
         "2", "--repeats", "1", "--augment", "none", "--quiet"])
    assert json.loads((tmp_path / "eval_convnet-small.json").read_text())["images"] == 20
