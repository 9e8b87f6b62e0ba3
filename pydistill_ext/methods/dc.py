"""DC and DSA: dataset condensation by gradient matching (REFERENCE.md 3).

* ``dc``: Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021,
  Algorithm 1 (`VICO-UoE/DatasetCondensation: main.py, utils.py match_loss`).
* ``dsa``: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation",
  ICML 2021: DC where the real and the synthetic batch of each class go through the *same*
  DSA transform (one seed per class and outer step) before their gradients are taken.

One ``step(it)`` is one of DC's outer iterations K (the paper runs 1000):

1. a fresh randomly initialised network (``model``, ConvNet-3 by default), its seed drawn
   from the method's generator;
2. ``outer_loop`` times: for every class c, a real batch (``batch_real`` images of class c
   drawn without replacement, fewer if the class is smaller) and the class's ``ipc``
   synthetic images; ``g_real = dCE(net(x_real_c), c)/dtheta`` (detached) and
   ``g_syn = dCE(net(x_syn_c), c)/dtheta`` (``create_graph=True``); the loss
   ``sum_c pde.gradient_match_distance(g_real, g_syn, metric)`` updates the images with SGD
   (``lr_img`` 0.1, momentum 0.5); then, except after the last outer step, ``inner_loop``
   epochs of SGD (``lr_net`` 0.01, no momentum, batch 256, shuffled) on the synthetic set
   train the network (DC's ``epoch('train', ...)``; for DSA each of those batches gets a
   per-sample DSA transform, as DSA's ``epoch(..., aug=True)`` with seed -1).

``outer_loop`` / ``inner_loop`` default by IPC as DC (1: 1/1, 10: 10/50, 20: 20/25, 30: 30/20,
40: 40/15, 50: 50/10); another IPC takes the entry of the nearest listed IPC (ties: the smaller
one), e.g. 5 -> 1/1, 7 -> 10/50, 15 -> 10/50, 100 -> 50/10. The reported ``loss`` is DC's
``loss_avg``: the matching loss summed over the outer steps, divided by
``num_classes * outer_loop``.

Normalisation: the default ConvNet uses instance norm (``GroupNorm(C, C)``), which has no
running statistics, so nothing needs freezing. With a BatchNorm model (``model=convnet-bn``,
``resnet*``) each outer step first runs 16 real images per class through the network in train
mode and then puts the BatchNorm layers in eval mode for the matching (DC's ``BNSizePC = 16``);
the inner-loop training puts them back in train mode, as DC's ``epoch('train')`` does.

Randomness (network seeds, real batches, DSA seeds, inner-loop shuffles) all comes from one CPU
``torch.Generator`` seeded with ``seed``; ``state_dict`` holds the images, the image
optimiser's state and that generator, which is everything: the per-iteration network is
re-created from the generator, so resume is bitwise exact. DC itself uses no augmentation while
distilling (its MNIST augmentation applies only in evaluation); DSA uses
``default_strategy(dataset.name)`` (no flip for digit datasets), one transform per batch
(Siamese) in the matching.

Speed: the first-order passes (the real class gradients, the inner-loop training) run through
``torch.compile(net, dynamic=False)`` (option ``compile``, default on; static shapes, so resume
stays exact) and, on the CPU for a network without BatchNorm, in ``GRAD_CHUNK``-row chunks whose
gradients are summed (the same gradient up to rounding); the second-order synthetic gradient
runs eagerly (compiled autograd graphs do not support double backward).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import pydistill_ext as pde
from pydistill_ext.artifacts import DistilledSet
from pydistill_ext.augment.dsa import default_strategy, dsa_augment
from pydistill_ext.chunked import chunked_backward, chunked_grad
from pydistill_ext.losses.bn_matching import bn_layers
from pydistill_ext.methods.base import DistillMethod, as_bool, register_method
from pydistill_ext.models import get_model

__all__ = ["DC_LOOPS", "dc_loops", "class_gradients", "gradient_matching_loss",
           "DatasetCondensation", "DSACondensation"]

#: IPC -> (outer_loop, inner_loop) of DC's ``get_loops``
DC_LOOPS: Dict[int, Tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20),
                                        40: (40, 15), 50: (50, 10)}
BATCH_TRAIN = 256   # DC's batch_train: minibatch of the inner-loop network training
BN_SIZE_PC = 16     # DC's BNSizePC: real images per class that set the BatchNorm statistics
_SEED_HIGH = 1 << 62


def dc_loops(ipc: int) -> Tuple[int, int]:
    """DC's (outer_loop, inner_loop) for ``ipc``; the nearest listed IPC (ties: smaller)."""
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc]
    key = min(DC_LOOPS, key=lambda k: (abs(k - ipc), k))
    return DC_LOOPS[key]


