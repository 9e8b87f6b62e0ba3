"""DM: "Dataset Condensation with Distribution Matching" (Zhao & Bilen, WACV 2023).

Each iteration draws a freshly initialised, frozen network ψ (ConvNet-3 by default), a real
batch of ``batch_real`` images per class and the synthetic set, augments both with the SAME
DSA seed (Siamese augmentation), and minimises

    L = sum_c || mean_{x in real_c} ψ(A(x)) - mean_{s in syn_c} ψ(A(s)) ||^2

(REFERENCE.md 3, DM) with SGD on the synthetic images (lr_img = 1.0, momentum 0.5, real
initialisation, 20000 iterations: the paper's defaults).

Difference from the original loop (`main_DM.py`, non-BN branch): the original embeds class by
class (two forwards per class) with one DSA seed per class. Here every class goes through ONE
forward per side and the class means come from one fused ``pde.class_mean`` per side
(:func:`pydistill_ext.losses.matching.dm_loss`); consequently one DSA seed (one augmentation)
is shared by all classes in an iteration instead of one per class. The objective per seed is
the same; the augmentation is drawn less often. The frozen network's passes run through
``torch.compile`` (option ``compile``, default on; ``--option compile=false`` runs eager), the
real side in cache-sized chunks without a graph.

All randomness (network seeds, real batches, DSA seeds, noise init) comes from the method's
own ``torch.Generator``, which is part of ``state_dict()``: resume is bitwise exact.
"""
from __future__ import annotations

import functools
from typing import Any, Dict

import torch

from pydistill_ext.artifacts import DistilledSet
from pydistill_ext.augment.dsa import default_strategy, dsa_augment
from pydistill_ext.losses.matching import dm_loss
from pydistill_ext.methods.base import DistillMethod, as_bool, register_method
from pydistill_ext.models import get_model

_SEED_HIGH = 2 ** 31 - 1


