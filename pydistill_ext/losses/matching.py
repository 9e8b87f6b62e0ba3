"""Dataset-distillation matching losses: DM's class-mean embedding match, DataDAM's attention
matching, and MMD with a linear or multi-bandwidth RBF kernel (REFERENCE.md 3).

All per-class statistics come from one call of the fused ``pde.class_mean`` per side (one pass
over the rows for every class at once) instead of the original code's loop over classes.

Conventions shared by the class-conditional losses:

* ``labels_*`` are int64 in ``[0, num_classes)``.
* A class that has no row on the real side **or** none on the synthetic side contributes 0
  (and no gradient): its difference of means is masked out. (A plain difference of
  ``class_mean`` outputs would instead charge ``||mu||^2`` against the empty side's 0 mean.)
* The result is a float32 scalar (float64 for float64 inputs), summed over classes (and
  layers): no 1/num_classes normalisation, as in the papers' code.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pydistill_ext.ops.attention_map import attention_map
from pydistill_ext.ops.class_mean import class_mean

__all__ = ["dm_loss", "mmd", "attention_match_loss", "attention_means_loss", "DMLoss", "MMDLoss",
           "AttentionMatchLoss", "DEFAULT_RBF_SIGMAS", "DATADAM_P"]

#: bandwidths of the multi-kernel RBF MMD (a geometric ladder around unit-scale features)
DEFAULT_RBF_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
#: DataDAM's attention exponent: the released code uses p = 1 (``get_attention(param=1)``),
#: the paper's hyper-parameter table says p = 4. We default to the code's value because the
#: released code is what produced the published numbers we compare against; pass p=4 for
#: the paper's setting.
DATADAM_P = 1.0


def _present(labels_real, labels_syn, num_classes, dtype):
    cr = torch.bincount(labels_real, minlength=num_classes)[:num_classes]
    cs = torch.bincount(labels_syn, minlength=num_classes)[:num_classes]
    return ((cr > 0) & (cs > 0)).to(dtype).unsqueeze(1)


def _check_pair(a, la, b, lb, what):
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{what} must be [N, D] tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: real and synthetic widths differ ({a.shape[1]} vs {b.shape[1]})")


def _mean_match(a, la, b, lb, num_classes):
    """sum_c ||mean a_c - mean b_c||^2 over classes present on both sides (float32/64)."""
    compute = torch.float64 if (a.dtype == torch.float64 or b.dtype == torch.float64) else torch.float32
    mu_a = class_mean(a, la, num_classes).to(compute)
    mu_b = class_mean(b, lb, num_classes).to(compute)
    diff = (mu_a - mu_b) * _present(la, lb, num_classes, compute)
    return diff.pow(2).sum()


def dm_loss(emb_real: torch.Tensor, labels_real: torch.Tensor, emb_syn: torch.Tensor,
            labels_syn: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Distribution Matching loss (Zhao & Bilen, "Dataset Condensation with Distribution
    Matching", WACV 2023, Eq. 4 with the empirical MMD of a linear kernel):

        L = sum_c || mean_{i: y_i = c} emb_real_i - mean_{j: s_j = c} emb_syn_j ||^2

    ``emb_real`` [N, D], ``emb_syn`` [M, D] (e.g. ``ConvNet.embed`` outputs); one
    ``class_mean`` per side. Classes absent from either side contribute 0. Differentiable
    w.r.t. both embeddings; d L / d emb_syn_j = (2/|S_c|)(mu_syn,c - mu_real,c).
    """
    _check_pair(emb_real, labels_real, emb_syn, labels_syn, "dm_loss")
    return _mean_match(emb_real, labels_real, emb_syn, labels_syn, num_classes)


