"""Evaluation protocol and baselines on the tiny real `digits` set."""
import pytest
import torch

from pydistill_ext.artifacts import DistilledSet, load_distilled, save_distilled
from pydistill_ext.data import load_dataset
from pydistill_ext.evaluation import (EvalConfig, evaluate_models, evaluate_synset, full_data,
                                      herding, herding_indices, make_baseline, random_subset,
                                      train_network)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_random_subset_per_class_and_seeded(digits):
    a = random_subset(digits, 3, seed=1)
    b = random_subset(digits, 3, seed=1)
    c = random_subset(digits, 3, seed=2)
    assert a.images.shape == (30, digits.channels, *digits.im_size)
    assert torch.equal(torch.bincount(a.labels, minlength=10), torch.full((10,), 3))
    assert torch.equal(a.images, b.images) and a.meta["indices"] == b.meta["indices"]
    assert a.meta["indices"] != c.meta["indices"]
    # the images are real training images with their own labels
    idx = torch.tensor(a.meta["indices"])
    assert torch.equal(a.images, digits.train_images[idx])
    assert torch.equal(a.labels, digits.train_labels[idx])


def test_random_subset_does_not_touch_global_rng(digits):
    state = torch.get_rng_state()
    random_subset(digits, 2, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_ipc_validation(digits):
    with pytest.raises(ValueError, match="ipc"):
        random_subset(digits, 0)
    with pytest.raises(ValueError, match="exceeds"):
        random_subset(digits, 10_000)
    with pytest.raises(ValueError, match="unknown baseline kind.*random"):
        make_baseline("kmeans", digits, 1)


def test_herding_indices_greedy_definition():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    got = herding_indices(f, 6).tolist()
    mu, chosen = f.mean(0), []
    for t in range(6):  # brute force the definition
        best = min((i for i in range(40) if i not in chosen),
                   key=lambda i: float((f[chosen + [i]].mean(0) - mu).norm()))
        chosen.append(best)
    assert got == chosen
    assert len(set(got)) == 6


def test_herding_mean_closer_than_random(digits):
    h = herding(digits, 5)
    r = random_subset(digits, 5, seed=0)
    for c in range(10):
        mu = digits.train_images[digits.train_labels == c].flatten(1).mean(0)
        dh = (h.images[h.labels == c].flatten(1).mean(0) - mu).norm()
        dr = (r.images[r.labels == c].flatten(1).mean(0) - mu).norm()
        assert dh < dr


def test_full_data(digits):
    f = full_data(digits)
    assert len(f) == digits.train_images.shape[0]


def test_training_is_deterministic_and_learns(digits):
    syn = random_subset(digits, 10, seed=0)
    cfg = EvalConfig(model="convnet-small", epochs=40, batch_size=64, augment="none")
    r1 = evaluate_synset(syn.images, syn.labels, digits, cfg, seeds=[3])
    r2 = evaluate_synset(syn.images, syn.labels, digits, cfg, seeds=[3])
    assert r1.accuracies == r2.accuracies
    assert r1.mean > 0.6  # 10 classes: chance is 0.1
    m1 = train_network(syn.images, syn.labels, digits, cfg, 5)
    m2 = train_network(syn.images, syn.labels, digits, cfg, 5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_dsa_augmented_training_is_seeded(digits):
    syn = random_subset(digits, 5, seed=0)
    cfg = EvalConfig(model="convnet-small", epochs=5, batch_size=32, augment="dsa")
    state = torch.get_rng_state()
    a = train_network(syn.images, syn.labels, digits, cfg, 1)
    b = train_network(syn.images, syn.labels, digits, cfg, 1)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_soft_labels_train_through_kd_loss(digits):
    syn = random_subset(digits, 10, seed=0)
    soft = torch.nn.functional.one_hot(syn.labels, 10).float() * 6.0  # logits
    cfg = EvalConfig(model="convnet-small", epochs=40, batch_size=64, augment="none")
    res = evaluate_synset(syn.images, soft, digits, cfg, seeds=[0])
    assert res.mean > 0.6


def test_mean_std_and_cross_architecture(digits):
    syn = random_subset(digits, 2, seed=0)
    cfg = EvalConfig(epochs=2, batch_size=64, augment="none")
    out = evaluate_models(syn.images, syn.labels, digits, ["convnet-small", "mlp"], cfg,
                          seeds=[0, 1])
    assert set(out) == {"convnet-small", "mlp"}
    for r in out.values():
        assert len(r.accuracies) == 2 and all(0 <= a <= 1 for a in r.accuracies)
        assert r.std == pytest.approx(abs(r.accuracies[0] - r.accuracies[1]) / 2)


def test_bad_sets_are_rejected(digits):
    x = torch.zeros(4, 1, 5, 5)
    with pytest.raises(ValueError, match="shape"):
        evaluate_synset(x, torch.zeros(4, dtype=torch.long), digits, EvalConfig(epochs=1))
    x = torch.zeros(4, digits.channels, *digits.im_size)
    with pytest.raises(ValueError, match="out of range"):
        evaluate_synset(x, torch.full((4,), 10), digits, EvalConfig(epochs=1))
    with pytest.raises(ValueError, match="3 labels"):
        evaluate_synset(x, torch.zeros(3, dtype=torch.long), digits, EvalConfig(epochs=1))
    with pytest.raises(ValueError, match="augment"):
        EvalConfig(augment="mixup")
    with pytest.raises(ValueError, match="epochs"):
        EvalConfig(epochs=0)


def test_distilled_roundtrip(tmp_path, digits):
    syn = random_subset(digits, 2, seed=0)
    syn.extras["syn_lr"] = torch.tensor(0.01)
    save_distilled(tmp_path / "d.safetensors", syn)
    back = load_distilled(tmp_path / "d.safetensors")
    assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
    assert back.meta["method"] == "random" and back.meta["dataset"]["name"] == "digits"
    assert float(back.extras["syn_lr"]) == pytest.approx(0.01)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_distilled(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_distilled(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        DistilledSet(torch.full((1, 1, 2, 2), float("nan")), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("chunk", [None, 7])
def test_compiled_training_matches_eager(digits, chunk):
    # compile=True trains the same parameters through torch.compile(model): only the rounding
    # order may differ, so after a few DSA-augmented epochs (two batch shapes: 32 and the
    # remainder 18) the weights agree to float32 rounding, also when each minibatch's gradient
    # is summed over 7-row pieces.
    syn = random_subset(digits, 5, seed=0)
    eager = EvalConfig(model="convnet-small", epochs=3, batch_size=32, augment="dsa")
    compiled = EvalConfig(**{**eager.to_dict(), "compile": True, "chunk": chunk})
    from torch._dynamo.utils import counters
    torch._dynamo.reset()   # graphs cached by earlier tests would otherwise be reused silently
    counters.clear()
    a = train_network(syn.images, syn.labels, digits, eager, 2)
    assert counters["stats"]["calls_captured"] == 0
    b = train_network(syn.images, syn.labels, digits, compiled, 2)
    assert counters["stats"]["calls_captured"] > 0  # the compiled path really ran
    assert type(b) is type(a)  # the plain module comes back, not the compiled wrapper
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(a.classifier.weight, get_untrained(digits).classifier.weight)


def get_untrained(digits):
    from pydistill_ext.models import get_model
    return get_model("convnet-small", digits.channels, digits.num_classes, digits.im_size, seed=2)


def test_chunked_training_equals_whole_batches_and_refuses_batchnorm(digits):
    syn = random_subset(digits, 3, seed=0)
    cfg = EvalConfig(model="convnet-small", epochs=2, batch_size=16, augment="none",
                     lr=0.05)
    a = train_network(syn.images, syn.labels, digits, cfg, 4)
    b = train_network(syn.images, syn.labels, digits,
                      EvalConfig(**{**cfg.to_dict(), "chunk": 5}), 4)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_network(syn.images, syn.labels, digits,
                      EvalConfig(**{**cfg.to_dict(), "model": "convnet-bn", "chunk": 5}), 0)
    with pytest.raises(ValueError, match="chunk"):
        EvalConfig(chunk=0)