class MatchingMethod(DistillMethod):
    """Shared machinery of DM and DataDAM: synthetic images initialised from real samples
    (or noise), an SGD(momentum 0.5) optimiser on them, a generator for all randomness, a
    fresh frozen network per iteration, Siamese DSA, class-balanced real batches."""

    defaults: Dict[str, Any] = {}
    options = {"lr_img": float, "batch_real": int, "init": str, "model": str, "dsa": bool,
               "compile": bool}

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        super().__init__(dataset, ipc, seed, device, **options)
        hp = {**self.defaults, **options}
        hp["lr_img"], hp["batch_real"] = float(hp["lr_img"]), int(hp["batch_real"])
        hp["dsa"] = as_bool(hp["dsa"])
        hp["compile"] = as_bool(hp.get("compile", True))
        if hp["init"] not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {hp['init']!r}")
        if hp["batch_real"] < 1:
            raise ValueError(f"batch_real must be >= 1, got {hp['batch_real']}")
        if not hp["lr_img"] > 0:
            raise ValueError(f"lr_img must be > 0, got {hp['lr_img']}")
        self.hp = hp
        self.strategy = default_strategy(dataset.name)
        self.num_classes = dataset.num_classes
        self.gen = torch.Generator().manual_seed(self.seed)
        self.class_indices = dataset.indices_per_class()
        empty = [c for c, idx in enumerate(self.class_indices) if len(idx) == 0]
        if empty:
            raise ValueError(f"{self.name}: classes {empty} have no training images")
        self.labels = torch.arange(self.num_classes).repeat_interleave(ipc)
        if hp["init"] == "real":
            init = torch.cat([dataset.train_images[self._sample(c, ipc)]
                              for c in range(self.num_classes)])
        else:
            init = torch.randn(self.num_classes * ipc, dataset.channels, *dataset.im_size,
                               generator=self.gen)
        self.images = init.detach().clone().float().to(self.device).requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=hp["lr_img"], momentum=0.5)
        self._labels_dev = self.labels.to(self.device)

    # ------------------------------------------------------------------ randomness
    def _sample(self, c: int, n: int) -> torch.Tensor:
        """n indices of class c without replacement (all of them if the class is smaller);
        with replacement only if n exceeds the class size for init."""
        idx = self.class_indices[c]
        if n <= len(idx):
            return idx[torch.randperm(len(idx), generator=self.gen)[:n]]
        return idx[torch.randint(0, len(idx), (n,), generator=self.gen)]

    def _draw_seed(self) -> int:
        return int(torch.randint(0, _SEED_HIGH, (1,), generator=self.gen))

    def _real_batch(self):
        b = self.hp["batch_real"]
        idx, lab = [], []
        for c in range(self.num_classes):
            i = self.class_indices[c]
            take = i[torch.randperm(len(i), generator=self.gen)[:b]]
            idx.append(take)
            lab.append(torch.full((len(take),), c, dtype=torch.int64))
        idx = torch.cat(idx)
        return (self.dataset.train_images[idx].to(self.device),
                torch.cat(lab).to(self.device))

    def _fresh_net(self):
        net = get_model(self.hp["model"], self.dataset.channels, self.num_classes,
                        self.dataset.im_size, seed=self._draw_seed()).to(self.device)
        net.train()
        net.requires_grad_(False)
        return net

    def _augment(self, x_real, x_syn):
        if not self.hp["dsa"]:
            return x_real, x_syn
        s = self._draw_seed()
        return (dsa_augment(x_real, seed=s, strategy=self.strategy),
                dsa_augment(x_syn, seed=s, strategy=self.strategy))

    # ------------------------------------------------------------------ contract
    def objective(self, net, x_real, y_real, x_syn) -> torch.Tensor:
        raise NotImplementedError

    def step(self, iteration: int) -> Dict[str, float]:
        net = self._fresh_net()
        x_real, y_real = self._real_batch()
        x_real, x_syn = self._augment(x_real, self.images)
        loss = self.objective(net, x_real, y_real, x_syn)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def synthetic_set(self) -> DistilledSet:
        meta = {"method": self.name, "hyperparameters": {**self.hp, "dsa_strategy":
                                                         self.strategy if self.hp["dsa"] else None,
                                                         "momentum": 0.5, **self._extra_meta()}}
        return DistilledSet(self.images.detach().cpu().clone(), self.labels.clone(), meta)

    def _extra_meta(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {"images": self.images.detach().cpu().clone(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])


#: rows per forward of the real side on the CPU (no graph): small enough for a chunk's
#: activations to stay in cache. Measured on one EPYC core, 2,560 CIFAR-shaped rows through
#: ConvNet-3: 16 rows per chunk 1.16 s compiled / 1.65 s eager, 128 rows 1.92 s / 2.33 s.
#: Other devices embed the real batch in one pass.
REAL_CHUNK = 16


def real_chunks(x_real: torch.Tensor, chunk=None):
    """The real batch split for the no-graph forward: ``chunk`` rows (default
    ``REAL_CHUNK``) on the CPU, one piece elsewhere unless ``chunk`` is given."""
    if chunk is None:
        chunk = REAL_CHUNK if x_real.device.type == "cpu" else max(1, x_real.shape[0])
    return x_real.split(chunk)


def cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on the CPU (oneDNN's convolutions and the norm / pool kernels are faster
    in NHWC there, ~1.3x for ConvNet-3); unchanged elsewhere."""
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _embed(net, x: torch.Tensor) -> torch.Tensor:
    return net.embed(x)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """``torch.compile(fn, dynamic=False)``, built once per function and shared by every
    network passed to it (the frozen networks of successive iterations differ only in their
    weights, which Dynamo treats as inputs, so a new network does not recompile). Static
    shapes: each input shape gets its own graph, so which kernel runs never depends on the
    call history, and a resumed run computes bitwise what an uninterrupted one does.

    On one CPU core, Inductor's fusion of instance norm + ReLU + average pooling makes the
    ConvNet-3 forward ~1.7x faster than eager (``benchmarks/bench_dm_datadam.py``)."""
    return torch.compile(fn, dynamic=False)


def embed_real(net, x_real: torch.Tensor, chunk=None, *,
               compile: bool = False) -> torch.Tensor:
    """``net.embed`` of the real batch without an autograd graph, in chunks (``real_chunks``)
    (through :func:`compiled` when ``compile``)."""
    f = compiled(_embed) if compile else _embed
    with torch.no_grad():
        return torch.cat([f(net, cpu_layout(c)) for c in real_chunks(x_real, chunk)])


def dm_objective(net, x_real, y_real, x_syn, y_syn, num_classes, *,
                 compile: bool = False) -> torch.Tensor:
    """DM's loss for one network: the real side embedded without a graph (chunked), the
    synthetic side in one forward, class means by one ``class_mean`` per side (``dm_loss``).
    ``compile``: both network passes run through :func:`compiled` (the loss is unchanged up
    to float32 rounding order)."""
    f = compiled(_embed) if compile else _embed
    return dm_loss(embed_real(net, x_real, compile=compile), y_real, f(net, cpu_layout(x_syn)),
                   y_syn, num_classes)


@register_method
class DM(MatchingMethod):
    name = "dm"
    description = ("Distribution Matching (Zhao & Bilen, WACV 2023): class-mean embeddings of "
                   "random frozen ConvNets, Siamese DSA")
    default_iterations = 20000
    defaults = {"lr_img": 1.0, "batch_real": 256, "init": "real", "model": "convnet",
                "dsa": True, "compile": True}

    def objective(self, net, x_real, y_real, x_syn):
        return dm_objective(net, x_real, y_real, x_syn, self._labels_dev, self.num_classes,
                            compile=self.hp["compile"])