def mmd(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear",
        sigmas: Sequence[float] = DEFAULT_RBF_SIGMAS) -> torch.Tensor:
    """Squared Maximum Mean Discrepancy between samples x [N, D] and y [M, D] (Gretton et al.,
    "A Kernel Two-Sample Test", JMLR 2012, Eq. 5: the *biased* V-statistic, diagonal terms
    included):

        MMD^2 = mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j)

    ``kernel="linear"``: k(a, b) = <a, b>, which equals ||mean x - mean y||^2 exactly and is
    computed that way (O((N+M)D)). ``kernel="rbf"``: k(a, b) = sum_s exp(-||a-b||^2 / (2 s^2))
    over the bandwidths ``sigmas`` (multi-kernel, unweighted); O((N+M)^2 D). The V-statistic
    is >= 0 and is 0 iff the two empirical distributions coincide (characteristic kernel).
    Computed in float32 (float64 for float64 inputs).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs x [N, D] and y [M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("mmd needs at least one sample on each side")
    compute = torch.float64 if (x.dtype == torch.float64 or y.dtype == torch.float64) else torch.float32
    x, y = x.to(compute), y.to(compute)
    if kernel == "linear":
        return (x.mean(0) - y.mean(0)).pow(2).sum()
    if kernel != "rbf":
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not s > 0 for s in sigmas):
        raise ValueError(f"sigmas must be positive numbers, got {sigmas}")

    def gram_mean(a, b):
        d2 = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0)
              - 2.0 * a @ b.t()).clamp_min(0.0)
        return sum(torch.exp(-d2 / (2.0 * s * s)).mean() for s in sigmas)

    return gram_mean(x, x) + gram_mean(y, y) - 2.0 * gram_mean(x, y)


def attention_match_loss(maps_real: Sequence[torch.Tensor], labels_real: torch.Tensor,
                         maps_syn: Sequence[torch.Tensor], labels_syn: torch.Tensor,
                         num_classes: int, p: float = DATADAM_P) -> torch.Tensor:
    """DataDAM's spatial attention matching (Sajedi et al., "DataDAM: Efficient Dataset
    Distillation with Attention Matching", ICCV 2023, Eq. 3-4, without the 100x factor):

        L = sum_l sum_c || mean_{i in c} A_l(real_i) - mean_{j in c} A_l(syn_j) ||^2,
        A_l(f) = normalize_L2(flatten(sum_ch |f_l|^p))            (pde.attention_map)

    ``maps_real`` / ``maps_syn``: one [N, C_l, H_l, W_l] feature map per layer l (e.g. the
    first L-1 entries of ``ConvNet.feature_maps``, as DataDAM's hooks on the ReLUs). Default
    ``p = 1`` (the released code; the paper's table says 4 -- see ``DATADAM_P``). Classes
    absent from either side contribute 0.
    """
    if len(maps_real) != len(maps_syn):
        raise ValueError(f"attention_match_loss: {len(maps_real)} real maps vs {len(maps_syn)} synthetic")
    if len(maps_real) == 0:
        raise ValueError("attention_match_loss needs at least one layer")
    for fr, fs in zip(maps_real, maps_syn):
        if fr.shape[1:] != fs.shape[1:]:
            raise ValueError(f"layer shapes differ: {tuple(fr.shape)} vs {tuple(fs.shape)}")
    return attention_means_loss([attention_map(f, p) for f in maps_real], labels_real,
                                [attention_map(f, p) for f in maps_syn], labels_syn, num_classes)


def attention_means_loss(att_real: Sequence[torch.Tensor], labels_real: torch.Tensor,
                         att_syn: Sequence[torch.Tensor], labels_syn: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """:func:`attention_match_loss` from attention maps already computed (one [N, H_l*W_l]
    per layer, e.g. by ``pde.attention_map``): sum_l sum_c || mean A_l(real_c) -
    mean A_l(syn_c) ||^2 by ``class_mean``. DataDAM's real side uses it to reduce each
    chunk's activations to maps at once instead of keeping them."""
    if len(att_real) != len(att_syn):
        raise ValueError(f"attention_means_loss: {len(att_real)} real maps vs {len(att_syn)} synthetic")
    if len(att_real) == 0:
        raise ValueError("attention_means_loss needs at least one layer")
    total = None
    for ar, as_ in zip(att_real, att_syn):
        _check_pair(ar, labels_real, as_, labels_syn, "attention_means_loss")
        term = _mean_match(ar, labels_real, as_, labels_syn, num_classes)
        total = term if total is None else total + term
    return total


class DMLoss(nn.Module):
    """Module form of :func:`dm_loss`: ``DMLoss(num_classes)(emb_real, y_real, emb_syn, y_syn)``."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)

    def forward(self, emb_real, labels_real, emb_syn, labels_syn):
        return dm_loss(emb_real, labels_real, emb_syn, labels_syn, self.num_classes)

    def extra_repr(self):
        return f"num_classes={self.num_classes}"


class MMDLoss(nn.Module):
    """Module form of :func:`mmd`: ``MMDLoss("rbf", sigmas=(1, 2, 4))(x, y)``."""

    def __init__(self, kernel: str = "linear", sigmas: Sequence[float] = DEFAULT_RBF_SIGMAS):
        super().__init__()
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
        self.kernel, self.sigmas = kernel, tuple(float(s) for s in sigmas)

    def forward(self, x, y):
        return mmd(x, y, self.kernel, self.sigmas)

    def extra_repr(self):
        return f"kernel={self.kernel!r}, sigmas={self.sigmas}"


class AttentionMatchLoss(nn.Module):
    """Module form of :func:`attention_match_loss`."""

    def __init__(self, num_classes: int, p: float = DATADAM_P):
        super().__init__()
        self.num_classes, self.p = int(num_classes), float(p)

    def forward(self, maps_real, labels_real, maps_syn, labels_syn):
        return attention_match_loss(maps_real, labels_real, maps_syn, labels_syn,
                                    self.num_classes, self.p)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, p={self.p}"
