"""`RealDataset`: a real (non-synthetic) image dataset held in memory, already preprocessed.

Images are float32 [N, C, H, W] in the dataset's *model space*: pixels in [0, 1], normalised
per channel ``(p - mean) / std`` (when ``normalize=True``) and then ZCA-whitened (when a
`ZCA` is attached). `preprocess` maps [0, 1] pixels into that space, `to_pixels` maps back.

`build_dataset` is the common constructor used by the built-in and user-data loaders.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from pydistill_ext.data.zca import ZCA

__all__ = ["RealDataset", "build_dataset", "balanced_split", "check_labels"]


@dataclass(eq=False, repr=False)
class RealDataset:
    """A labelled image dataset with a train and a test split (see the module docstring).

    ``mean``/``std`` are the per-channel pixel-space statistics that `preprocess` applies;
    with ``normalize=False`` they are (0, ...)/(1, ...), i.e. images stay in [0, 1].
    """

    name: str
    num_classes: int
    class_names: list[str]
    channels: int
    im_size: tuple[int, int]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalize: bool = True
    zca: ZCA | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict)  # loader-specific, JSON-serialisable notes

    # ------------------------------------------------------------------ conversions
    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (self.channels, 1, 1)
        m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
        s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
        return m, s

    def _check_shape(self, x: Tensor, what: str) -> None:
        want = (self.channels, *self.im_size)
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}.{what}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or tuple(x.shape[-3:]) != want:
            raise ValueError(f"{self.name}.{what}: expected [N, {want[0]}, {want[1]}, {want[2]}] "
                             f"or [{want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")

    def preprocess(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels [N, C, H, W] (or [C, H, W]) -> model space (normalise, then ZCA).

        Differentiable, not in place; float32 on the input's device.
        """
        self._check_shape(pixels, "preprocess")
        x = pixels.float()
        if self.normalize:
            m, s = self._stats(x)
            x = (x - m) / s
        if self.zca is not None:
            x = self.zca.transform(x)
        return x

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model space -> [0, 1] pixels (un-ZCA, un-normalise, clamp); for viewing/saving."""
        self._check_shape(x, "to_pixels")
        x = x.detach().float()
        if self.zca is not None:
            x = self.zca.inverse(x)
        if self.normalize:
            m, s = self._stats(x)
            x = x * s + m
        return x.clamp(0.0, 1.0)

    # ------------------------------------------------------------------ helpers
    def indices_per_class(self) -> list[Tensor]:
        """For each class c, the ascending int64 indices of the train images with label c."""
        order = torch.argsort(self.train_labels, stable=True)
        counts = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
        return list(torch.split(order, counts))

    def subset_train(self, indices: Sequence[int] | Tensor) -> "RealDataset":
        """A copy whose train split is ``train[indices]`` (test split, stats and ZCA shared)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(self, train_images=self.train_images[idx],
                                   train_labels=self.train_labels[idx], extra=dict(self.extra))

    def describe(self) -> dict:
        """JSON-serialisable summary (for metrics.json)."""
        d = {
            "name": self.name,
            "source": self.source,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "channels": self.channels,
            "im_size": list(self.im_size),
            "train_size": int(self.train_labels.numel()),
            "test_size": int(self.test_labels.numel()),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "normalize": bool(self.normalize),
            "zca": self.zca is not None,
            "zca_eps": float(self.zca.eps) if self.zca is not None else None,
        }
        if self.extra:
            d.update(self.extra)
        return d

    def __repr__(self) -> str:
        return (f"RealDataset(name={self.name!r}, num_classes={self.num_classes}, "
                f"channels={self.channels}, im_size={self.im_size}, train={self.train_labels.numel()}, "
                f"test={self.test_labels.numel()}, normalize={self.normalize}, "
                f"zca={None if self.zca is None else self.zca.eps})")


