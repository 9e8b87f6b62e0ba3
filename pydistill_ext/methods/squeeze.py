"""Squeeze: train the BatchNorm teacher that data-free / decoupled synthesis inverts.

SRe2L (Yin, Xing & Shen, NeurIPS 2023) calls the first of its three stages "squeeze": an
ordinary supervised training of a BN network on the real data, whose running statistics the
recover stage then matches (DeepInversion, ZeroQ, CDA and CV-DD need the same kind of network).

:func:`train_teacher` trains ``model`` (default ``convnet-bn``: ConvNet-3 with BatchNorm; also
``resnet18``, ``resnet10``, ``convnet-small``, ...) with SGD (momentum 0.9, weight decay 5e-4,
cosine learning rate), batch 128, and the usual light augmentation drawn from one seeded
generator (DSA's crop and, except for digit datasets, flip: the standard random-crop/flip
recipe). It checkpoints after every epoch (``teacher.ckpt``) and resumes bitwise exactly, and
writes ``teacher.safetensors`` whose metadata holds the model name, shapes, normalisation
and test accuracy. :func:`load_teacher` rebuilds the network in eval mode from that file.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pydistill_ext import artifacts as art
from pydistill_ext.augment.dsa import default_strategy, dsa_augment
from pydistill_ext.evaluation.protocol import test_accuracy
from pydistill_ext.models import get_model

__all__ = ["train_teacher", "load_teacher", "TEACHER_FILE"]

TEACHER_FILE = "teacher.safetensors"
_CKPT = "teacher.ckpt"


def _strategy(dataset_name: str) -> str:
    """DSA's crop, plus flip unless the dataset's default DSA strategy drops it (digits)."""
    return "crop_flip" if "flip" in default_strategy(dataset_name) else "crop"


def train_teacher(dataset, *, model: str = "convnet-bn", epochs: int = 10, lr: float = 0.05,
                  batch_size: int = 128, seed: int = 0, out_dir=None, device: str = "cpu",
                  resume: bool = False, progress: bool = False,
                  train_subset: Optional[int] = None) -> Dict[str, Any]:
    """Train a teacher; returns ``{"model", "path", "test_accuracy", "seconds", ...}``.

    ``train_subset``: use the first N images of a seeded permutation of the training set
    (quick teachers for tests). ``out_dir`` None: nothing is written.
    """
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    dev = torch.device(device)
    net = get_model(model, dataset.channels, dataset.num_classes, dataset.im_size,
                    seed=seed).to(dev)
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    images, labels = dataset.train_images, dataset.train_labels
    if train_subset is not None:
        keep = torch.randperm(images.shape[0], generator=gen)[:int(train_subset)]
        images, labels = images[keep], labels[keep]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    config = {"model": model, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
              "train_subset": train_subset, "dataset": dataset.name}
    out = Path(out_dir) if out_dir is not None else None
    start, history, elapsed = 0, {"train_loss": []}, 0.0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / _CKPT).exists():
            ck = art.load_checkpoint(out / _CKPT)
            if ck["config"] != config:
                raise ValueError(f"resume: {out / _CKPT} was made with {ck['config']}, "
                                 f"this call asks for {config}")
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            gen.set_state(ck["gen"])
            start, history, elapsed = ck["epoch"], ck["history"], ck["elapsed"]
    strategy = _strategy(dataset.name)
    t0 = time.perf_counter()
    epochs_iter = range(start, epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs_iter = tqdm(epochs_iter, desc=f"squeeze {model}", initial=start, total=epochs)
    for ep in epochs_iter:
        net.train()
        order = torch.randperm(images.shape[0], generator=gen)
        total = 0.0
        for i in range(0, images.shape[0], batch_size):
            idx = order[i:i + batch_size]
            x, y = images[idx].to(dev), labels[idx].to(dev)
            s = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            x = dsa_augment(x, seed=s, strategy=strategy, per_sample=True, mode="all")
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        history["train_loss"].append(total / images.shape[0])
        if out is not None:
            art.save_checkpoint(out / _CKPT, {
                "config": config, "epoch": ep + 1, "history": history, "model": net.state_dict(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                "elapsed": elapsed + time.perf_counter() - t0})
    net.eval()
    acc = test_accuracy(net, dataset.test_images, dataset.test_labels, device=dev)
    result = {**config, "test_accuracy": acc, "history": history,
              "seconds": elapsed + time.perf_counter() - t0,
              "channels": dataset.channels, "num_classes": dataset.num_classes,
              "im_size": list(dataset.im_size), "path": None}
    if out is not None:
        meta = {"pydistill_teacher": json.dumps({k: v for k, v in result.items()
                                                 if k not in ("history", "path")})}
        path = out / TEACHER_FILE
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        art.atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
        art.write_json(out / "teacher.json", {k: v for k, v in result.items() if k != "path"})
        result["path"] = str(path)
    result["net"] = net
    return result


def load_teacher(path, device: str = "cpu") -> torch.nn.Module:
    """The network saved by :func:`train_teacher` (a directory or its teacher.safetensors),
    in eval mode with gradients off; ``net.teacher_info`` holds the metadata."""
    p = Path(path)
    if p.is_dir():
        p = p / TEACHER_FILE
    if not p.exists():
        raise FileNotFoundError(f"teacher file {p} does not exist; train one with "
                                "`pydistill squeeze --dataset NAME --out DIR`")
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    if "pydistill_teacher" not in meta:
        raise ValueError(f"{p} is not a pydistill teacher file (no 'pydistill_teacher' metadata)")
    info = json.loads(meta["pydistill_teacher"])
    net = get_model(info["model"], info["channels"], info["num_classes"], tuple(info["im_size"]),
                    seed=0)
    net.load_state_dict(load_file(str(p)))
    net = net.to(device).eval()
    net.requires_grad_(False)
    net.teacher_info = info
    return net
