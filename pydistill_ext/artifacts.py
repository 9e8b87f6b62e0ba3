"""Run artefacts: the distilled set, metrics, image grid, curves and checkpoints.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``),
so an interrupted run never leaves a half-written artefact. Artefacts are read back only
through safetensors or ``torch.load(weights_only=True)``: nothing here unpickles code.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

DISTILLED_FILE = "distilled.safetensors"
METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
CURVES_FILE = "curves.png"
CHECKPOINT_FILE = "checkpoint.pt"


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj: Dict[str, Any]) -> Path:
    def _write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
    return atomic_write(path, _write)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# distilled sets
# ---------------------------------------------------------------------------------------------

@dataclass
class DistilledSet:
    """A synthetic (or coreset) training set in the dataset's preprocessed space.

    ``images`` float32 [N, C, H, W]; ``labels`` int64 [N] (hard) or float32 [N, classes]
    (soft labels, stored as *logits*: the evaluation trains on softmax(labels / T) through
    ``pde.kd_loss``). ``extras`` holds further tensors a method learned (e.g. ``syn_lr``);
    ``meta`` is JSON (dataset, method, preprocessing) kept in the safetensors header.
    """
    images: torch.Tensor
    labels: torch.Tensor
    meta: Dict[str, Any] = field(default_factory=dict)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        validate_distilled(self.images, self.labels)

    @property
    def soft(self) -> bool:
        return self.labels.is_floating_point()

    def __len__(self) -> int:
        return self.images.shape[0]


def validate_distilled(images: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None,
                       where: str = "distilled set"):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{where}: images must be a floating tensor [N, C, H, W], got {got}")
    if not isinstance(labels, torch.Tensor) or labels.dim() not in (1, 2):
        raise ValueError(f"{where}: labels must be int64 [N] or float [N, classes]")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.dim() == 1:
        if labels.is_floating_point():
            raise ValueError(f"{where}: hard labels must be integer, got {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{where}: labels must be >= 0, got {int(labels.min())}")
        if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
            raise ValueError(f"{where}: label {int(labels.max())} out of range for "
                             f"{num_classes} classes")
    else:
        if not labels.is_floating_point():
            raise ValueError(f"{where}: soft labels [N, classes] must be floating, got {labels.dtype}")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise ValueError(f"{where}: soft labels have {labels.shape[1]} classes, "
                             f"dataset has {num_classes}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{where}: images contain NaN or inf")


def save_distilled(path, dset: DistilledSet) -> Path:
    from safetensors.torch import save_file
    tensors = {"images": dset.images.detach().to("cpu", torch.float32).contiguous(),
               "labels": (dset.labels.detach().to("cpu", torch.float32) if dset.soft
                          else dset.labels.detach().to("cpu", torch.int64)).contiguous()}
    for k, v in dset.extras.items():
        if k in tensors:
            raise ValueError(f"extra tensor name {k!r} is reserved")
        tensors[k] = v.detach().to("cpu").contiguous()
    meta = {"pydistill_meta": json.dumps(dset.meta, default=_json_default)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_distilled(path) -> DistilledSet:
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        path = path / DISTILLED_FILE
    if not path.exists():
        raise FileNotFoundError(f"distilled set not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pydistill_meta", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    for key in ("images", "labels"):
        if key not in tensors:
            raise ValueError(f"{path}: missing tensor {key!r} (has {sorted(tensors)})")
    images, labels = tensors.pop("images"), tensors.pop("labels")
    validate_distilled(images, labels, where=str(path))
    return DistilledSet(images, labels, meta, tensors)


# ---------------------------------------------------------------------------------------------
# pictures (matplotlib, Agg: no display needed)
# ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_grid(path, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int,
              class_names=None, max_per_class: int = 10) -> Path:
    """One row per class, up to ``max_per_class`` images each; ``pixels`` in [0, 1]."""
    plt = _pyplot()
    hard = labels.argmax(1) if labels.is_floating_point() else labels
    rows = [torch.nonzero(hard == c).flatten()[:max_per_class] for c in range(num_classes)]
    cols = max(1, max(len(r) for r in rows))
    fig, axes = plt.subplots(num_classes, cols, figsize=(cols * 0.9 + 1.2, num_classes * 0.9),
                             squeeze=False)
    for c, idx in enumerate(rows):
        for j in range(cols):
            ax = axes[c][j]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(idx):
                img = pixels[idx[j]].detach().float().clamp(0, 1).cpu()
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
            if j == 0:
                name = class_names[c] if class_names else str(c)
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return out


def save_curves(path, history: Dict[str, list], x_key: str = "iteration",
                overlay: bool = False) -> Optional[Path]:
    """One panel per recorded series (loss, accuracy, ...) against ``x_key``, or all series in
    one panel with a legend (``overlay``)."""
    series = {k: v for k, v in history.items() if k != x_key and len(v) > 0}
    if not series:
        return None
    plt = _pyplot()
    panels = 1 if overlay else len(series)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels + (2 if overlay else 0), 3),
                             squeeze=False)
    xs_all = history.get(x_key)
    for i, (name, ys) in enumerate(series.items()):
        ax = axes[0][0 if overlay else i]
        if ys and isinstance(ys[0], (list, tuple)):  # [(x, y), ...] for sparse series
            xs, ys = [p[0] for p in ys], [p[1] for p in ys]
        else:
            xs = xs_all if xs_all and len(xs_all) == len(ys) else list(range(len(ys)))
        ax.plot(xs, ys, marker="." if len(ys) < 50 else None, label=name)
        if overlay:
            ax.legend(fontsize=6)
        else:
            ax.set_title(name)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path, state: Dict[str, Any]) -> Path:
    """``state`` must hold only tensors, numbers, strings, lists/dicts of them (loadable with
    ``weights_only=True``)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
