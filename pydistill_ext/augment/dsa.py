"""Differentiable Siamese Augmentation (DSA): parameters, and the pure-PyTorch reference path.

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021.
Semantics and defaults follow `VICO-UoE/DatasetCondensation: utils.py` (`ParamDiffAug`,
`DiffAugment`, `rand_*`); the randomness does not: every parameter here comes from one CPU
`torch.Generator` seeded with the caller's ``seed`` (the original reseeds the global RNG with
``seed + k`` before its k-th draw, on the tensor's device).

Two steps, both public (the fused native op consumes the same parameters):

* :func:`dsa_params` draws a :class:`DSATransform` (plain CPU tensors, one value per sample)
  from ``seed`` and the batch shape. It never looks at pixel values.
* :func:`dsa_apply` applies a transform to a batch, differentiably w.r.t. the batch: by
  default through the fused op ``pydistill_ext::dsa_apply_forward``
  (pydistill_ext/ops/dsa_augment.py), with ``fused=False`` through the per-op torch code of
  this module (the reference, and the fallback for ops in a non-canonical order).

:func:`dsa_augment` is the two in sequence.

Groups (``DSA_STRATEGIES``) and the ops they run, in order:

========  ===============================================================================
group     op: output, per sample n (u ~ U[0, 1) drawn per sample or once per batch)
========  ===============================================================================
color     brightness  ``x + (u - 0.5) * brightness``
          saturation  ``(x - m_c) * (u * saturation) + m_c``, m_c = mean over channels
          contrast    ``(x - m) * (u + contrast) + m``, m = mean over C, H, W
crop      ``y[:, i, j] = x[:, i + dh, j + dw]`` (0 outside), dh, dw integers uniform in
          [-b, b], b = int(H * ratio_crop_pad + 0.5) (int(W * ...) for dw)
cutout    zero the box of rows [ch - sh // 2, ch - sh // 2 + sh), cols likewise (clipped),
          sh = int(H * ratio_cutout + 0.5), centre ch uniform in [0, H - 1] (sh odd) or
          [0, H] (sh even), as the original
flip      ``x.flip(-1)`` where u < prob_flip
scale     ``grid_sample`` through the affine ``[[sx, 0, 0], [0, sy, 0]]``, sx, sy ~
          U[1 / ratio_scale, ratio_scale) (sx < 1 zooms in)
rotate    ``grid_sample`` through ``[[cos a, -sin a, 0], [sin a, cos a, 0]]``,
          a ~ U[-ratio_rotate, ratio_rotate) degrees (positive: anticlockwise)
========  ===============================================================================

``grid_sample`` is bilinear with zero padding; ``align_corners`` is False as in DC/DSA/DM
(MTT uses True: ``DSAParams(align_corners=True)``). The original has no ``noise`` group
(``ParamDiffAug.ratio_noise`` is unused by ``DiffAugment``), so neither does this module.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DSA_STRATEGIES", "DSA_OPS", "DSA_MODES", "DEFAULT_STRATEGY", "DIGIT_STRATEGY",
           "default_strategy", "DSAParams", "DSAOp",
           "DSATransform", "dsa_params", "dsa_apply", "dsa_augment"]

#: group name -> the ops it runs, in order (the original's ``AUGMENT_FNS``)
_GROUP_OPS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}
#: the known group names, usable in a strategy string
DSA_STRATEGIES: tuple[str, ...] = tuple(_GROUP_OPS)
#: op name -> the keys of its values (each a CPU tensor of shape [N])
_OP_KEYS: dict[str, tuple[str, ...]] = {
    "brightness": ("shift",),
    "saturation": ("factor",),
    "contrast": ("factor",),
    "crop": ("shift_h", "shift_w"),
    "cutout": ("center_h", "center_w", "size_h", "size_w"),
    "flip": ("flip",),
    "scale": ("sx", "sy"),
    "rotate": ("angle",),
}
DSA_OPS: tuple[str, ...] = tuple(_OP_KEYS)
#: "single": one group per call, chosen by the seed (the original's aug_mode 'S', its default);
#: "all": every group in strategy order (aug_mode 'M')
DSA_MODES: tuple[str, ...] = ("single", "all")
#: the original's ``--dsa_strategy`` default (its digit-dataset runs drop ``flip``)
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# digits are not mirror-symmetric: the DSA papers drop `flip` for digit datasets (REFERENCE.md 3)
DIGIT_STRATEGY = "color_crop_cutout_scale_rotate"
DIGIT_DATASETS = frozenset({"digits", "mnist", "svhn", "usps"})


def default_strategy(dataset_name: str) -> str:
    """The DSA strategy a dataset is augmented with by default: no flip for digit datasets."""
    return DIGIT_STRATEGY if str(dataset_name).lower() in DIGIT_DATASETS else DEFAULT_STRATEGY

_SEED_LIMIT = 1 << 64


@dataclass(frozen=True)
class DSAParams:
    """Strengths of the DSA ops; the defaults are the original's ``ParamDiffAug``."""

    prob_flip: float = 0.5        # P(flip)
    ratio_scale: float = 1.2      # sx, sy ~ U[1/ratio, ratio)
    ratio_rotate: float = 15.0    # degrees, a ~ U[-ratio, ratio)
    ratio_crop_pad: float = 0.125  # max shift = int(size * ratio + 0.5) pixels
    ratio_cutout: float = 0.5     # box side = int(size * ratio + 0.5) pixels
    brightness: float = 1.0       # added value ~ brightness * U[-0.5, 0.5)
    saturation: float = 2.0       # factor ~ U[0, saturation)
    contrast: float = 0.5         # factor ~ U[contrast, contrast + 1)
    align_corners: bool = False   # of affine_grid / grid_sample (DC: False, MTT: True)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "align_corners":
                if not isinstance(v, bool):
                    raise TypeError(f"DSAParams.align_corners must be a bool, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"DSAParams.{f.name} must be a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"DSAParams.{f.name} must be >= 0, got {v!r}")
        if not 0.0 <= self.prob_flip <= 1.0:
            raise ValueError(f"DSAParams.prob_flip must be in [0, 1], got {self.prob_flip!r}")
        if self.ratio_scale <= 0:
            raise ValueError(f"DSAParams.ratio_scale must be > 0, got {self.ratio_scale!r}")


