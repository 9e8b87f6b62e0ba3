"""Images optimised until a pretrained BatchNorm network's statistics match: DeepInversion,
SRe2L's recover, CDA and CV-DD (REFERENCE.md 4.1, 4.3).

All four minimise, over synthetic images x with targets y (``ipc`` per class),

    L(x) = sum_i w_i [ CE(f_i(A(x)), y) + r_bn * sum_l s_l R_l,i(A(x)) ] + priors(A(x))

where f_i are frozen BN teachers (one, or CV-DD's committee), R_l,i the BN-statistic distance
of layer l (:class:`pydistill_ext.losses.BNStatMatcher`, fused ``pde.bn_moments``; s_0 =
``first_bn_multiplier``), A a random differentiable augmentation and the priors DeepInversion's
total variation and L2. Adam with a cosine learning rate; the last iterate is kept (as the
anchors). Images are partitioned into batches of ``batch_size`` (BN statistics are per batch,
as SRe2L's batches of mixed classes); every step runs each batch once and takes one Adam step
(Adam is elementwise, so this is the anchors' per-batch loop run in lockstep).

* ``deepinversion`` — Yin et al., "Dreaming to Distill", CVPR 2020, eqs. 2–4 (CIFAR settings of
  its code: lr 0.1, r_bn (r_feature) 10, TV-L2 2.5e-5, jitter ±2 by ``torch.roll``, flip,
  Adam betas (0.5, 0.9), noise init). ``adi_scale`` > 0 with ``student=PATH`` adds Adaptive
  DeepInversion's competition term adi_scale·(1 − clamp(JS(P_s, P_t), 0, 1)) at T = 3 with
  the probabilities clamped to [0.01, 0.99] (eq. 6; the student is frozen here, as in the
  released code). Pixels are clipped to the valid range after every step.
* ``sre2l`` — Yin, Xing & Shen, "Squeeze, Recover and Relabel", NeurIPS 2023, recover stage:
  CE + r_bn·BN loss (r_bn 0.01, lr 0.25, Adam (0.5, 0.9), cosine, no TV/L2), augmentation =
  one RandomResizedCrop box per batch (scale [0.08, 1]) resized back, flip, roll by
  randint(0, jitter).
* ``cda`` — Yin & Shen, "Dataset Distillation via Curriculum Data Synthesis in Large Data
  Era", TMLR 2024: SRe2L whose crop's minimum scale follows the cosine curriculum
  0.08 + 0.92·(1 + cos(π·t / (milestone·T))) / 2 (whole images first, small crops last).
* ``cvdd`` — Cui et al., "Dataset Distillation via Committee Voting", 2025: SRe2L-style
  recover from real-image initialisation with ``committee`` (2) teachers drawn per batch and
  step from ``teachers=PATH1,PATH2,...``, weighted softmax(prior / 5) with the prior each
  teacher's test accuracy (%).

Teachers come from ``pydistill squeeze`` (:mod:`pydistill_ext.methods.squeeze`). All
randomness comes from the method's generator (in ``state_dict``): resume is exact.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from pydistill_ext.artifacts import DistilledSet
from pydistill_ext.augment.dsa import default_strategy
from pydistill_ext.losses.bn_matching import BNStatMatcher
from pydistill_ext.methods.base import DistillMethod, as_bool, register_method
from pydistill_ext.methods.squeeze import load_teacher

__all__ = ["BNSynthesis", "DeepInversion", "SRe2L", "CDA", "CVDD", "image_prior_losses"]


def image_prior_losses(x: torch.Tensor):
    """DeepInversion's image priors: (TV-L2, TV-L1) over the four neighbour differences
    (right, down, and both diagonals). TV-L2 is the sum of their Frobenius norms (not
    squared), TV-L1 the sum of their mean absolute values."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    tv_l2 = sum(torch.linalg.vector_norm(d) for d in diffs)
    tv_l1 = sum(d.abs().mean() for d in diffs)
    return tv_l2, tv_l1


def _js_competition(student_logits, teacher_logits, temperature=3.0):
    """ADI's Jensen-Shannon divergence between the clamped tempered softmaxes (batch mean)."""
    p = F.softmax(student_logits / temperature, 1).clamp(0.01, 0.99)
    q = F.softmax(teacher_logits / temperature, 1).clamp(0.01, 0.99)
    m = 0.5 * (p + q)
    kl_mp = (m * (m.log() - p.log())).sum(1)
    kl_mq = (m * (m.log() - q.log())).sum(1)
    return (0.5 * kl_mp + 0.5 * kl_mq).mean()