#: rows per chunk of a first-order gradient on the CPU: the real class gradients, and the
#: inner-loop minibatches of a network without BatchNorm (so that the rows of a batch are
#: independent). Small chunks keep a chunk's activations in cache; measured on one EPYC core,
#: 10 MNIST-shaped class gradients of 256 rows through ConvNet-3, forward + backward: 32-row
#: chunks 6.9 s eager vs 11.9 s unchunked (``benchmarks/bench_dc_step.py`` for the step).
GRAD_CHUNK = 32


def class_gradients(net: nn.Module, x: torch.Tensor, label: int,
                    params: Sequence[torch.Tensor], create_graph: bool, *,
                    forward=None, chunk: Optional[int] = None) -> List[torch.Tensor]:
    """d CE(net(x), label) / d params (mean over the batch, as DC's criterion).

    A first-order gradient (``create_graph=False``) may run through ``forward`` (a compiled
    view of ``net`` sharing its parameters) and be accumulated over row chunks of ``chunk``
    rows: CE is the mean of per-row terms, so with rows that do not interact (no BatchNorm
    in training mode) the chunks' gradients add up (``pydistill_ext.chunked``). The second-order
    (``create_graph=True``) gradient always runs eagerly through ``net`` in one piece."""
    y = torch.full((x.shape[0],), int(label), dtype=torch.long, device=x.device)
    if create_graph:
        return list(torch.autograd.grad(F.cross_entropy(net(x), y), list(params),
                                        create_graph=True))
    return chunked_grad(net if forward is None else forward, x, y, F.cross_entropy, params,
                        chunk)


def gradient_matching_loss(net: nn.Module, real_batches: Sequence[torch.Tensor],
                           syn_batches: Sequence[torch.Tensor], metric: str = "ours",
                           classes: Optional[Sequence[int]] = None, *, forward=None,
                           chunk: Optional[int] = None) -> torch.Tensor:
    """DC's matching loss ``sum_c D(g_real_c, g_syn_c)`` for one network.

    ``real_batches[i]`` / ``syn_batches[i]`` are the (already augmented, if at all) images of
    class ``classes[i]`` (default ``i``). The result is differentiable w.r.t. the synthetic
    images (second order through the network's autograd graph); the real gradients are
    detached (and may use ``forward`` / ``chunk``, see :func:`class_gradients`). ``D`` is
    :func:`pde.gradient_match_distance` (``ours`` / ``mse`` / ``cos``).
    """
    if len(real_batches) != len(syn_batches):
        raise ValueError(f"{len(real_batches)} real batches but {len(syn_batches)} synthetic")
    classes = list(range(len(real_batches))) if classes is None else list(classes)
    params = [p for p in net.parameters() if p.requires_grad]
    loss = None
    for c, xr, xs in zip(classes, real_batches, syn_batches):
        g_real = class_gradients(net, xr, c, params, create_graph=False, forward=forward,
                                 chunk=chunk)
        g_syn = class_gradients(net, xs, c, params, create_graph=True)
        d = pde.gradient_match_distance(g_real, g_syn, metric=metric)
        loss = d if loss is None else loss + d
    return loss


def _freeze_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """DC: run real images through the net in train mode, then BatchNorm layers to eval."""
    net.train()
    with torch.no_grad():
        net(x)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _positive(value, name, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"option {name} must be a number, got {value!r}")
    if kind is int:
        if int(value) != value or value < 1:
            raise ValueError(f"option {name} must be a positive integer, got {value!r}")
        return int(value)
    if not value > 0:
        raise ValueError(f"option {name} must be > 0, got {value!r}")
    return float(value)