@dataclass(frozen=True, eq=False)
class DSAOp:
    """One sampled op: ``name`` in ``DSA_OPS`` and its values, CPU tensors of shape [N].

    brightness: ``shift`` (added);  saturation / contrast: ``factor``;  crop: ``shift_h``,
    ``shift_w`` (int64; output pixel (i, j) reads input (i + shift_h, j + shift_w));
    cutout: ``center_h``, ``center_w``, ``size_h``, ``size_w`` (int64);  flip: ``flip`` (bool);
    scale: ``sx``, ``sy``;  rotate: ``angle`` (radians, positive = anticlockwise).
    Float values are float64.
    """

    name: str
    values: Mapping[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class DSATransform:
    """A sampled DSA transformation for a batch of shape [batch_size, *, height, width]."""

    groups: tuple[str, ...]   # the groups applied, in order (one in "single" mode)
    ops: tuple[DSAOp, ...]    # their ops, in order
    batch_size: int
    height: int
    width: int
    align_corners: bool = False


# ---------------------------------------------------------------- argument checks

def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dsa: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"dsa: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"dsa: x must be a floating-point tensor, got dtype {x.dtype}")


def _check_seed(seed) -> int:
    if isinstance(seed, bool):
        raise TypeError(f"dsa: seed must be an int, got {seed!r}")
    try:
        s = operator.index(seed)
    except TypeError:
        raise TypeError(f"dsa: seed must be an int, got {type(seed).__name__}") from None
    if not 0 <= s < _SEED_LIMIT:
        raise ValueError(f"dsa: seed must be in [0, 2**64), got {s} (the original's seed=-1 "
                         "'unseeded' mode has no equivalent: pass a fresh seed, "
                         "per_sample=True)")
    return s


def _parse_strategy(strategy) -> tuple[str, ...]:
    if not isinstance(strategy, str):
        raise TypeError(f"dsa: strategy must be a str, got {type(strategy).__name__}")
    if strategy == "" or strategy.lower() == "none":
        return ()
    groups = tuple(strategy.split("_"))
    unknown = [g for g in groups if g not in _GROUP_OPS]
    if unknown:
        raise ValueError(f"dsa: unknown group(s) {unknown} in strategy {strategy!r}; known "
                         f"groups: {list(DSA_STRATEGIES)} joined by '_' (or 'none' / '')")
    return groups


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"dsa: shape must be a sequence of 4 ints, got {shape!r}") from None
    if len(dims) != 4 or min(dims) < 0:
        raise ValueError(f"dsa: shape must be [N, C, H, W] (4 non-negative ints), got {dims}")
    return dims[0], dims[2], dims[3]


