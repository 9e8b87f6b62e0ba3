"""Baselines in the same format as a distilled set: a random real subset, a herding coreset,
and the full training data.

- ``random``: ``ipc`` real training images per class, drawn uniformly without replacement
  by a generator seeded with ``seed`` (the "Random" row of the papers' tables).
- ``herding``: Welling's herding (ICML 2009) per class, as used as a coreset baseline since
  iCaRL and DC: greedily add the sample that keeps the running mean of the chosen embeddings
  closest to the class mean. The embedding is the (preprocessed) pixels by default, or any
  ``embed`` function (e.g. a trained network's penultimate features).
- ``full``: every training image.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from pydistill_ext.artifacts import DistilledSet

BASELINES = ("random", "herding", "full")


def _check_ipc(dataset, ipc: int):
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be an integer >= 1, got {ipc!r}")
    counts = [len(i) for i in dataset.indices_per_class()]
    small = [c for c, n in enumerate(counts) if n < ipc]
    if small:
        raise ValueError(f"ipc={ipc} exceeds the training images of class(es) {small} "
                         f"(smallest class has {min(counts)})")


def _meta(dataset, kind, ipc, seed, **extra):
    return {"method": kind, "baseline": True, "ipc": ipc, "seed": seed,
            "dataset": dataset.describe(), **extra}


def random_subset(dataset, ipc: int, seed: int = 0) -> DistilledSet:
    _check_ipc(dataset, ipc)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for idx in dataset.indices_per_class():
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:ipc]])
    chosen = torch.cat(chosen)
    return DistilledSet(dataset.train_images[chosen].clone(), dataset.train_labels[chosen].clone(),
                        _meta(dataset, "random", ipc, seed, indices=chosen.tolist()))


@torch.no_grad()
def herding_indices(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding on rows of ``features`` [n, d]: step t picks the unused row i that
    minimises ||mu - (S_t + f_i) / (t + 1)||, S_t the sum of the rows chosen so far."""
    f = features.double()
    mu = f.mean(0)
    n = f.shape[0]
    used = torch.zeros(n, dtype=torch.bool)
    total = torch.zeros_like(mu)
    out = []
    for t in range(min(k, n)):
        cand = (total.unsqueeze(0) + f) / (t + 1)
        dist = (cand - mu).pow(2).sum(1)
        dist[used] = float("inf")
        i = int(dist.argmin())
        used[i] = True
        total += f[i]
        out.append(i)
    return torch.tensor(out, dtype=torch.long)


def herding(dataset, ipc: int, seed: int = 0,
            embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            batch_size: int = 1000) -> DistilledSet:
    """Herding coreset; ``seed`` is recorded but herding itself is deterministic."""
    _check_ipc(dataset, ipc)
    chosen = []
    for idx in dataset.indices_per_class():
        x = dataset.train_images[idx]
        if embed is None:
            feats = x.flatten(1)
        else:
            with torch.no_grad():
                feats = torch.cat([embed(x[i:i + batch_size]).flatten(1)
                                   for i in range(0, x.shape[0], batch_size)])
        chosen.append(idx[herding_indices(feats, ipc)])
    chosen = torch.cat(chosen)
    return DistilledSet(dataset.train_images[chosen].clone(), dataset.train_labels[chosen].clone(),
                        _meta(dataset, "herding", ipc, seed, indices=chosen.tolist(),
                              embedding="pixels" if embed is None else "custom"))


def full_data(dataset) -> DistilledSet:
    return DistilledSet(dataset.train_images, dataset.train_labels,
                        _meta(dataset, "full", None, None))


def make_baseline(kind: str, dataset, ipc: Optional[int] = None, seed: int = 0) -> DistilledSet:
    if kind == "random":
        return random_subset(dataset, ipc, seed)
    if kind == "herding":
        return herding(dataset, ipc, seed)
    if kind == "full":
        return full_data(dataset)
    raise ValueError(f"unknown baseline kind {kind!r}; known: {', '.join(BASELINES)}")