class _GradientMatching(DistillMethod):
    use_dsa = False
    default_iterations = 1000
    options = {"lr_img": float, "lr_net": float, "batch_real": int, "outer_loop": int,
               "inner_loop": int, "init": str, "model": str, "metric": str, "compile": bool}

    def __init__(self, dataset, ipc, seed, device="cpu", *, lr_img=0.1, lr_net=0.01,
                 batch_real=256, outer_loop=None, inner_loop=None, init="real",
                 model="convnet", metric="ours", compile=True, **options):
        super().__init__(dataset, ipc, seed, device, **options)
        self.compile = as_bool(compile)
        outer_default, inner_default = dc_loops(ipc)
        self.lr_img = _positive(lr_img, "lr_img", float)
        self.lr_net = _positive(lr_net, "lr_net", float)
        self.batch_real = _positive(batch_real, "batch_real", int)
        self.outer_loop = _positive(outer_default if outer_loop is None else outer_loop,
                                    "outer_loop", int)
        if inner_loop is None:
            inner_loop = inner_default
        if isinstance(inner_loop, bool) or not isinstance(inner_loop, int) or inner_loop < 0:
            raise ValueError(f"option inner_loop must be an integer >= 0, got {inner_loop!r}")
        self.inner_loop = int(inner_loop)
        if init not in ("real", "noise"):
            raise ValueError(f"option init must be 'real' or 'noise', got {init!r}")
        if metric not in ("ours", "mse", "cos"):
            raise ValueError(f"option metric must be 'ours', 'mse' or 'cos', got {metric!r}")
        self.init, self.metric, self.model = init, metric, str(model)
        # fail early on an unknown model name
        get_model(self.model, dataset.channels, dataset.num_classes, dataset.im_size, seed=0)
        self.strategy = default_strategy(dataset.name) if self.use_dsa else None

        nc = dataset.num_classes
        self._real = dataset.train_images.to(self.device)
        self._class_idx = dataset.indices_per_class()
        small = [c for c, idx in enumerate(self._class_idx) if len(idx) == 0]
        if small:
            raise ValueError(f"classes {small} have no training images")
        self.gen = torch.Generator().manual_seed(self.seed)
        self.labels = torch.arange(nc).repeat_interleave(ipc)
        shape = (nc * ipc, dataset.channels, *dataset.im_size)
        # DC: image_syn = randn(...); with init='real' each class's rows are then overwritten
        # with ipc random real images of that class (repeats only if the class is smaller)
        images = torch.randn(shape, generator=self.gen)
        if init == "real":
            for c in range(nc):
                rows = self._draw(c, ipc, fill=True)
                images[c * ipc:(c + 1) * ipc] = dataset.train_images[rows]
        self.images = images.to(self.device).requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=self.lr_img, momentum=0.5)

    # ------------------------------------------------------------------ helpers
    def _draw(self, c: int, n: int, fill: bool = False) -> torch.Tensor:
        """n indices of class c without replacement (DC's ``get_images``: all of them,
        shuffled, if the class is smaller; ``fill=True`` then tops up with repeats)."""
        idx = self._class_idx[c]
        perm = torch.randperm(len(idx), generator=self.gen)[:n]
        if fill and len(perm) < n:
            extra = torch.randint(0, len(idx), (n - len(perm),), generator=self.gen)
            perm = torch.cat([perm, extra])
        return idx[perm]

    def _seed(self) -> int:
        return int(torch.randint(0, _SEED_HIGH, (1,), generator=self.gen))

    def new_network(self) -> nn.Module:
        net = get_model(self.model, self.dataset.channels, self.dataset.num_classes,
                        self.dataset.im_size, seed=self._seed())
        return net.to(self.device).train()

    def _syn_class(self, c: int) -> torch.Tensor:
        return self.images[c * self.ipc:(c + 1) * self.ipc]

    def _train_network(self, net: nn.Module, opt: torch.optim.Optimizer, forward=None,
                       chunk: Optional[int] = None) -> None:
        """DC's ``epoch('train', trainloader(syn, batch 256, shuffle), net, ...)``, inner_loop
        times (DSA: a per-sample DSA transform on every batch, as ``aug=True``). ``forward``:
        a compiled view of ``net``; ``chunk``: each minibatch's gradient accumulated over row
        chunks (``pydistill_ext.chunked``: the same gradient), only for networks whose rows do
        not interact."""
        x_all = self.images.detach().clone()
        y_all = self.labels.to(self.device)
        n = x_all.shape[0]
        f = net if forward is None else forward
        net.train()
        for _ in range(self.inner_loop):
            perm = torch.randperm(n, generator=self.gen)
            for start in range(0, n, BATCH_TRAIN):
                idx = perm[start:start + BATCH_TRAIN].to(self.device)
                x = x_all[idx]
                if self.use_dsa:
                    x = dsa_augment(x, seed=self._seed(), strategy=self.strategy,
                                    per_sample=True)
                y = y_all[idx]
                opt.zero_grad()
                chunked_backward(f, x, y, F.cross_entropy, chunk)
                opt.step()

    def _fast_path(self, net: nn.Module, has_bn: bool):
        """(forward, chunk) for the first-order passes of this network: a compiled view
        (``compile``: ``torch.compile(net, dynamic=False)``, the same parameters) and
        ``GRAD_CHUNK``-row chunks on the CPU when no BatchNorm couples a batch's rows."""
        forward = torch.compile(net, dynamic=False) if self.compile else None
        chunk = GRAD_CHUNK if self.device.type == "cpu" and not has_bn else None
        return forward, chunk

    # ------------------------------------------------------------------ the method
    def step(self, iteration: int) -> Dict[str, float]:
        nc = self.dataset.num_classes
        net = self.new_network()
        params = [p for p in net.parameters()]
        opt_net = torch.optim.SGD(params, lr=self.lr_net)
        bn = bool(bn_layers(net))
        forward, chunk = self._fast_path(net, bn)
        loss_sum = 0.0
        for ol in range(self.outer_loop):
            if bn:
                idx = torch.cat([self._draw(c, BN_SIZE_PC) for c in range(nc)])
                _freeze_batchnorm(net, self._real[idx.to(self.device)])
            reals, syns = [], []
            for c in range(nc):
                xr = self._real[self._draw(c, self.batch_real).to(self.device)]
                xs = self._syn_class(c)
                if self.use_dsa:   # Siamese: one seed, one transform for both batches
                    s = self._seed()
                    xr = dsa_augment(xr, seed=s, strategy=self.strategy)
                    xs = dsa_augment(xs, seed=s, strategy=self.strategy)
                reals.append(xr)
                syns.append(xs)
            loss = gradient_matching_loss(net, reals, syns, metric=self.metric,
                                          forward=forward, chunk=chunk)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            for p in params:       # the image loss leaves gradients on the network
                p.grad = None
            loss_sum += float(loss.detach())
            if ol == self.outer_loop - 1:
                break
            self._train_network(net, opt_net, forward, chunk)
        return {"loss": loss_sum / (nc * self.outer_loop)}

    def synthetic_set(self) -> DistilledSet:
        meta = {"method": self.name, "ipc": self.ipc, "seed": self.seed, "model": self.model,
                "metric": self.metric, "init": self.init, "lr_img": self.lr_img,
                "lr_net": self.lr_net, "batch_real": self.batch_real,
                "outer_loop": self.outer_loop, "inner_loop": self.inner_loop,
                "dsa_strategy": self.strategy, "compile": self.compile}
        return DistilledSet(self.images.detach().cpu().clone(), self.labels.clone(), meta)

    def state_dict(self):
        return {"images": self.images.detach().cpu().clone(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])


@register_method
class DatasetCondensation(_GradientMatching):
    name = "dc"
    description = ("DC: gradient matching on fresh random ConvNets (Zhao, Mopuri & Bilen, "
                   "ICLR 2021)")
    use_dsa = False


@register_method
class DSACondensation(_GradientMatching):
    name = "dsa"
    description = ("DSA: gradient matching with Siamese differentiable augmentation "
                   "(Zhao & Bilen, ICML 2021)")
    use_dsa = True