# ---------------------------------------------------------------- sampling

def _sample_op(name: str, g: torch.Generator, n: int, k: int, h: int, w: int,
               p: DSAParams) -> DSAOp:
    """Draw op ``name``'s values: ``k`` draws per value (n, or 1 shared by the batch)."""
    def rand() -> torch.Tensor:
        return torch.rand(k, generator=g, dtype=torch.float64)

    def randint(lo: int, hi: int) -> torch.Tensor:  # uniform on [lo, hi)
        return torch.randint(lo, hi, (k,), generator=g, dtype=torch.int64)

    if name == "brightness":
        vals = {"shift": (rand() - 0.5) * p.brightness}
    elif name == "saturation":
        vals = {"factor": rand() * p.saturation}
    elif name == "contrast":
        vals = {"factor": rand() + p.contrast}
    elif name == "crop":
        bh, bw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
        vals = {"shift_h": randint(-bh, bh + 1), "shift_w": randint(-bw, bw + 1)}
    elif name == "cutout":
        sh, sw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
        vals = {"center_h": randint(0, h + 1 - sh % 2), "center_w": randint(0, w + 1 - sw % 2),
                "size_h": torch.full((k,), sh, dtype=torch.int64),
                "size_w": torch.full((k,), sw, dtype=torch.int64)}
    elif name == "flip":
        vals = {"flip": rand() < p.prob_flip}
    elif name == "scale":
        lo, hi = 1.0 / p.ratio_scale, p.ratio_scale
        vals = {"sx": rand() * (hi - lo) + lo, "sy": rand() * (hi - lo) + lo}
    elif name == "rotate":
        vals = {"angle": (rand() - 0.5) * (2.0 * p.ratio_rotate * math.pi / 180.0)}
    else:  # pragma: no cover - guarded by _parse_strategy
        raise AssertionError(name)
    if k != n:  # one draw shared by the batch
        vals = {key: v.expand(n).clone() for key, v in vals.items()}
    return DSAOp(name, vals)


