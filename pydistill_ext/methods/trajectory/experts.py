"""Expert trajectories: K networks trained at once as one batched ensemble, checkpointed every
epoch, resumable.

MTT's buffer (``buffer.py``; REFERENCE.md 5.2): each expert is a fresh ConvNet trained with SGD
(lr 0.01, momentum 0, no weight decay, batch 256, DSA) and its parameters are saved after
every epoch (epoch 0 = the initialisation). The original trains experts one after another and
reseeds from the clock; here expert ``e`` of a buffer with ``seed`` s has its own seed
``derive_seed(s, 3, e)`` which alone fixes its initialisation, its data order
(``randperm`` per epoch from ``derive_seed(expert_seed, epoch)``) and its per-batch DSA
(``derive_seed(expert_seed, epoch, batch)``, per-sample parameters as MTT's unseeded
``DiffAugment``). So an expert does not depend on which other experts it is trained with, or
whether it is trained in a batch or alone.

``batched`` stacks the K experts' flat parameter vectors into one [K, P] tensor and takes the
K gradients at once, in one of two forms:

- ``"grouped"`` (``ensemble.GroupedConvNet``): the K ConvNets stacked along the channel axis
  as one network with grouped convolutions, one forward and one backward;
- ``"vmap"``: ``torch.func.vmap(torch.func.grad(loss))`` over ``functional_call`` (the
  flat-vector form of ``stack_module_state`` + ``vmap``), for any model.

``batched=True`` picks ``"grouped"`` where the model supports it, else ``"vmap"``;
``batched=False`` runs the per-expert function in a loop (the comparison). All agree to
rounding (float64: ~1e-15). Which is fastest depends on the device: on CPU the convolutions
are compute-bound and the loop is as fast (``benchmarks/bench_trajectory.py``), so the CLI
trains sequentially there and batched on CUDA.

FTD's flat experts (Du et al., "Minimizing the Accumulated Trajectory Error to Improve Dataset
Distillation", CVPR 2023; REFERENCE.md 5.3) use GSAM (Zhuang et al., "Surrogate Gap Guided
Sharpness-Aware Minimization", ICLR 2022, Algorithm 1): with g = ∇ℓ(θ), the perturbed gradient
g' = ∇ℓ(θ + ρ g/‖g‖) on the same batch, and g_⊥ the component of g orthogonal to g',
the update direction is g' − α g_⊥ (``sam="gsam"``; ``sam="sam"`` uses g', Foret et al. 2021).
ρ is constant here (GSAM schedules it with the learning rate; FTD's buffer uses a constant lr).

Files in ``out_dir``: ``buffer.json`` (the configuration, the model's name/shape and
parameter layout) and ``expert_00000.safetensors``, ... each holding ``trajectory``
[epochs + 1, P] (float32 by default) and, with momentum, ``momentum`` [epochs + 1, P]. Every
write is atomic; a rerun with the same configuration (any ``epochs``) continues every expert
from its last saved epoch, and the result is bitwise the uninterrupted one.
"""
from __future__ import annotations

import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from pydistill_ext import artifacts as art
from pydistill_ext.augment.dsa import default_strategy, dsa_augment
from pydistill_ext.methods.trajectory.ensemble import GroupedConvNet, grouped_supported
from pydistill_ext.methods.trajectory.unroll import FlatModel, derive_seed
from pydistill_ext.models import get_model

__all__ = ["ExpertConfig", "ExpertBuffer", "train_experts", "expert_seed"]

BUFFER_FILE = "buffer.json"
_TAG_EXPERT = 3
_TAG_SUBSET = 4


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert ``index`` in a buffer made with ``seed``."""
    return derive_seed(seed, _TAG_EXPERT, index)


@dataclass
class ExpertConfig:
    """Everything an expert's trajectory depends on (except ``epochs``, which may grow)."""
    dataset: str
    model: str
    channels: int
    num_classes: int
    im_size: List[int]
    seed: int
    lr: float = 0.01
    batch: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    dsa: bool = True
    dsa_strategy: Optional[str] = None
    sam: Optional[str] = None          # None, "sam" or "gsam"
    rho: float = 0.01                  # FTD's GSAM radius (REFERENCE.md 5.3)
    gsam_alpha: float = 0.3
    dtype: str = "float32"
    model_kwargs: Dict = field(default_factory=dict)
    num_params: int = 0
    train_subset: Optional[int] = None  # experts see a seeded subset of this many images
    zca: bool = False                   # trained on ZCA-whitened images (MTT's CIFAR setting)

    def subset_indices(self, n: int) -> Optional[torch.Tensor]:
        """The training-image indices of a ``train_subset`` buffer (None: all ``n``)."""
        if self.train_subset is None or self.train_subset >= n:
            return None
        g = torch.Generator().manual_seed(derive_seed(self.seed, _TAG_SUBSET))
        return torch.randperm(n, generator=g)[:self.train_subset].sort().values

    def build(self) -> torch.nn.Module:
        return get_model(self.model, self.channels, self.num_classes, tuple(self.im_size),
                         seed=0, **self.model_kwargs)