class BNSynthesis(DistillMethod):
    default_iterations = 1000
    options = {"teacher": str, "teachers": str, "committee": int, "r_bn": float, "lr": float,
               "first_bn_multiplier": float, "var_weight": float, "tv_l2": float,
               "tv_l1": float, "l2": float, "jitter": int, "flip": bool, "crop": str,
               "crop_min": float, "milestone": float, "batch_size": int, "init": str,
               "adi_scale": float, "student": str, "ema_momentum": float, "clip": bool}
    defaults: Dict[str, Any] = {}
    _base = {"teacher": None, "teachers": None, "committee": 2, "r_bn": 0.01, "lr": 0.25,
             "first_bn_multiplier": 10.0, "var_weight": 1.0, "tv_l2": 0.0, "tv_l1": 0.0,
             "l2": 0.0, "jitter": None, "flip": None, "crop": "none", "crop_min": 0.08,
             "milestone": 1.0, "batch_size": 100, "init": "noise", "adi_scale": 0.0,
             "student": None, "ema_momentum": None, "clip": True}
    roll_symmetric = True  # DeepInversion: shift in [-jitter, jitter]; SRe2L: [0, jitter)

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        super().__init__(dataset, ipc, seed, device, **options)
        hp = {**self._base, **self.defaults, **options}
        h = dataset.im_size[0]
        if hp["jitter"] is None:  # scaled from the anchors' 30 (DI) / 32 (SRe2L) at 224 px
            hp["jitter"] = self.default_jitter(h)
        if hp["flip"] is None:
            hp["flip"] = "flip" in default_strategy(dataset.name)  # no flip for digits
        hp["flip"], hp["clip"] = as_bool(hp["flip"]), as_bool(hp["clip"])
        for k in ("r_bn", "lr", "first_bn_multiplier", "var_weight", "tv_l2", "tv_l1", "l2",
                  "adi_scale"):
            hp[k] = float(hp[k])
            if not (hp[k] >= 0 and math.isfinite(hp[k])):
                raise ValueError(f"option {k} must be a finite number >= 0, got {hp[k]}")
        if not hp["lr"] > 0:
            raise ValueError(f"option lr must be > 0, got {hp['lr']}")
        if hp["crop"] not in ("none", "random_resized", "curriculum"):
            raise ValueError(f"option crop must be none, random_resized or curriculum, got {hp['crop']!r}")
        if not 0 < float(hp["crop_min"]) <= 1:
            raise ValueError(f"option crop_min must be in (0, 1], got {hp['crop_min']}")
        if hp["init"] not in ("noise", "real"):
            raise ValueError(f"option init must be 'noise' or 'real', got {hp['init']!r}")
        if int(hp["batch_size"]) < 1 or int(hp["jitter"]) < 0:
            raise ValueError("options batch_size must be >= 1 and jitter >= 0")
        self.hp = hp
        self.num_classes = dataset.num_classes
        self.gen = torch.Generator().manual_seed(self.seed)
        self.total_iterations = self.default_iterations
        self._load_teachers()
        self.student = None
        if hp["adi_scale"] > 0:
            if not hp["student"]:
                raise ValueError("option adi_scale > 0 needs student=PATH (a network file from "
                                 "`pydistill squeeze`)")
            self.student = load_teacher(hp["student"], device=self.device)
        self.labels = torch.arange(self.num_classes).repeat_interleave(ipc)
        n = self.labels.numel()
        # batches of mixed classes: IPC index major, so every batch holds all classes
        order = torch.arange(n).view(self.num_classes, ipc).t().reshape(-1)
        bs = int(hp["batch_size"])
        self.batches = [order[i:i + bs] for i in range(0, n, bs)]
        if hp["init"] == "real":
            idx = []
            for c, ids in enumerate(dataset.indices_per_class()):
                if len(ids) == 0:
                    raise ValueError(f"{self.name}: class {c} has no training images")
                pick = torch.randperm(len(ids), generator=self.gen)[:ipc]
                idx.append(ids[pick.repeat(math.ceil(ipc / len(pick)))[:ipc]])
            init = dataset.train_images[torch.cat(idx)]
        else:
            init = torch.randn(n, dataset.channels, *dataset.im_size, generator=self.gen)
        self.images = init.float().clone().to(self.device).requires_grad_(True)
        self.opt = torch.optim.Adam([self.images], lr=hp["lr"], betas=(0.5, 0.9), eps=1e-8)
        lo = dataset.preprocess(torch.zeros(1, dataset.channels, *dataset.im_size))
        hi = dataset.preprocess(torch.ones(1, dataset.channels, *dataset.im_size))
        self._lo, self._hi = torch.minimum(lo, hi).to(self.device), torch.maximum(lo, hi).to(self.device)
        self._clip_ok = hp["clip"] and dataset.zca is None

    @staticmethod
    def default_jitter(h: int) -> int:
        return max(1, round(h * 30 / 224))

    def _load_teachers(self):
        hp = self.hp
        paths = [p for p in (hp["teachers"] or "").split(",") if p] or \
            ([hp["teacher"]] if hp["teacher"] else [])
        if not paths:
            raise ValueError(f"method {self.name!r} needs teacher=PATH (or teachers=P1,P2,...): a "
                             "BatchNorm network trained with `pydistill squeeze`")
        self.teachers = [load_teacher(p, device=self.device) for p in paths]
        for p, t in zip(paths, self.teachers):
            info = t.teacher_info
            if (info["channels"], info["num_classes"], tuple(info["im_size"])) != \
                    (self.dataset.channels, self.dataset.num_classes, tuple(self.dataset.im_size)):
                raise ValueError(f"teacher {p} was trained for {info['channels']}x{info['im_size']} "
                                 f"images with {info['num_classes']} classes, not for dataset "
                                 f"{self.dataset.name!r}")
        self.matchers = [BNStatMatcher(t, first_bn_multiplier=hp["first_bn_multiplier"],
                                       var_weight=hp["var_weight"], ema_momentum=hp["ema_momentum"])
                         for t in self.teachers]
        priors = torch.tensor([100.0 * t.teacher_info["test_accuracy"] for t in self.teachers],
                              dtype=torch.float64)
        self.priors = priors

    def set_total_iterations(self, total: int) -> None:
        self.total_iterations = max(1, int(total))

    # ------------------------------------------------------------------ augmentation
    def _rand(self) -> float:
        return float(torch.rand((), generator=self.gen, dtype=torch.float64))

    def _randint(self, lo: int, hi: int) -> int:  # [lo, hi]
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def _crop_scale_min(self, it: int) -> float:
        hp = self.hp
        if hp["crop"] != "curriculum":
            return float(hp["crop_min"])
        end = max(1.0, hp["milestone"] * self.total_iterations)
        t = min(it, end) / end
        lo = float(hp["crop_min"])
        return lo + (1 - lo) * (1 + math.cos(math.pi * t)) / 2

    def _random_resized_crop(self, x, scale_min):
        """One box for the whole batch (SRe2L): area fraction U[scale_min, 1], aspect ratio
        log-uniform in [3/4, 4/3], resized back bilinearly (differentiable)."""
        h, w = x.shape[-2:]
        area = h * w * (scale_min + (1 - scale_min) * self._rand())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * self._rand())
        bw = min(w, max(1, round(math.sqrt(area * ratio))))
        bh = min(h, max(1, round(math.sqrt(area / ratio))))
        i, j = self._randint(0, h - bh), self._randint(0, w - bw)
        box = x[:, :, i:i + bh, j:j + bw]
        if (bh, bw) == (h, w):
            return box
        return F.interpolate(box, size=(h, w), mode="bilinear", align_corners=False)

    def augment(self, x: torch.Tensor, it: int) -> torch.Tensor:
        hp = self.hp
        if hp["crop"] != "none":
            x = self._random_resized_crop(x, self._crop_scale_min(it))
        j = int(hp["jitter"])
        if j > 0:
            if self.roll_symmetric:
                dx, dy = self._randint(-j, j), self._randint(-j, j)
            else:
                dx, dy = self._randint(0, j - 1) if j > 1 else 0, self._randint(0, j - 1) if j > 1 else 0
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        if hp["flip"] and self._rand() < 0.5:
            x = x.flip(3)
        return x

    # ------------------------------------------------------------------ one step
    def _lr(self, it: int) -> float:
        return 0.5 * self.hp["lr"] * (1 + math.cos(math.pi * it / self.total_iterations))

    def _draw_committee(self) -> List[int]:
        k = min(int(self.hp["committee"]), len(self.teachers))
        if len(self.teachers) == 1:
            return [0]
        return sorted(torch.randperm(len(self.teachers), generator=self.gen)[:k].tolist())

    def step(self, it: int) -> Dict[str, float]:
        hp = self.hp
        for g in self.opt.param_groups:
            g["lr"] = self._lr(it)
        self.opt.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "ce": 0.0, "bn": 0.0}
        labels = self.labels.to(self.device)
        for b in self.batches:
            b_dev = b.to(self.device)
            x = self.augment(self.images[b_dev], it)
            y = labels[b_dev]
            chosen = self._draw_committee()
            w = torch.softmax(self.priors[chosen] / 5.0, 0).tolist()
            ce_sum = bn_sum = 0.0
            loss = x.new_zeros(())
            for wi, ti in zip(w, chosen):
                logits = self.teachers[ti](x)
                ce = F.cross_entropy(logits, y)
                bn = self.matchers[ti].loss
                loss = loss + wi * (ce + hp["r_bn"] * bn)
                ce_sum += wi * float(ce.detach())
                bn_sum += wi * float(bn.detach())
            if hp["tv_l2"] > 0 or hp["tv_l1"] > 0:
                tv_l2, tv_l1 = image_prior_losses(x)
                loss = loss + hp["tv_l2"] * tv_l2 + hp["tv_l1"] * tv_l1
            if hp["l2"] > 0:
                loss = loss + hp["l2"] * torch.linalg.vector_norm(x.flatten(1), dim=1).mean()
            if self.student is not None:
                js = _js_competition(self.student(x), logits)
                loss = loss + hp["adi_scale"] * (1 - js.clamp(0, 1))
            loss.backward()
            share = len(b) / self.labels.numel()
            totals["loss"] += share * float(loss.detach())
            totals["ce"] += share * ce_sum
            totals["bn"] += share * bn_sum
        self.opt.step()
        if self._clip_ok:
            with torch.no_grad():
                self.images.copy_(torch.maximum(torch.minimum(self.images, self._hi), self._lo))
        return totals

    # ------------------------------------------------------------------ contract
    def synthetic_set(self) -> DistilledSet:
        hp = {k: v for k, v in self.hp.items()}
        meta = {"method": self.name, "hyperparameters": {**hp, "betas": [0.5, 0.9],
                                                         "total_iterations": self.total_iterations}}
        return DistilledSet(self.images.detach().cpu().clone(), self.labels.clone(), meta)

    def state_dict(self) -> Dict[str, Any]:
        return {"images": self.images.detach().cpu().clone(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state(),
                "ema": [[None if e is None else [t.cpu() for t in e] for e in m._ema]
                        for m in self.matchers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        for m, e in zip(self.matchers, state.get("ema", [])):
            m._ema = [None if t is None else tuple(v.to(self.device) for v in t) for t in e]


@register_method
class DeepInversion(BNSynthesis):
    name = "deepinversion"
    description = "DeepInversion / ADI (Yin et al., CVPR 2020): BN statistics + CE + TV/L2 priors"
    default_iterations = 2000
    defaults = {"lr": 0.1, "r_bn": 10.0, "tv_l2": 2.5e-5, "l2": 0.0, "batch_size": 256}

    @staticmethod
    def default_jitter(h: int) -> int:
        return max(1, round(h * 2 / 32))  # the CIFAR script's ±2 at 32 px


@register_method
class SRe2L(BNSynthesis):
    name = "sre2l"
    description = "SRe2L recover (Yin, Xing & Shen, NeurIPS 2023): CE + r_bn BN loss, crops"
    default_iterations = 1000
    defaults = {"crop": "random_resized"}
    roll_symmetric = False

    @staticmethod
    def default_jitter(h: int) -> int:
        return max(1, round(h * 32 / 224))


@register_method
class CDA(SRe2L):
    name = "cda"
    description = "CDA (Yin & Shen, TMLR 2024): SRe2L with a cosine crop-scale curriculum"
    defaults = {"crop": "curriculum"}


@register_method
class CVDD(SRe2L):
    name = "cvdd"
    description = "CV-DD (Cui et al., 2025): committee of BN teachers, real initialisation"
    defaults = {"crop": "random_resized", "init": "real"}
