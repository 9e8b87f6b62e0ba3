"""Knowledge distillation of a classifier: Hinton, Vinyals & Dean, "Distilling the Knowledge in a
Neural Network" (2015), Sec. 2: the student minimises

    L = alpha * CE(student(x), y) + (1 - alpha) * T^2 * D(softmax(t/T) || softmax(s/T))

with D the forward KL of the paper or any divergence of ``pde.kd_loss`` (reverse KL, JSD,
skew KL, TVD). The T^2 factor keeps the soft term's gradient scale independent of T (Sec. 2).
alpha = 1 is plain supervised training: the "without KD" baseline.

The teacher is frozen and deterministic on un-augmented inputs, so its logits are computed
once per image (``teacher_logits``) and reused every epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from pydistill_ext.artifacts import load_checkpoint, save_checkpoint


@dataclass
class KDConfig:
    epochs: int = 3
    alpha: float = 0.1                 # weight of the hard-label cross-entropy
    temperature: float = 4.0
    divergence: str = "forward_kl"
    beta: float = 0.5                  # for jsd / skew divergences
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    device: str = "cpu"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def to_dict(self):
        return asdict(self)


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                   labels: torch.Tensor, *, alpha: float, temperature: float,
                   divergence: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * D_T (Hinton et al. 2015, Sec. 2)."""
    from pydistill_ext import kd_loss
    loss = student_logits.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(student_logits, labels)
    if alpha < 1:
        if teacher_logits is None:
            raise ValueError("teacher_logits is required when alpha < 1")
        soft = kd_loss(student_logits, teacher_logits.to(student_logits.dtype),
                       divergence=divergence, beta=beta, temperature=temperature,
                       reduction="batchmean")
        loss = loss + (1 - alpha) * temperature ** 2 * soft
    return loss


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000,
                   device="cpu") -> torch.Tensor:
    teacher.eval()
    return torch.cat([teacher(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, images.shape[0], batch_size)])


def train_student(student: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  config: KDConfig, seed: int, *, soft_targets: Optional[torch.Tensor] = None,
                  test: Optional[tuple] = None, checkpoint_path=None,
                  stop_after_epochs: Optional[int] = None,
                  progress: bool = False) -> Dict[str, list]:
    """Train ``student`` in place with ``hinton_kd_loss`` (SGD + momentum, cosine lr per step).

    ``soft_targets``: the teacher's logits for ``images`` (required unless alpha == 1).
    ``test``: (images, labels) evaluated after each epoch. ``checkpoint_path``: saved after
    every epoch; an existing one is resumed (same result as an uninterrupted run).
    ``stop_after_epochs``: train at most this many epochs in this call (time slices).
    """
    from pydistill_ext.evaluation.protocol import test_accuracy
    device = torch.device(config.device)
    student.to(device).train()
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    opt = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    history: Dict[str, list] = {"epoch": [], "train_loss": [], "test_acc": [], "seconds": []}
    start = 0
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        ck = load_checkpoint(checkpoint_path)
        if ck["config"] != config.to_dict() or ck["seed"] != int(seed):
            raise ValueError(f"checkpoint {checkpoint_path} belongs to another configuration")
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        history, start = ck["history"], ck["epoch"]
    end = config.epochs if stop_after_epochs is None else min(config.epochs,
                                                               start + stop_after_epochs)
    epochs = range(start, end)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, desc=f"kd seed {seed} alpha {config.alpha}", initial=start,
                      total=config.epochs, leave=False)
    for ep in epochs:
        t0 = time.perf_counter()
        student.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for b, i in enumerate(range(0, n, config.batch_size)):
            step = ep * steps_per_epoch + b
            lr = 0.5 * config.lr * (1 + math.cos(math.pi * step / total_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[i:i + config.batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            t = None if soft_targets is None else soft_targets[idx].to(device)
            loss = hinton_kd_loss(student(x), t, y, alpha=config.alpha,
                                  temperature=config.temperature,
                                  divergence=config.divergence, beta=config.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        history["epoch"].append(ep + 1)
        history["train_loss"].append(total / n)
        history["seconds"].append(time.perf_counter() - t0)
        history["test_acc"].append(test_accuracy(student, *test, device=device) if test else
                                   float("nan"))
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {
                "config": config.to_dict(), "seed": int(seed), "epoch": ep + 1,
                "student": student.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(), "history": history})
    return history


def teacher_inputs(dataset, teacher, images: torch.Tensor) -> torch.Tensor:
    """Map images from ``dataset``'s preprocessed space to the teacher's input normalisation
    (identity when both use the same mean/std and no ZCA)."""
    mean = getattr(teacher, "input_mean", None)
    std = getattr(teacher, "input_std", None)
    if mean is None or (tuple(mean) == tuple(dataset.mean) and tuple(std) == tuple(dataset.std)
                        and dataset.zca is None):
        return images
    px = dataset.to_pixels(images)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (px - m) / s