class ExpertBuffer:
    """Expert trajectories: ``buffer.trajectory(k)`` is expert k's [epochs + 1, P] tensor.

    Backed by a directory (loaded lazily, file by file) or held in memory."""

    def __init__(self, config: ExpertConfig, root: Optional[Path] = None,
                 trajectories: Optional[Dict[int, torch.Tensor]] = None):
        self.config, self.root = config, None if root is None else Path(root)
        self._mem = dict(trajectories or {})

    @property
    def experts(self) -> List[int]:
        if self.root is None:
            return sorted(self._mem)
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("expert_*.safetensors"))

    def __len__(self) -> int:
        return len(self.experts)

    def trajectory(self, index: int) -> torch.Tensor:
        if self.root is None:
            return self._mem[index]
        return _read_expert(self.root / _expert_name(index))["trajectory"]

    def epochs(self, index: int) -> int:
        return self.trajectory(index).shape[0] - 1

    def flat_model(self) -> FlatModel:
        return FlatModel(self.config.build())

    @classmethod
    def load(cls, root) -> "ExpertBuffer":
        root = Path(root)
        meta = root / BUFFER_FILE
        if not meta.exists():
            raise FileNotFoundError(f"{root}: no {BUFFER_FILE} (not an expert buffer)")
        return cls(ExpertConfig(**json.loads(meta.read_text())["config"]), root)


def _expert_name(index: int) -> str:
    return f"expert_{index:05d}.safetensors"


def _read_expert(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def _write_expert(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    art.atomic_write(path, lambda tmp: save_file(tensors, tmp,
                                                 metadata={"config": json.dumps(meta)}))


# ------------------------------------------------------------------------------ one step
def _make_direction(model: FlatModel, cfg: ExpertConfig):
    """The per-expert update direction d(θ, x, y): the gradient, or SAM / GSAM's."""
    def loss(theta, x, y):
        return F.cross_entropy(model(theta, x), y)

    return _sam_direction(grad(loss), cfg)


def _sam_direction(g_fn, cfg: ExpertConfig):
    """Wrap a gradient function ``g_fn(θ, x, y)`` into the configured update direction. θ is
    one expert's [P] vector or the ensemble's [K, P] rows: norms and dots run over the last
    axis, so row k's direction is expert k's own."""
    if cfg.sam is None:
        return g_fn

    def direction(theta, x, y):
        g = g_fn(theta, x, y)
        # ascent step of radius ρ along g / ‖g‖ (tiny epsilon as the GSAM code)
        g_p = g_fn(theta + cfg.rho * g / (g.norm(dim=-1, keepdim=True) + 1e-12), x, y)
        if cfg.sam == "sam":
            return g_p
        coef = (g * g_p).sum(-1, keepdim=True) / (g_p.pow(2).sum(-1, keepdim=True) + 1e-12)
        return g_p - cfg.gsam_alpha * (g - coef * g_p)     # g' − α g_⊥
    return direction


def _epoch_plan(seeds: Sequence[int], epoch: int, n: int):
    return [torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(s, epoch)))
            for s in seeds]


def _batch(dataset_x, dataset_y, orders, seeds, epoch, b, cfg, strategy, device, dtype):
    xs, ys = [], []
    for order, s in zip(orders, seeds):
        idx = order[b * cfg.batch:(b + 1) * cfg.batch]
        x = dataset_x[idx].to(device, dtype)
        if cfg.dsa:
            x = dsa_augment(x, seed=derive_seed(s, epoch, b), strategy=strategy,
                            per_sample=True)
        xs.append(x)
        ys.append(dataset_y[idx].to(device))
    return xs, ys