# ---------------------------------------------------------------------- construction helpers
def check_labels(labels, *, what: str, num_classes: int | None = None) -> np.ndarray:
    """Validate labels (1-D, integer-valued, >= 0, < num_classes) and return int64 numpy."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{what}: labels must be 1-D [N], got shape {y.shape}")
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        if y.size and (not np.isfinite(y).all() or (y != np.round(y)).any()):
            bad = y[~np.isfinite(y) | (y != np.round(y))][0] if y.size else None
            raise ValueError(f"{what}: labels must be integers, found the non-integer value {bad!r}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{what}: labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise ValueError(f"{what}: label {int(y.max())} is out of range for {num_classes} classes "
                         f"(labels must be in 0..{num_classes - 1})")
    return y


def balanced_split(labels: np.ndarray, num_classes: int, *, seed: int,
                   test_per_class: int | None = None,
                   test_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-balanced train/test split; returns ascending (train_idx, test_idx).

    Class c is shuffled with ``numpy.random.default_rng([seed, c])`` (independent of every global
    RNG), and its first ``test_per_class`` (or ``round(n_c * test_fraction)``, leaving at least one
    train image, rounding halves up) go to the test split.
    """
    labels = np.asarray(labels)
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n = idx.size
        if test_per_class is not None:
            k = min(test_per_class, n)
        else:
            k = int(n * float(test_fraction) + 0.5) if n > 1 else 0  # round half up
            k = min(k, n - 1) if n > 0 else 0
        perm = np.random.default_rng([int(seed), c]).permutation(idx)
        test.append(perm[:k])
        train.append(perm[k:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(train).astype(np.int64), cat(test).astype(np.int64)


def _to_float_pixels(x, what: str) -> Tensor:
    """uint8 (0..255) or float ([0, 1]) [N, C, H, W] -> new float32 torch tensor in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if t.is_floating_point():
        out = t.to(torch.float32, copy=True).contiguous()
        if out.numel():
            if torch.isnan(out).any():
                raise ValueError(f"{what}: images contain nan values")
            lo, hi = float(out.min()), float(out.max())
            if lo < -1e-4 or hi > 1 + 1e-4 or not np.isfinite([lo, hi]).all():
                raise ValueError(f"{what}: float images must be in [0, 1], found values in [{lo:g}, {hi:g}]")
            out.clamp_(0.0, 1.0)
        return out
    raise ValueError(f"{what}: images must be uint8 (0..255) or float in [0, 1], got {t.dtype}")


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of x [N, C, H, W], accumulated in float64."""
    C = x.shape[1]
    s = torch.zeros(C, dtype=torch.float64)
    s2 = torch.zeros(C, dtype=torch.float64)
    for i in range(0, x.shape[0], 4096):
        ch = x[i:i + 4096].double()
        s += ch.sum(dim=(0, 2, 3))
        s2 += (ch * ch).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant channel: leave unscaled
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_dataset(name: str, train_x, train_y, test_x, test_y, *, class_names: Sequence[str] | None = None,
                  num_classes: int | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, normalize: bool = True, zca: bool = False,
                  zca_eps: float = 0.1, source: str | None = None, extra: dict | None = None) -> RealDataset:
    """Assemble a `RealDataset` from [N, C, H, W] images (uint8 0..255 or float [0, 1]).

    Labels are validated; `mean`/`std` default to the train split's per-channel statistics;
    normalisation and ZCA (fitted on the normalised train images) are applied in place.
    """
    what = f"dataset {name!r}" if source is None else f"{source}"
    for split, x in (("train", train_x), ("test", test_x)):
        if x.ndim != 4:
            raise ValueError(f"{what}: {split} images must be [N, C, H, W], got shape {tuple(x.shape)}")
    if train_x.shape[0] == 0:
        raise ValueError(f"{what}: the dataset is empty (no training images)")
    if tuple(train_x.shape[1:]) != tuple(test_x.shape[1:]) and test_x.shape[0] > 0:
        raise ValueError(f"{what}: train images are {tuple(train_x.shape[1:])} but test images are "
                         f"{tuple(test_x.shape[1:])} (C, H, W)")
    if len(train_y) != train_x.shape[0]:
        raise ValueError(f"{what}: {train_x.shape[0]} train images but {len(train_y)} train labels")
    if len(test_y) != test_x.shape[0]:
        raise ValueError(f"{what}: {test_x.shape[0]} test images but {len(test_y)} test labels")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"{what}: num_classes={num_classes} but {len(class_names)} class names")
        num_classes = len(class_names)
    ytr = check_labels(train_y, what=f"{what} (train labels)", num_classes=num_classes)
    yte = check_labels(test_y, what=f"{what} (test labels)", num_classes=num_classes)
    if num_classes is None:
        num_classes = int(max(ytr.max(), yte.max() if yte.size else 0)) + 1
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]

    xtr = _to_float_pixels(train_x, f"{what} (train images)")
    xte = _to_float_pixels(test_x, f"{what} (test images)")
    C, H, W = xtr.shape[1:]
    if normalize:
        if mean is None or std is None:
            mean, std = _channel_stats(xtr)
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != C or len(std) != C:
            raise ValueError(f"{what}: mean/std have {len(mean)}/{len(std)} entries for {C} channels")
        m = torch.tensor(mean, dtype=torch.float32).view(1, C, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, C, 1, 1)
        for x in (xtr, xte):
            x.sub_(m).div_(s)
    else:
        mean, std = (0.0,) * C, (1.0,) * C
    zca_obj = None
    if zca:
        zca_obj = ZCA.fit(xtr, eps=zca_eps)
        zca_obj.transform_(xtr)
        if xte.shape[0]:
            zca_obj.transform_(xte)
    return RealDataset(name=name, num_classes=int(num_classes), class_names=list(class_names),
                       channels=int(C), im_size=(int(H), int(W)),
                       train_images=xtr, train_labels=torch.from_numpy(ytr),
                       test_images=xte, test_labels=torch.from_numpy(yte),
                       mean=mean, std=std, normalize=bool(normalize), zca=zca_obj,
                       source=source, extra=dict(extra or {}))