def dsa_params(seed: int, shape: Sequence[int], *, strategy: str = DEFAULT_STRATEGY,
               per_sample: bool = False, mode: str = "single",
               params: Optional[DSAParams] = None) -> DSATransform:
    """Draw the DSA transformation for a batch of ``shape`` = [N, C, H, W] from ``seed``.

    Only a CPU ``torch.Generator`` seeded with ``seed`` is used (the global RNG is untouched).
    Draw order: the group index (``mode="single"`` only), then, for each applied group in
    strategy order, each op's values in the order of :class:`DSAOp`'s docstring, each draw
    of size N (``per_sample=True``) or 1 (``per_sample=False``).

    So with ``per_sample=False`` the transformation does not depend on N: two batches of any
    sizes (and the same H, W) given the same seed get the same transformation — the Siamese
    use of DC/DSA/DM/DataDAM, where the original's ``DiffAugment(seed != -1)`` sets
    ``batchmode=True``. With ``per_sample=True`` sample i of two batches of the same N gets
    the same parameters.
    """
    s = _check_seed(seed)
    n, h, w = _check_shape(shape)
    groups = _parse_strategy(strategy)
    if mode not in DSA_MODES:
        raise ValueError(f"dsa: mode must be one of {list(DSA_MODES)}, got {mode!r}")
    if not isinstance(per_sample, bool):
        raise TypeError(f"dsa: per_sample must be a bool, got {per_sample!r}")
    if params is None:
        params = DSAParams()
    elif not isinstance(params, DSAParams):
        raise TypeError(f"dsa: params must be a DSAParams or None, got {type(params).__name__}")

    g = torch.Generator(device="cpu")
    g.manual_seed(s)
    if groups and mode == "single":
        idx = int(torch.randint(0, len(groups), (1,), generator=g).item())
        groups = (groups[idx],)
    k = n if per_sample else 1
    ops = tuple(_sample_op(name, g, n, k, h, w, params)
                for grp in groups for name in _GROUP_OPS[grp])
    return DSATransform(groups=groups, ops=ops, batch_size=n, height=h, width=w,
                        align_corners=params.align_corners)


# ---------------------------------------------------------------- application

def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N] CPU values -> [N, 1, 1, 1] in x's dtype on x's device."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor, align_corners: bool) -> torch.Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=align_corners)