# ------------------------------------------------------------------------------ training
def train_experts(dataset, model_name: str = "convnet", num_experts: int = 1, epochs: int = 1,
                  lr: float = 0.01, batch: int = 256, dsa: bool = True, seed: int = 0,
                  out_dir=None, batched: Union[bool, str] = True, *, momentum: float = 0.0,
                  weight_decay: float = 0.0, sam: Optional[str] = None, rho: float = 0.01,
                  gsam_alpha: float = 0.3, first_expert: int = 0, group: Optional[int] = None,
                  dtype: torch.dtype = torch.float32, device="cpu", progress: bool = False,
                  model_kwargs: Optional[Dict] = None, stop_after_epochs: Optional[int] = None,
                  train_subset: Optional[int] = None) -> ExpertBuffer:
    """Train experts ``first_expert .. first_expert + num_experts − 1`` for ``epochs`` epochs.

    Defaults are MTT's buffer (lr 0.01, momentum 0, batch 256, DSA). ``batched`` (``True``,
    ``"grouped"`` or ``"vmap"``, see the module docstring) trains ``group`` experts at a time
    (default: all) as one ensemble; ``batched=False`` one after another. With ``out_dir`` the
    trajectories are written there (and an existing buffer with the same configuration is
    continued from its last saved epoch); without, they are kept in memory. ``first_expert``
    lets ranks (torchrun) train disjoint slices of one buffer. ``stop_after_epochs`` trains
    every expert at most that many epochs in this call (time slicing; tests use it to
    interrupt). ``train_subset``: every expert trains on the same seeded
    subset of that many training images (a reduced buffer for CPU-sized runs; recorded in
    the configuration). Returns the :class:`ExpertBuffer`.
    """
    if sam not in (None, "sam", "gsam"):
        raise ValueError(f"sam must be None, 'sam' or 'gsam', got {sam!r}")
    for name, v in (("num_experts", num_experts), ("epochs", epochs), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if train_subset is not None and (not isinstance(train_subset, int) or train_subset < 1):
        raise ValueError(f"train_subset must be None or an int >= 1, got {train_subset!r}")
    if batched not in (True, False, "grouped", "vmap"):
        raise ValueError(f"batched must be True, False, 'grouped' or 'vmap', got {batched!r}")
    device = torch.device(device)
    model_kwargs = dict(model_kwargs or {})
    net = get_model(model_name, dataset.channels, dataset.num_classes, dataset.im_size, seed=0,
                    **model_kwargs)
    fm = FlatModel(net.to(device=device, dtype=dtype))
    if batched is True:
        batched = "grouped" if grouped_supported(net) else "vmap"
    elif batched == "grouped" and not grouped_supported(net):
        raise ValueError(f"batched='grouped' needs a ConvNet with instance/group/no norm; "
                         f"model {model_name!r} {model_kwargs} is not one (use 'vmap')")
    cfg = ExpertConfig(dataset=dataset.name, model=model_name, channels=dataset.channels,
                       num_classes=dataset.num_classes, im_size=list(dataset.im_size),
                       seed=int(seed), lr=float(lr), batch=int(batch), momentum=float(momentum),
                       weight_decay=float(weight_decay), dsa=bool(dsa),
                       dsa_strategy=default_strategy(dataset.name) if dsa else None, sam=sam,
                       rho=float(rho), gsam_alpha=float(gsam_alpha),
                       dtype=str(dtype).replace("torch.", ""), model_kwargs=model_kwargs,
                       num_params=fm.num_params,
                       train_subset=(None if train_subset is None
                                     or train_subset >= dataset.train_labels.numel()
                                     else int(train_subset)),
                       zca=dataset.zca is not None)
    root = None
    if out_dir is not None:
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / BUFFER_FILE
        if meta_path.exists():
            # fields added since a buffer was written take their defaults
            old = {**{f.name: f.default for f in fields(ExpertConfig)
                      if f.default is not MISSING},
                   **json.loads(meta_path.read_text())["config"]}
            if old != asdict(cfg):
                diff = {k: (old.get(k), v) for k, v in asdict(cfg).items() if old.get(k) != v}
                raise ValueError(f"{root} holds a buffer with another configuration "
                                 f"(saved, requested): {diff}")
        else:
            art.write_json(meta_path, {"config": asdict(cfg)})
    indices = list(range(first_expert, first_expert + num_experts))
    group = len(indices) if (group is None or not batched) else max(1, int(group))
    mem: Dict[int, torch.Tensor] = {}
    stats = {"seconds": 0.0, "images": 0}
    # stop_after_epochs counts per expert: each group trains at most that many epochs
    if batched:
        for j in range(0, len(indices), group):
            _train_group(dataset, fm, cfg, indices[j:j + group], epochs, root, mem, batched,
                         dtype, device, progress, [stop_after_epochs], stats)
    else:
        for e in indices:
            _train_group(dataset, fm, cfg, [e], epochs, root, mem, False, dtype, device,
                         progress, [stop_after_epochs], stats)
    buf = ExpertBuffer(cfg, root, None if root is not None else mem)
    stats["batched"] = batched
    buf.stats = stats
    return buf


def _train_group(dataset, fm: FlatModel, cfg: ExpertConfig, indices: List[int], epochs: int,
                 root, mem, batched, dtype, device, progress, budget, stats):
    seeds = [expert_seed(cfg.seed, e) for e in indices]
    K, P = len(indices), fm.num_params
    # every expert's saved trajectory so far (resume), else its seeded initialisation
    trajs: List[List[torch.Tensor]] = []
    moms: List[List[torch.Tensor]] = []
    for e, s in zip(indices, seeds):
        path = None if root is None else root / _expert_name(e)
        if path is not None and path.exists():
            t = _read_expert(path)
            trajs.append(list(t["trajectory"].to(dtype).unbind(0)))
            moms.append(list(t["momentum"].to(dtype).unbind(0)) if "momentum" in t else [])
        else:
            init = get_model(cfg.model, cfg.channels, cfg.num_classes, tuple(cfg.im_size),
                             seed=s, **cfg.model_kwargs)
            trajs.append([fm.flatten(init).to(dtype)])
            moms.append([torch.zeros(P, dtype=dtype)] if cfg.momentum else [])
    start = min(len(t) - 1 for t in trajs)
    if start >= epochs:
        _store(root, mem, indices, trajs, moms, cfg, write=False)
        return
    # an interruption between two experts' writes leaves some one epoch ahead: restart all
    # from the common epoch (recomputing it gives the same bits)
    trajs = [t[:start + 1] for t in trajs]
    moms = [m[:start + 1] for m in moms]
    theta = torch.stack([t[start] for t in trajs]).to(device)
    mom = torch.stack([m[start] for m in moms]).to(device) if cfg.momentum else None
    direction = _make_direction(fm, cfg)
    if batched == "grouped":
        batched_dir = _sam_direction(GroupedConvNet(fm.module).grad_fn(), cfg)
    else:
        batched_dir = vmap(direction) if batched else None
    x_all, y_all = dataset.train_images, dataset.train_labels
    keep = cfg.subset_indices(x_all.shape[0])
    if keep is not None:
        x_all, y_all = x_all[keep], y_all[keep]
    n = x_all.shape[0]
    nb = -(-n // cfg.batch)
    strategy = cfg.dsa_strategy
    for epoch in range(start, epochs):
        if budget[0] is not None:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        t0 = time.perf_counter()
        orders = _epoch_plan(seeds, epoch, n)
        for b in range(nb):
            xs, ys = _batch(x_all, y_all, orders, seeds, epoch, b, cfg, strategy, device, dtype)
            if batched:
                d = batched_dir(theta, torch.stack(xs), torch.stack(ys))
            else:
                d = torch.stack([direction(theta[k], xs[k], ys[k]) for k in range(K)])
            if cfg.weight_decay:
                d = d + cfg.weight_decay * theta
            if mom is not None:           # torch.optim.SGD's momentum (dampening 0)
                mom = cfg.momentum * mom + d      # buffer starts at 0: first step = d
                d = mom
            theta = theta - cfg.lr * d
        stats["seconds"] += time.perf_counter() - t0
        stats["images"] += n * K
        for k in range(K):
            trajs[k].append(theta[k].detach().cpu().clone())
            if mom is not None:
                moms[k].append(mom[k].detach().cpu().clone())
        _store(root, mem, indices, trajs, moms, cfg, write=True)
        if progress:
            print(f"experts {indices[0]}..{indices[-1]}: epoch {epoch + 1}/{epochs} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)


def _store(root, mem, indices, trajs, moms, cfg, write):
    for k, e in enumerate(indices):
        tensors = {"trajectory": torch.stack(trajs[k])}
        if moms[k]:
            tensors["momentum"] = torch.stack(moms[k]).to(tensors["trajectory"].dtype)
        if root is None:
            mem[e] = tensors["trajectory"]
        elif write:
            _write_expert(root / _expert_name(e), tensors, {"expert": e, **asdict(cfg)})
