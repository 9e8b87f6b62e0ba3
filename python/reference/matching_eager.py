"""Float64 loop-over-classes oracles of pydistill_ext.losses.matching, and faithful eager
anchors of one DM and one DataDAM iteration (REFERENCE.md 3) that the benchmark
(benchmarks/bench_dm_datadam.py) compares the batched methods against.

The anchors follow the structure of the original code, written here from its description:
DM (`VICO-UoE/DatasetCondensation: main_DM.py`, non-BN ConvNet branch) embeds the real and the
synthetic images **class by class** (two forwards per class, one DSA seed per class) and sums
||mean_real - mean_syn||^2 over the classes. DataDAM (`DataDistillation/DataDAM:
main_DataDAM.py`) gathers the per-class batches in a Python loop, runs one forward per side with
forward hooks on every ReLU of ``net.features``, computes eager attention maps
(normalize(sum_ch |f|^p)) and per-class means by reshaping to [classes, batch, -1] (equal
batch sizes per class), 100 * sum over layers l < L + 100 * task_balance * final-embedding
term.
"""
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- oracles (float64)
def _present(labels_real, labels_syn, c):
    return bool((labels_real == c).any()) and bool((labels_syn == c).any())


def dm_loss(emb_real, labels_real, emb_syn, labels_syn, num_classes):
    """sum over classes present on both sides of ||mean real_c - mean syn_c||^2, float64."""
    a, b = emb_real.double(), emb_syn.double()
    total = a.new_zeros(())
    for c in range(num_classes):
        if _present(labels_real, labels_syn, c):
            total = total + (a[labels_real == c].mean(0) - b[labels_syn == c].mean(0)).pow(2).sum()
    return total


def attention(f, p):
    """normalize_L2(flatten(sum_ch |f|^p)) in float64, sample by sample."""
    rows = []
    for i in range(f.shape[0]):
        a = f[i].double().abs().pow(p).sum(0).flatten()
        rows.append(a / a.norm().clamp_min(1e-12))
    return torch.stack(rows)


def attention_match_loss(maps_real, labels_real, maps_syn, labels_syn, num_classes, p):
    total = torch.zeros((), dtype=torch.float64)
    for fr, fs in zip(maps_real, maps_syn):
        total = total + dm_loss(attention(fr, p), labels_real, attention(fs, p), labels_syn,
                                num_classes)
    return total


def mmd(x, y, kernel="linear", sigmas=(1.0,)):
    """Biased V-statistic MMD^2 by explicit double loops over the pairs (float64)."""
    x, y = x.double(), y.double()
    if kernel == "linear":
        k = lambda a, b: (a * b).sum()  # noqa: E731
    else:
        k = lambda a, b: sum(torch.exp(-(a - b).pow(2).sum() / (2 * s * s)) for s in sigmas)  # noqa: E731

    def avg(u, v):
        return sum(k(ui, vj) for ui in u for vj in v) / (u.shape[0] * v.shape[0])

    return avg(x, x) + avg(y, y) - 2 * avg(x, y)


# --------------------------------------------------------------------------- eager anchors
def dm_iteration(net, real_per_class, image_syn, optimizer, ipc, augment=None, seeds=None):
    """One DM iteration as the original's per-class loop: for each class, augment real and
    synthetic with the class's seed (Siamese), embed each side separately, add
    ||mean_real - mean_syn||^2; then one SGD step on ``image_syn``. Returns the loss."""
    loss = torch.zeros((), device=image_syn.device)
    for c, img_real in enumerate(real_per_class):
        img_syn = image_syn[c * ipc:(c + 1) * ipc]
        if augment is not None:
            img_real = augment(img_real, seeds[c])
            img_syn = augment(img_syn, seeds[c])
        output_real = net.embed(img_real).detach()
        output_syn = net.embed(img_syn)
        loss = loss + torch.sum((output_real.mean(0) - output_syn.mean(0)) ** 2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _eager_attention(f, p):
    return F.normalize(f.abs().pow(p).sum(1).flatten(1), p=2, dim=1)


def datadam_iteration(net, real_per_class, image_syn, optimizer, ipc, p=1.0, task_balance=0.01,
                      augment=None, seed=None):
    """One DataDAM iteration in the original's structure (hooks on the ReLUs, eager attention,
    reshape-based class means; the per-class batches must have equal sizes)."""
    num_classes, batch_real = len(real_per_class), real_per_class[0].shape[0]
    images_real = torch.cat(list(real_per_class), 0)
    images_syn = torch.cat([image_syn[c * ipc:(c + 1) * ipc] for c in range(num_classes)], 0)
    if augment is not None:
        images_real, images_syn = augment(images_real, seed), augment(images_syn, seed)
    acts = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: acts.append(out.clone()))
             for m in net.features if isinstance(m, nn.ReLU)]
    try:
        out_real = net.embed(images_real)
        real_acts, acts[:] = list(acts), []
        out_syn = net.embed(images_syn)
        syn_acts = list(acts)
    finally:
        for h in hooks:
            h.remove()

    def error(real, syn):
        return torch.sum((real.reshape(num_classes, batch_real, -1).mean(1)
                          - syn.reshape(num_classes, ipc, -1).mean(1)) ** 2)

    loss = torch.zeros((), device=image_syn.device)
    for layer in range(len(real_acts) - 1):
        loss = loss + 100 * error(_eager_attention(real_acts[layer].detach(), p),
                                  _eager_attention(syn_acts[layer], p))
    loss = loss + 100 * task_balance * error(out_real, out_syn)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
