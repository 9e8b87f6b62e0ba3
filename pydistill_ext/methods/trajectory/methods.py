"""Trajectory-matching methods for ``pydistill distill --method mtt|tesla|datm|ftd``.

* ``mtt`` — Cazenavette et al., "Dataset Distillation by Matching Training Trajectories",
  CVPR 2022, Algorithm 1 (REFERENCE.md 5.2). Per iteration: an expert k and a start epoch
  t ~ U{min_start .. max_start−1}; θ_0 = θ*_{k,t}; ``syn_steps`` student steps with the learned
  step size α on DSA-augmented synthetic minibatches; L = ‖θ_N − θ*_{k,t+M}‖² / ‖θ*_{k,t} −
  θ*_{k,t+M}‖² (M = ``expert_epochs``); images and α updated by SGD with momentum 0.5.
  Defaults are ``distill.py``'s argparse defaults (syn_steps 20, expert_epochs 3,
  max_start_epoch 25, lr_img 1000, lr_lr 1e-5, lr_teacher 0.01, batch_syn = all images,
  5000 iterations). The gradient is computed by :func:`trajectory_step` in ``mode``
  (``exact`` by default — the same gradient as MTT's full unroll at one step's graph memory).
* ``tesla`` — Cui et al., ICML 2023 (REFERENCE.md 5.4): ``mode="tesla"`` (its
  constant-memory approximate gradient, with the factor-2 bug fixed) and, with
  ``soft_labels=true`` (TESLA's ``--teacher_label``), soft labels recomputed every iteration
  as the logits of the target expert θ*_{k,t+M} on the current images (not learned).
* ``datm`` — Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned
  Trajectory Matching", ICLR 2024 (REFERENCE.md 5.6): the start-epoch window
  [min_start, UB) with UB = current_max + (max_start − current_max)·it / expansion_end
  (capped at max_start); images initialised from real samples that an expert
  (``label_epoch``) classifies correctly; learnable soft labels initialised from the mean
  logits of the experts that classify the image correctly, updated by SGD (``lr_y``,
  momentum 0.9), inner loss soft cross-entropy; an update is skipped when L > ``threshold``.
* ``ftd`` — Du et al., "Minimizing the Accumulated Trajectory Error to Improve Dataset
  Distillation", CVPR 2023 (REFERENCE.md 5.3): MTT on flat experts (GSAM-trained buffer,
  ``expert_sam="gsam"``) and an exponential moving average of the synthetic images
  (``ema_decay``; ``ModelEmaV2``), which is the set that is returned.

**Expert buffer.** ``experts=DIR`` loads a buffer written by :func:`train_experts` (and trains
or extends it there if it is missing or too short: deterministic and resumable). Without it a
small buffer is trained in memory at construction (``num_experts`` × (max_start_epoch +
expert_epochs) epochs, the method's ``model``, ``expert_lr`` (0.01, MTT's buffer),
``expert_batch``, ``expert_sam``), which is meant
for small data such as ``digits``; a warning says so. Experts are trained as one vmapped
ensemble on CUDA and one after another on the CPU, where the vmapped (grouped-convolution)
ensemble measured slower (``benchmarks/results/bench_trajectory.md``).

**Step-size guard.** The learned α can turn NaN, negative or explode (mtt-distillation issues
6, 16, 20, 24, 42). After each update, if α is not finite, ≤ 0 or > ``max_syn_lr``, a
``RuntimeWarning`` names the value, α is restored to its last good value, ``lr_lr`` is halved
and α's momentum is cleared; an iteration whose loss or gradients are not finite changes
nothing (and warns). The counts are returned as metrics (``lr_guard``, ``skipped``).

Evaluation uses the learned α as the evaluation network's lr (REFERENCE.md 5.7): it is
saved in the distilled set as the extra tensor ``syn_lr`` and ``pydistill eval`` picks it up.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from pydistill_ext.artifacts import DistilledSet
from pydistill_ext.augment.dsa import default_strategy
from pydistill_ext.methods.base import DistillMethod, as_bool, register_method
from pydistill_ext.methods.trajectory.experts import ExpertBuffer, train_experts
from pydistill_ext.methods.trajectory.unroll import MODES, Augment, trajectory_step

_SEED_HIGH = 2 ** 62


class MTT(DistillMethod):
    """MTT and the shared machinery of TESLA, DATM and FTD (see the module docstring)."""

    name = "mtt"
    description = ("Matching Training Trajectories (Cazenavette et al., CVPR 2022); "
                   "exact constant-memory gradient by default")
    default_iterations = 5000
    defaults: Dict[str, Any] = {
        "experts": None, "num_experts": 5, "syn_steps": 20, "expert_epochs": 3,
        "min_start_epoch": 0, "max_start_epoch": 25, "lr_img": 1000.0, "lr_lr": 1e-5,
        "lr_teacher": 0.01, "batch_syn": 0, "model": "convnet", "mode": "exact",
        "dsa": True, "init": "real", "max_syn_lr": 0.0, "expert_batch": 256,
        "expert_sam": None, "expert_lr": 0.01, "checkpoint_every": None}
    options = {"experts": str, "num_experts": int, "syn_steps": int, "expert_epochs": int,
               "min_start_epoch": int, "max_start_epoch": int, "lr_img": float,
               "lr_lr": float, "lr_teacher": float, "batch_syn": int, "model": str,
               "mode": str, "dsa": bool, "init": str, "max_syn_lr": float,
               "expert_batch": int, "expert_sam": str, "expert_lr": float,
               "checkpoint_every": str}   # an int k or "sqrt"

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        super().__init__(dataset, ipc, seed, device, **options)
        hp = {**self.defaults, **options}
        for k in ("num_experts", "syn_steps", "expert_epochs", "min_start_epoch",
                  "max_start_epoch", "batch_syn", "expert_batch"):
            hp[k] = int(hp[k])
        for k in ("lr_img", "lr_lr", "lr_teacher", "max_syn_lr", "expert_lr"):
            hp[k] = float(hp[k])
        if hp["checkpoint_every"] in (None, "none", "", "None", 0, 1):
            hp["checkpoint_every"] = None
        elif hp["checkpoint_every"] != "sqrt":
            hp["checkpoint_every"] = int(hp["checkpoint_every"])
        if hp["expert_sam"] in ("none", "", "None"):
            hp["expert_sam"] = None
        hp["dsa"] = as_bool(hp["dsa"])
        if hp["mode"] not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {hp['mode']!r}")
        if hp["init"] not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {hp['init']!r}")
        if not hp["min_start_epoch"] < hp["max_start_epoch"]:
            raise ValueError(f"min_start_epoch ({hp['min_start_epoch']}) must be < "
                             f"max_start_epoch ({hp['max_start_epoch']})")
        for k in ("syn_steps", "expert_epochs", "num_experts"):
            if hp[k] < 1:
                raise ValueError(f"{k} must be >= 1, got {hp[k]}")
        for k in ("lr_img", "lr_lr", "lr_teacher"):
            if not hp[k] > 0:
                raise ValueError(f"{k} must be > 0, got {hp[k]}")
        if hp["max_syn_lr"] <= 0:            # default: 100x the initial step size
            hp["max_syn_lr"] = 100.0 * hp["lr_teacher"]
        self.hp = hp
        self.num_classes = dataset.num_classes
        self.strategy = default_strategy(dataset.name) if hp["dsa"] else None
        self.gen = torch.Generator().manual_seed(self.seed)
        self.class_indices = dataset.indices_per_class()

        self.buffer = self._load_buffer()
        self.fm = self.buffer.flat_model()
        self.fm.module.to(self.device)
        self.fm.buffers = dict(self.fm.module.named_buffers())
        self._trajs: Dict[int, torch.Tensor] = {}
        self.expert_ids = self.buffer.experts
        need = hp["max_start_epoch"] + hp["expert_epochs"]
        have = min(self.buffer.epochs(k) for k in self.expert_ids)
        if have < need:
            raise ValueError(f"the expert buffer has {have} epochs, max_start_epoch + "
                             f"expert_epochs = {need} are needed")

        self.labels = torch.arange(self.num_classes).repeat_interleave(ipc)
        init = self._init_images()
        self.images = init.detach().clone().float().to(self.device).requires_grad_(True)
        self.syn_lr = torch.tensor(hp["lr_teacher"], device=self.device).requires_grad_(True)
        self.opt_img = torch.optim.SGD([self.images], lr=hp["lr_img"], momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=hp["lr_lr"], momentum=0.5)
        self.good_lr = hp["lr_teacher"]
        self.counts = {"lr_guard": 0, "skipped": 0}
        self._setup()

    # ------------------------------------------------------------------ pieces
    def _setup(self) -> None:
        """Subclass hook (soft labels, EMA)."""

    def _check_buffer_matches(self, buf: ExpertBuffer, root: Path) -> None:
        """A buffer trained on other data (or in the other colour space) would load without
        complaint when the shapes agree (MNIST vs Fashion-MNIST; ZCA vs raw CIFAR-10)."""
        c, ds = buf.config, self.dataset
        zca = ds.zca is not None
        if c.dataset != ds.name or c.zca != zca:
            raise ValueError(
                f"experts={root}: the buffer was trained on {c.dataset!r} (zca={c.zca}), this "
                f"distillation runs on {ds.name!r} (zca={zca}); train a buffer for it with "
                f"`pydistill experts --dataset {ds.name}{' --zca' if zca else ''}`")

    def _load_buffer(self) -> ExpertBuffer:
        hp = self.hp
        epochs = hp["max_start_epoch"] + hp["expert_epochs"]
        kw = dict(model_name=hp["model"], num_experts=hp["num_experts"], epochs=epochs,
                  lr=hp["expert_lr"], batch=hp["expert_batch"], dsa=hp["dsa"],
                  seed=self.seed, sam=hp["expert_sam"], device=self.device,
                  batched=self.device.type == "cuda")
        if hp["experts"]:
            root = Path(hp["experts"])
            if (root / "buffer.json").exists():
                buf = ExpertBuffer.load(root)
                self._check_buffer_matches(buf, root)
                if len(buf) and min(buf.epochs(k) for k in buf.experts) >= epochs:
                    return buf
                # too short: continue it with its own configuration
                c = buf.config
                return train_experts(self.dataset, c.model, max(len(buf), 1), epochs, c.lr,
                                     c.batch, c.dsa, c.seed, root, momentum=c.momentum,
                                     weight_decay=c.weight_decay, sam=c.sam, rho=c.rho,
                                     gsam_alpha=c.gsam_alpha, model_kwargs=c.model_kwargs,
                                     device=self.device, batched=self.device.type == "cuda",
                                     train_subset=c.train_subset)
            return train_experts(self.dataset, out_dir=root, **kw)
        warnings.warn(f"{self.name}: no expert buffer given (option experts=DIR); training "
                      f"{hp['num_experts']} experts x {epochs} epochs in memory. Fine for "
                      "small data (digits); for real runs build one with train_experts.",
                      UserWarning, stacklevel=3)
        return train_experts(self.dataset, **kw)

    def _trajectory(self, k: int) -> torch.Tensor:
        if k not in self._trajs:
            self._trajs[k] = self.buffer.trajectory(k).to(self.device, torch.float32)
        return self._trajs[k]

    def _sample(self, c: int, n: int) -> torch.Tensor:
        idx = self.class_indices[c]
        if n <= len(idx):
            return idx[torch.randperm(len(idx), generator=self.gen)[:n]]
        return idx[torch.randint(0, len(idx), (n,), generator=self.gen)]

    def _init_images(self) -> torch.Tensor:
        if self.hp["init"] == "real":
            return torch.cat([self.dataset.train_images[self._sample(c, self.ipc)]
                              for c in range(self.num_classes)])
        return torch.randn(self.num_classes * self.ipc, self.dataset.channels,
                           *self.dataset.im_size, generator=self.gen)

    def _randint(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=self.gen))

    def start_window(self, iteration: int):
        """[lo, hi) of the start epoch (MTT: fixed)."""
        return self.hp["min_start_epoch"], self.hp["max_start_epoch"]

    def inner_labels(self, target: torch.Tensor) -> torch.Tensor:
        """The labels of the inner loop (hard labels; TESLA / DATM: soft logits)."""
        return self.labels.to(self.device)

    def accept(self, loss: float) -> bool:
        """Whether to apply this iteration's update (DATM: loss threshold)."""
        return True

    def after_update(self) -> None:
        """Subclass hook after the images have been updated (FTD: EMA)."""

    # ------------------------------------------------------------------ one iteration
    def step(self, iteration: int) -> Dict[str, float]:
        hp = self.hp
        k = self.expert_ids[self._randint(0, len(self.expert_ids))]
        lo, hi = self.start_window(iteration)
        start = self._randint(lo, hi)
        traj = self._trajectory(k)
        theta0, target = traj[start], traj[start + hp["expert_epochs"]]
        seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=self.gen))
        labels = self.inner_labels(target)
        n = self.images.shape[0]
        batch_syn = hp["batch_syn"] if hp["batch_syn"] > 0 else n
        res = trajectory_step(self.images, labels, theta0, target, self.syn_lr.detach(),
                              hp["syn_steps"], batch_syn, seed, hp["mode"], model=self.fm,
                              augment=Augment(self.strategy, per_sample=True),
                              checkpoint_every=(hp["checkpoint_every"]
                                                if hp["mode"] != "unroll" else None))
        loss = float(res.loss)
        metrics = {"loss": loss, "start_epoch": float(start)}
        grads = [res.grad_images, res.grad_lr] + ([res.grad_labels]
                                                   if res.grad_labels is not None else [])
        if not math.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads):
            self.counts["skipped"] += 1
            warnings.warn(f"{self.name}: iteration {iteration}: non-finite loss or gradient "
                          f"(loss {loss}); update skipped", RuntimeWarning, stacklevel=2)
        elif self.accept(loss):
            self.images.grad = res.grad_images.to(self.images.dtype)
            self.syn_lr.grad = res.grad_lr.to(self.syn_lr.dtype)
            self.opt_img.step()
            self.opt_lr.step()
            self._update_labels(res.grad_labels)
            self._guard_lr(iteration)
            self.after_update()
        else:
            self.counts["skipped"] += 1
        metrics.update({"syn_lr": float(self.syn_lr.detach()), **{k: float(v) for k, v in
                                                                   self.counts.items()}})
        return metrics

    def _update_labels(self, grad_labels: Optional[torch.Tensor]) -> None:
        pass

    def _guard_lr(self, iteration: int) -> None:
        """Keep the learned step size finite, > 0 and <= max_syn_lr (module docstring)."""
        v = float(self.syn_lr.detach())
        if math.isfinite(v) and 0.0 < v <= self.hp["max_syn_lr"]:
            self.good_lr = v
            return
        self.counts["lr_guard"] += 1
        with torch.no_grad():
            self.syn_lr.fill_(self.good_lr)
        self.opt_lr.state.clear()                       # drop the momentum that drove it
        for g in self.opt_lr.param_groups:
            g["lr"] *= 0.5
        warnings.warn(f"{self.name}: iteration {iteration}: the learned step size syn_lr "
                      f"became {v!r} (allowed: finite, > 0, <= max_syn_lr="
                      f"{self.hp['max_syn_lr']:g}); restored the last good value "
                      f"{self.good_lr:g} and halved lr_lr to "
                      f"{self.opt_lr.param_groups[0]['lr']:g}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ contract
    def output_images(self) -> torch.Tensor:
        return self.images.detach()

    def output_labels(self) -> torch.Tensor:
        return self.labels.clone()

    def synthetic_set(self) -> DistilledSet:
        meta = {"method": self.name,
                "hyperparameters": {**self.hp, "dsa_strategy": self.strategy,
                                    "momentum": 0.5, "lr_lr_final":
                                        self.opt_lr.param_groups[0]["lr"]},
                "syn_lr": float(self.syn_lr.detach()), "guard": dict(self.counts)}
        return DistilledSet(self.output_images().cpu().clone(), self.output_labels().cpu(),
                            meta, {"syn_lr": self.syn_lr.detach().cpu().clone().reshape(1)})

    def state_dict(self) -> Dict[str, Any]:
        return {"images": self.images.detach().cpu().clone(),
                "syn_lr": self.syn_lr.detach().cpu().clone(),
                "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict(),
                "gen": self.gen.get_state(), "good_lr": self.good_lr,
                "counts": dict(self.counts), **self._extra_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.gen.set_state(state["gen"])
        self.good_lr = state["good_lr"]
        self.counts = dict(state["counts"])
        self._load_extra_state(state)

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _load_extra_state(self, state) -> None:
        pass


register_method(MTT)


@register_method
class TESLA(MTT):
    name = "tesla"
    description = ("TESLA (Cui et al., ICML 2023): constant-memory approximate trajectory "
                   "gradient (factor-2 bug fixed), optional expert soft labels")
    defaults = {**MTT.defaults, "mode": "tesla", "soft_labels": False}
    options = {**MTT.options, "soft_labels": bool}

    def _setup(self):
        self.hp["soft_labels"] = as_bool(self.hp["soft_labels"])

    def inner_labels(self, target):
        if not self.hp["soft_labels"]:
            return super().inner_labels(target)
        with torch.no_grad():      # TESLA --teacher_label: the target expert's logits
            return self.fm(target, self.images.detach()).detach()


@register_method
class FTD(MTT):
    name = "ftd"
    description = ("FTD (Du et al., CVPR 2023): MTT on GSAM-flat experts with an EMA of the "
                   "synthetic images")
    # C10 IPC10 row of FTD's parameter table (REFERENCE.md 5.3) where it differs from MTT
    defaults = {**MTT.defaults, "syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20,
                "lr_img": 100.0, "lr_teacher": 0.001, "expert_sam": "gsam",
                "ema_decay": 0.9995}
    options = {**MTT.options, "ema_decay": float}

    def _setup(self):
        d = float(self.hp["ema_decay"])
        if not 0.0 <= d < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {d}")
        self.hp["ema_decay"] = d
        self.ema = self.images.detach().clone()

    def after_update(self):
        d = self.hp["ema_decay"]
        with torch.no_grad():      # ModelEmaV2: ema = d * ema + (1 - d) * x
            self.ema.mul_(d).add_(self.images.detach(), alpha=1.0 - d)

    def output_images(self):
        return self.ema

    def _extra_state(self):
        return {"ema": self.ema.cpu().clone()}

    def _load_extra_state(self, state):
        self.ema = state["ema"].to(self.device).clone()


@register_method
class DATM(MTT):
    name = "datm"
    description = ("DATM (Guo et al., ICLR 2024): difficulty-aligned growing start window, "
                   "correctly-classified init, learnable soft labels")
    # CIFAR-10 IPC10 config of DATM (REFERENCE.md 5.6): window 0, 10 -> 20 over 1000 its
    defaults = {**MTT.defaults, "syn_steps": 80, "expert_epochs": 2, "min_start_epoch": 0,
                "current_max_start_epoch": 10, "max_start_epoch": 20,
                "expansion_end_epoch": 1000, "lr_img": 100.0, "lr_y": 2.0,
                "momentum_y": 0.9, "threshold": 1.0, "label_epoch": -1,
                "expert_sam": "gsam"}
    options = {**MTT.options, "current_max_start_epoch": int, "expansion_end_epoch": int,
               "lr_y": float, "momentum_y": float, "threshold": float, "label_epoch": int}
    default_iterations = 10000

    def _init_images(self):
        """Real images (of each class) that the expert at ``label_epoch`` classifies correctly,
        and their labels' initial logits: the mean logits of the experts that classify the
        image correctly (DATM.py, ``samples_predicted_correctly``)."""
        hp = self.hp
        for k in ("current_max_start_epoch", "expansion_end_epoch", "label_epoch"):
            hp[k] = int(hp[k])
        for k in ("lr_y", "momentum_y", "threshold"):
            hp[k] = float(hp[k])
        if not hp["min_start_epoch"] < hp["current_max_start_epoch"] <= hp["max_start_epoch"]:
            raise ValueError("need min_start_epoch < current_max_start_epoch <= max_start_epoch")
        ds = self.dataset
        trajs = [self._trajectory(k) for k in self.expert_ids]
        ep = hp["label_epoch"]
        params = [t[ep] for t in trajs]
        chosen, logits = [], []
        for c in range(self.num_classes):
            idx = self.class_indices[c]
            order = idx[torch.randperm(len(idx), generator=self.gen)]
            picked = []
            with torch.no_grad():
                for i in range(0, len(order), 256):
                    part = order[i:i + 256]
                    x = ds.train_images[part].to(self.device)
                    ok = self.fm(params[0], x).argmax(1).cpu() == c
                    picked.extend(part[ok].tolist())
                    if len(picked) >= self.ipc:
                        break
            if len(picked) < self.ipc:          # too few correct ones: fill with others
                rest = [i for i in order.tolist() if i not in set(picked)]
                picked += rest[:self.ipc - len(picked)]
            chosen.extend(picked[:self.ipc])
        chosen = torch.tensor(chosen)
        x = ds.train_images[chosen].to(self.device)
        target = torch.arange(self.num_classes).repeat_interleave(self.ipc).to(self.device)
        with torch.no_grad():
            all_logits = torch.stack([self.fm(p, x) for p in params])      # [K, n, classes]
            ok = (all_logits.argmax(2) == target).unsqueeze(2).float()
            cnt = ok.sum(0)
            mean_ok = (all_logits * ok).sum(0) / cnt.clamp_min(1)
            mean_all = all_logits.mean(0)
            self._init_logits = torch.where(cnt > 0, mean_ok, mean_all)
        return x.cpu()

    def _setup(self):
        self.initial_label_logits = self._init_logits.detach().clone().float()
        del self._init_logits
        self.label_logits = self.initial_label_logits.clone().requires_grad_(True)
        self.opt_y = torch.optim.SGD([self.label_logits], lr=self.hp["lr_y"],
                                     momentum=self.hp["momentum_y"])

    def start_window(self, iteration):
        hp = self.hp
        ub = hp["current_max_start_epoch"] + int(
            (hp["max_start_epoch"] - hp["current_max_start_epoch"]) * iteration
            / max(1, hp["expansion_end_epoch"]))
        return hp["min_start_epoch"], min(ub, hp["max_start_epoch"])

    def inner_labels(self, target):
        return self.label_logits

    def accept(self, loss):
        return loss <= self.hp["threshold"]

    def _update_labels(self, grad_labels):
        self.label_logits.grad = grad_labels
        self.opt_y.step()

    def output_labels(self):
        return self.label_logits.detach().clone()

    def _extra_state(self):
        return {"label_logits": self.label_logits.detach().cpu().clone(),
                "opt_y": self.opt_y.state_dict()}

    def _load_extra_state(self, state):
        with torch.no_grad():
            self.label_logits.copy_(state["label_logits"].to(self.device))
        self.opt_y.load_state_dict(state["opt_y"])