def _apply_op(x: torch.Tensor, op: DSAOp, align_corners: bool) -> torch.Tensor:
    v, name = op.values, op.name
    n, _, h, w = x.shape
    if name == "brightness":
        return x + _per_sample(v["shift"], x)
    if name == "saturation":
        m = x.mean(dim=1, keepdim=True)
        return (x - m) * _per_sample(v["factor"], x) + m
    if name == "contrast":
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * _per_sample(v["factor"], x) + m
    if name == "flip":
        return torch.where(v["flip"].to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    if name == "crop":
        # pad one zero pixel on each side and clamp the source index into the padding, so
        # every out-of-image read is an exact 0 (as the original), differentiable via indexing
        dev = x.device
        rows = torch.arange(h, device=dev) + v["shift_h"].to(dev).view(-1, 1) + 1  # [N, H]
        cols = torch.arange(w, device=dev) + v["shift_w"].to(dev).view(-1, 1) + 1  # [N, W]
        rows, cols = rows.clamp(0, h + 1), cols.clamp(0, w + 1)
        b = torch.arange(n, device=dev).view(-1, 1, 1)
        out = F.pad(x, (1, 1, 1, 1))[b, :, rows.view(n, h, 1), cols.view(n, 1, w)]  # [N,H,W,C]
        return out.permute(0, 3, 1, 2).contiguous()
    if name == "cutout":
        dev = x.device
        top = (v["center_h"] - v["size_h"] // 2).to(dev).view(-1, 1)
        left = (v["center_w"] - v["size_w"] // 2).to(dev).view(-1, 1)
        r, c = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_r = (r >= top) & (r < top + v["size_h"].to(dev).view(-1, 1))    # [N, H]
        in_c = (c >= left) & (c < left + v["size_w"].to(dev).view(-1, 1))  # [N, W]
        keep = ~(in_r.view(n, 1, h, 1) & in_c.view(n, 1, 1, w))
        return x * keep.to(x.dtype)
    if name == "scale":
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 1, 1] = v["sx"], v["sy"]
        return _affine(x, theta, align_corners)
    if name == "rotate":
        a = v["angle"]
        cos, sin = torch.cos(a), torch.sin(a)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
        return _affine(x, theta, align_corners)
    raise ValueError(f"dsa: unknown op {name!r}; known ops: {list(DSA_OPS)}")


def _check_transform(t: DSATransform, x: torch.Tensor) -> None:
    if not isinstance(t, DSATransform):
        raise TypeError(f"dsa: transform must be a DSATransform, got {type(t).__name__}")
    n, _, h, w = x.shape
    if (t.batch_size, t.height, t.width) != (n, h, w):
        raise ValueError(f"dsa: transform was drawn for [N, H, W] = "
                         f"{[t.batch_size, t.height, t.width]}, x has shape {tuple(x.shape)}")
    for op in t.ops:
        if op.name not in _OP_KEYS:
            raise ValueError(f"dsa: unknown op {op.name!r}; known ops: {list(DSA_OPS)}")
        for key in _OP_KEYS[op.name]:
            val = op.values.get(key)
            if not isinstance(val, torch.Tensor) or tuple(val.shape) != (n,):
                got = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
                raise ValueError(f"dsa: op {op.name!r} needs values[{key!r}] of shape ({n},), "
                                 f"got {got}")


def dsa_apply(x: torch.Tensor, transform: DSATransform, *, fused: bool = True) -> torch.Tensor:
    """Apply a transform drawn by :func:`dsa_params` to ``x`` [N, C, H, W] (differentiable).

    Returns a tensor of x's shape and dtype on x's device. float16 / bfloat16 are computed in
    float32 and rounded once at the end. An empty transform (strategy ``"none"``) or an empty
    ``x`` returns ``x`` itself, as the original.

    ``fused=True`` (default) runs the native op ``pydistill_ext::dsa_apply_forward`` (one pass
    per output pixel, pydistill_ext/ops/dsa_augment.py) whenever the transform's ops are in the
    canonical order colour, crop, cutout, flip, scale, rotate (every strategy whose groups are
    listed in that order); otherwise, or with ``fused=False``, the pure-torch chain of
    per-op tensor operations below (the reference). Both agree up to float rounding.
    """
    _check_x(x)
    _check_transform(transform, x)
    if not transform.ops or x.numel() == 0:
        return x
    if fused:
        from pydistill_ext.ops.dsa_augment import dsa_apply_fused, pack_transform
        packed = pack_transform(transform)
        if packed is not None:
            return dsa_apply_fused(x, packed[0], packed[1], transform.align_corners)
    y = x if x.dtype in (torch.float32, torch.float64) else x.float()
    for op in transform.ops:
        y = _apply_op(y, op, transform.align_corners)
    return y.to(x.dtype).contiguous()


def dsa_augment(x: torch.Tensor, *, seed: int, strategy: str = DEFAULT_STRATEGY,
                per_sample: bool = False, mode: str = "single",
                params: Optional[DSAParams] = None, fused: bool = True) -> torch.Tensor:
    """Differentiable Siamese Augmentation of ``x`` [N, C, H, W] driven by ``seed``.

    ``dsa_apply(x, dsa_params(seed, x.shape, strategy=..., ...))``. ``strategy`` is
    '_'-joined names from ``DSA_STRATEGIES`` ('none' or '' = identity). ``mode="single"``
    (the original's default 'S') applies one group picked by the seed; ``"all"`` ('M') applies
    every group in order. ``per_sample=False`` (default) shares one parameter set over the
    batch, which is what the original does whenever it is given a seed (its Siamese use:
    real and synthetic batches of different sizes, same seed); ``per_sample=True`` gives each
    sample its own parameters (the original's unseeded evaluation-time mode) and is Siamese
    only between batches of equal size. Same seed, shape and options -> bitwise identical
    output; the global RNG is never touched.

    ``fused`` as in :func:`dsa_apply` (True: the native op; False: the pure-torch path).
    """
    _check_x(x)
    return dsa_apply(x, dsa_params(seed, x.shape, strategy=strategy, per_sample=per_sample,
                                   mode=mode, params=params), fused=fused)
