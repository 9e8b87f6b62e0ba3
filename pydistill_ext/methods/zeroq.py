"""ZeroQ distilled data (Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework",
CVPR 2020, Sec. 3.1, eq. 3; released code ``classification/distill_data.py``; REFERENCE.md
4.1 and 4.3).

Images ``x`` start from noise and minimise, with no labels and no cross-entropy,

    L(x) = sum_l [ ||mu_l - mu_hat_l(x)||_F^2 / N + ||sigma_l - sigma_hat_l(x)||_F^2 / N ]
           + ||0 - mu_hat_0(x)||_F^2 / N + ||1 - sigma_hat_0(x)||_F^2 / N          (eq. 3)

where for every BatchNorm layer l of the frozen teacher ``(mu_l, sigma_l) = (running_mean,
sqrt(running_var + 1e-6))`` and ``mu_hat_l``/``sigma_hat_l`` are the **per-sample** mean and
``sqrt(unbiased var + 1e-6)`` over the spatial dims of that layer's input (one value per image
and channel: :class:`pydistill_ext.losses.BNStatMatcher` with ``variant="zeroq"``, fused
``pde.bn_moments(per_sample=True)``); the last term pulls each image's per-channel mean/std
in the normalised input space to 0/1 (the anchor's ``input_mean``/``input_std``). All layers
weigh 1 (the anchor hooks the first L Conv2d outputs and pairs them with the BN layers by
order; hooking the BN inputs is the same tensors for conv -> BN networks and stays correct
when other convs sit in between).

Optimisation as the anchor: Adam (lr 0.5, default betas), ``ReduceLROnPlateau(patience=100,
min_lr=1e-4)`` stepped on each batch's total loss, 500 iterations, one batch at a time
(``batch_size``, the anchor's default 32). The set holds ``ipc * num_classes`` images (ZeroQ
images have no class; ``ipc`` only sizes the set; option ``images`` sets the count directly,
e.g. ZeroQ's num_batch x batch_size), split into batches that are optimised
independently (own BN statistics, own optimiser and scheduler, in lockstep). No pixel clipping,
no augmentation (as the anchor).

Initialisation. The paper says the images start from a Gaussian with zero mean and unit
variance; the released code (``getRandomData``: ``(randint(0, 255) - 127.5) / 5418.75``)
divides by the *variance* of U(-128, 127) instead of its standard deviation, so its images
start uniform with std ~0.0136, not 1 (ZeroQ issue 20). We follow the paper:
``init="gaussian"`` (default) draws N(0, 1) in the normalised space; ``init="anchor"``
reproduces the released code's init for comparison.

The labels of the saved set are the teacher's argmax on the final images (ZeroQ's data is
unlabelled; labels are for viewing and for downstream tools that need them). The main use is
calibrating a quantized model: :func:`pydistill_ext.quant.quantize_model`. All randomness comes
from the method's generator; ``state_dict`` holds images, optimisers, schedulers and the
generator, so resume is exact.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from pydistill_ext.artifacts import DistilledSet
from pydistill_ext.losses.bn_matching import BNStatMatcher
from pydistill_ext.methods.base import DistillMethod, register_method
from pydistill_ext.methods.squeeze import load_teacher

__all__ = ["ZeroQ", "zeroq_input_loss"]

_EPS = 1e-6


def zeroq_input_loss(x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's input term: ``||mu_hat(x)||_F^2 / N + ||1 - sigma_hat(x)||_F^2 / N`` with the
    per-image, per-channel mean and ``sqrt(unbiased var + 1e-6)`` over the spatial dims."""
    if x.dim() < 3:
        raise ValueError(f"zeroq input term needs [N, C, ...] images, got shape {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    var, mean = torch.var_mean(flat, dim=2, unbiased=True)
    n = x.shape[0]
    return mean.pow(2).sum() / n + (torch.sqrt(var + _EPS) - 1.0).pow(2).sum() / n


@register_method
class ZeroQ(DistillMethod):
    name = "zeroq"
    description = ("ZeroQ distilled data (Cai et al., CVPR 2020): per-sample BN statistics + "
                   "input mean/std, no labels; calibrates post-training quantization")
    default_iterations = 500
    options = {"teacher": str, "lr": float, "batch_size": int, "patience": int,
               "min_lr": float, "init": str, "images": int}
    _defaults = {"teacher": None, "lr": 0.5, "batch_size": 32, "patience": 100,
                 "min_lr": 1e-4, "init": "gaussian", "images": None}

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        super().__init__(dataset, ipc, seed, device, **options)
        hp = {**self._defaults, **options}
        for k in ("lr", "min_lr"):
            hp[k] = float(hp[k])
            if not (hp[k] > 0 and math.isfinite(hp[k])):
                raise ValueError(f"option {k} must be a finite number > 0, got {hp[k]}")
        if hp["images"] is not None and (int(hp["images"]) != hp["images"] or int(hp["images"]) < 1):
            raise ValueError(f"option images must be an integer >= 1, got {hp['images']!r}")
        for k in ("batch_size", "patience"):
            if int(hp[k]) != hp[k] or int(hp[k]) < (1 if k == "batch_size" else 0):
                raise ValueError(f"option {k} must be an integer >= "
                                 f"{1 if k == 'batch_size' else 0}, got {hp[k]!r}")
            hp[k] = int(hp[k])
        if hp["init"] not in ("gaussian", "anchor"):
            raise ValueError(f"option init must be 'gaussian' or 'anchor', got {hp['init']!r}")
        if not hp["teacher"]:
            raise ValueError("method 'zeroq' needs teacher=PATH: a BatchNorm network trained "
                             "with `pydistill squeeze`")
        self.hp = hp
        self.teacher = load_teacher(hp["teacher"], device=self.device)
        info = self.teacher.teacher_info
        if (info["channels"], info["num_classes"], tuple(info["im_size"])) != \
                (dataset.channels, dataset.num_classes, tuple(dataset.im_size)):
            raise ValueError(f"teacher {hp['teacher']} was trained for {info['channels']}x"
                             f"{info['im_size']} images with {info['num_classes']} classes, not "
                             f"for dataset {dataset.name!r}")
        if dataset.zca is not None:
            raise ValueError("zeroq: the input term assumes per-channel normalised images; "
                             "load the dataset without ZCA")
        self.matcher = BNStatMatcher(self.teacher, variant="zeroq")
        self.gen = torch.Generator().manual_seed(self.seed)
        n = ipc * dataset.num_classes if hp["images"] is None else int(hp["images"])
        shape = (dataset.channels, *dataset.im_size)
        bs = hp["batch_size"]
        self.images: List[torch.Tensor] = []
        for i in range(0, n, bs):
            m = min(bs, n - i)
            if hp["init"] == "anchor":
                # released code: (randint(0, 255) - 127.5) / 5418.75 (std ~0.0136)
                x = (torch.randint(0, 255, (m, *shape), generator=self.gen).float() - 127.5) / 5418.75
            else:
                x = torch.randn(m, *shape, generator=self.gen)
            self.images.append(x.to(self.device).requires_grad_(True))
        self.opts = [torch.optim.Adam([x], lr=hp["lr"]) for x in self.images]
        self.scheds = [torch.optim.lr_scheduler.ReduceLROnPlateau(
            o, patience=hp["patience"], min_lr=hp["min_lr"]) for o in self.opts]

    def batch_loss(self, x: torch.Tensor):
        """(total, bn, input) loss of one batch: eq. 3 of the paper."""
        self.teacher(x)
        bn = self.matcher.loss
        inp = zeroq_input_loss(x)
        return bn + inp, bn, inp

    def step(self, it: int) -> Dict[str, float]:
        totals = {"loss": 0.0, "bn": 0.0, "input": 0.0, "lr": 0.0}
        n = sum(x.shape[0] for x in self.images)
        for x, opt, sched in zip(self.images, self.opts, self.scheds):
            opt.zero_grad(set_to_none=True)
            loss, bn, inp = self.batch_loss(x)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            sched.step(value)
            share = x.shape[0] / n
            totals["loss"] += share * value
            totals["bn"] += share * float(bn.detach())
            totals["input"] += share * float(inp.detach())
            totals["lr"] += share * opt.param_groups[0]["lr"]
        return totals

    # ------------------------------------------------------------------ contract
    def synthetic_set(self) -> DistilledSet:
        images = torch.cat([x.detach() for x in self.images])
        with torch.no_grad():
            labels = torch.cat([self.teacher(images[i:i + 256]).argmax(1)
                                for i in range(0, images.shape[0], 256)])
        meta = {"method": self.name,
                "hyperparameters": {**self.hp, "betas": [0.9, 0.999]},
                "labels": "teacher argmax (ZeroQ images are unlabelled)"}
        return DistilledSet(images.cpu().clone(), labels.cpu(), meta)

    def state_dict(self) -> Dict[str, Any]:
        return {"images": [x.detach().cpu().clone() for x in self.images],
                "opts": [o.state_dict() for o in self.opts],
                "scheds": [s.state_dict() for s in self.scheds],
                "gen": self.gen.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if len(state["images"]) != len(self.images):
            raise ValueError("zeroq checkpoint has a different number of batches")
        with torch.no_grad():
            for x, s in zip(self.images, state["images"]):
                x.copy_(s.to(self.device))
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)
        for sc, s in zip(self.scheds, state["scheds"]):
            sc.load_state_dict(s)
        self.gen.set_state(state["gen"])
