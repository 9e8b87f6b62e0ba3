"""Feature-level knowledge-distillation losses (REFERENCE.md 3): FitNets hint, attention
transfer, cosine feature loss and relational KD (distance- and angle-wise).

Every loss has a functional form and an ``nn.Module`` form. Arguments are (student, teacher);
nothing is detached: both sides get gradients when they require them, so pass teacher
features computed under ``torch.no_grad()`` (or ``.detach()``) when the teacher is frozen.
All functions are ``torch.compile(fullgraph=True)``-friendly (no data-dependent shapes; the
attention map is a custom op with a fake kernel).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydistill_ext.ops.attention_map import attention_map

__all__ = [
    "hint_loss", "HintLoss",
    "attention_transfer_loss", "AttentionTransferLoss",
    "cosine_feature_loss", "CosineFeatureLoss",
    "rkd_distance_loss", "rkd_angle_loss", "RKDLoss",
]

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)


def _check_tensor(x, name: str, dim=None):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating tensor (float64/32/16, bfloat16), got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if dim is None and x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")


def _check_pair(f_s, f_t, s_name="f_s", t_name="f_t", dim=None):
    _check_tensor(f_s, s_name, dim)
    _check_tensor(f_t, t_name, dim)
    if f_s.device != f_t.device:
        raise ValueError(f"{s_name} is on {f_s.device} but {t_name} is on {f_t.device}")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"{s_name} has batch size {f_s.shape[0]} but {t_name} has {f_t.shape[0]}")


def _compute(x: Tensor) -> Tensor:
    """float32 math for float16 / bfloat16 inputs."""
    return x.float() if x.dtype in _LOW else x


def _reduce(per: Tensor, reduction: str, name: str = "reduction") -> Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"{name} must be 'mean', 'sum' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------- FitNets hint


def hint_loss(regressed: Tensor, f_t: Tensor, reduction: str = "sum", half: bool = True) -> Tensor:
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    Eq. 3): L_HT = ½‖u_h(x) − r(v_g(x))‖², on the student's *regressed* guided-layer output
    ``regressed`` = r(v_g(x)) and the teacher's hint ``f_t`` = u_h(x), same shape.

    ``reduction``: "sum" (Eq. 3; torchdistill's ``MSELoss(reduction='sum')``), "mean" (over all
    elements), "batchmean" (sum / N). ``half=False`` drops the ½ (torchdistill's value exactly).
    Math in float32 for half inputs; result in float32 there, else the input dtype.
    """
    _check_pair(regressed, f_t, "regressed", "f_t")
    if regressed.shape != f_t.shape:
        raise ValueError(f"regressed has shape {tuple(regressed.shape)} but f_t has "
                         f"{tuple(f_t.shape)}; they must match")
    if reduction not in ("sum", "mean", "batchmean"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'batchmean', got {reduction!r}")
    sq = (_compute(regressed) - _compute(f_t)).pow(2)
    if reduction == "sum":
        out = sq.sum()
    elif reduction == "mean":
        out = sq.mean()
    else:
        out = sq.sum() / regressed.shape[0]
    return out * 0.5 if half else out


class HintLoss(nn.Module):
    """FitNets hint loss with its learnable convolutional regressor r (Romero et al. 2015,
    Eq. 3): ``forward(f_s, f_t)`` = ½‖f_t − r(f_s)‖² (see :func:`hint_loss`).

    r is ``Conv2d(student_channels, teacher_channels, kernel_size, padding=kernel_size // 2)``
    (odd ``kernel_size``; spatial size kept), optionally followed by ``BatchNorm2d``
    (``batch_norm=True``) and ``ReLU`` (``relu=True``). The paper's regressor is the plain conv
    (the default); torchdistill's / CRD's ``ConvReg`` is conv + BN + ReLU (``batch_norm=True,
    relu=True``), and REFERENCE.md 3's torchdistill ImageNet config uses a 1×1 ConvReg + ReLU.

    Spatial mismatch between r(f_s) and f_t: ``spatial="error"`` (default) raises;
    ``spatial="adaptive_pool"`` resizes r(f_s) to f_t's H×W with ``adaptive_avg_pool2d``
    (meant for a student map that is larger than, ideally a multiple of, the teacher's).
    """

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int = 1, *,
                 batch_norm: bool = False, relu: bool = False, reduction: str = "sum",
                 half: bool = True, spatial: str = "error"):
        super().__init__()
        for name, v in (("student_channels", student_channels),
                        ("teacher_channels", teacher_channels), ("kernel_size", kernel_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (the regressor keeps H×W), got {kernel_size}")
        if reduction not in ("sum", "mean", "batchmean"):
            raise ValueError(f"reduction must be 'sum', 'mean' or 'batchmean', got {reduction!r}")
        if spatial not in ("error", "adaptive_pool"):
            raise ValueError(f"spatial must be 'error' or 'adaptive_pool', got {spatial!r}")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.reduction, self.half, self.spatial = reduction, half, spatial
        layers = [nn.Conv2d(student_channels, teacher_channels, kernel_size,
                            padding=kernel_size // 2)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(teacher_channels))
        if relu:
            layers.append(nn.ReLU())
        self.regressor = nn.Sequential(*layers)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        _check_pair(f_s, f_t, "f_s", "f_t", dim=4)
        if f_s.shape[1] != self.student_channels:
            raise ValueError(f"f_s has {f_s.shape[1]} channels but the regressor expects "
                             f"student_channels={self.student_channels}")
        if f_t.shape[1] != self.teacher_channels:
            raise ValueError(f"f_t has {f_t.shape[1]} channels but the regressor outputs "
                             f"teacher_channels={self.teacher_channels}")
        mismatch = f_s.shape[-2:] != f_t.shape[-2:]  # the regressor keeps H×W
        if mismatch and self.spatial == "error":
            raise ValueError(
                f"f_s is {tuple(f_s.shape[-2:])} spatially but f_t is {tuple(f_t.shape[-2:])}; "
                "pass spatial='adaptive_pool' to pool the regressed student map")
        r = self.regressor(f_s)
        if mismatch:
            r = F.adaptive_avg_pool2d(r, f_t.shape[-2:])
        return hint_loss(r, f_t, self.reduction, self.half)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, half={self.half}, spatial={self.spatial!r}"


# --------------------------------------------------------------------- attention transfer

FeatureList = Union[Tensor, Sequence[Tensor]]


def _as_list(x, name):
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(x).__name__}")


def attention_transfer_loss(f_s: FeatureList, f_t: FeatureList, p: float = 2.0,
                            mode: str = "code") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR
    2017), *without* the β weight (see :class:`AttentionTransferLoss`).

    Q = Σ_c |f_c|^p flattened, â = Q/‖Q‖₂ (:func:`pydistill_ext.attention_map`; the authors'
    code averages over channels, which the normalisation cancels). Per feature pair:
    - ``mode="code"`` (szagoruyko/attention-transfer ``at_loss``): mean over N·H·W of (â_s − â_t)²;
    - ``mode="paper"`` (Eq. 2 without β/2): mean over samples of ‖â_s − â_t‖₂.
    ``f_s`` / ``f_t`` are one [N, C, H, W] map each or equal-length lists of them; the pair
    losses are summed. Channels may differ within a pair; N, H and W must match.
    """
    if mode not in ("code", "paper"):
        raise ValueError(f"mode must be 'code' or 'paper', got {mode!r}")
    s_list, t_list = _as_list(f_s, "f_s"), _as_list(f_t, "f_t")
    if len(s_list) != len(t_list):
        raise ValueError(f"f_s has {len(s_list)} feature maps but f_t has {len(t_list)}")
    if not s_list:
        raise ValueError("f_s and f_t must hold at least one feature map")
    total = None
    for i, (a, b) in enumerate(zip(s_list, t_list)):
        sn = "f_s" if isinstance(f_s, Tensor) else f"f_s[{i}]"
        tn = "f_t" if isinstance(f_t, Tensor) else f"f_t[{i}]"
        _check_pair(a, b, sn, tn, dim=4)
        if a.shape[-2:] != b.shape[-2:]:
            raise ValueError(f"{sn} is {tuple(a.shape[-2:])} spatially but {tn} is "
                             f"{tuple(b.shape[-2:])}; attention maps need equal H×W")
        diff = _compute(attention_map(a, p=p)) - _compute(attention_map(b, p=p))
        if mode == "code":
            term = diff.pow(2).mean()
        else:
            term = torch.linalg.vector_norm(diff, dim=1).mean()
        total = term if total is None else total + term
    return total


class AttentionTransferLoss(nn.Module):
    """Attention-transfer loss term (Zagoruyko & Komodakis 2017), ``forward(f_s, f_t)`` on one
    feature map or lists of them (see :func:`attention_transfer_loss`).

    ``mode="code"``: β·Σ_pairs mean((â_s − â_t)²), the authors' CIFAR code (README
    ``--beta 1e+3``, the default). ``mode="paper"``: β/2·Σ_pairs mean_b ‖â_s − â_t‖₂ (Eq. 2,
    per sample averaged over the batch); the non-squared norm is ~100× larger, so β
    must be re-tuned when switching modes. ``p`` = 2 as in both.
    """

    def __init__(self, beta: float = 1e3, p: float = 2.0, mode: str = "code"):
        super().__init__()
        if mode not in ("code", "paper"):
            raise ValueError(f"mode must be 'code' or 'paper', got {mode!r}")
        self.beta, self.p, self.mode = float(beta), float(p), mode

    def forward(self, f_s: FeatureList, f_t: FeatureList) -> Tensor:
        loss = attention_transfer_loss(f_s, f_t, p=self.p, mode=self.mode)
        return loss * (self.beta if self.mode == "code" else self.beta / 2)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, p={self.p}, mode={self.mode!r}"


# ------------------------------------------------------------------------------- cosine


def _flat_pair(f_s, f_t):
    _check_pair(f_s, f_t)
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"f_s has {s.shape[1]} features per sample (shape {tuple(f_s.shape)}) "
                         f"but f_t has {t.shape[1]} (shape {tuple(f_t.shape)})")
    return _compute(s), _compute(t)


def cosine_feature_loss(f_s: Tensor, f_t: Tensor, reduction: str = "mean",
                        eps: float = 1e-8) -> Tensor:
    """Cosine feature loss: 1 − cos(f_s[n], f_t[n]) per sample (features flattened after the
    batch dimension), cos = ⟨s, t⟩ / (max(‖s‖, eps)·max(‖t‖, eps)); averaged over the batch
    (``reduction`` "mean", "sum" or "none" → [N]). Zero for aligned features; a zero
    feature vector gives cos = 0 (loss 1) with a finite gradient.
    """
    s, t = _flat_pair(f_s, f_t)
    cos = (F.normalize(s, dim=1, eps=eps) * F.normalize(t, dim=1, eps=eps)).sum(1)
    return _reduce(1.0 - cos, reduction)


class CosineFeatureLoss(nn.Module):
    """Module form of :func:`cosine_feature_loss`."""

    def __init__(self, reduction: str = "mean", eps: float = 1e-8):
        super().__init__()
        _reduce(torch.zeros(1), reduction)  # validates
        self.reduction, self.eps = reduction, eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return cosine_feature_loss(f_s, f_t, self.reduction, self.eps)


# ----------------------------------------------------------------------------------- RKD


def _offdiag(n: int, device) -> Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _pdist(e: Tensor, eps: float) -> Tensor:
    """Euclidean distances [N, N] via the Gram matrix, squared distances clamped at ``eps``
    before the root and the diagonal set to 0 (RKD's ``pdist``); gradient 0 on the diagonal."""
    sq = e.pow(2).sum(1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp_min(eps)
    return torch.where(_offdiag(e.shape[0], e.device), d2.sqrt(), torch.zeros_like(d2))


def _normalised_pdist(e: Tensor, eps: float) -> Tensor:
    n = e.shape[0]
    d = _pdist(e, eps)
    return d / (d.sum() / (n * (n - 1)))


def _check_rkd(f_s, f_t):
    _check_pair(f_s, f_t)
    if f_s.shape[0] < 2:
        raise ValueError(f"RKD needs at least 2 samples, f_s has batch size {f_s.shape[0]}")
    s, t = _compute(f_s.reshape(f_s.shape[0], -1)), _compute(f_t.reshape(f_t.shape[0], -1))
    return s, t  # student and teacher widths may differ: RKD compares relations only


def rkd_distance_loss(f_s: Tensor, f_t: Tensor, reduction: str = "mean",
                      eps: float = 1e-12) -> Tensor:
    """RKD distance-wise loss (Park et al., "Relational Knowledge Distillation", CVPR 2019,
    Eqs. 4-5): ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ, μ the mean distance over the pairs i ≠ j (the
    authors' ``d[d > 0].mean()``: their clamp makes every off-diagonal distance > 0), for the
    student and the teacher; Huber (smooth-L1, δ = 1) between the two [N, N] matrices, averaged
    over all N² entries (diagonal 0 on both sides) for ``reduction="mean"``.

    Features are flattened after the batch dimension; the student and teacher widths may
    differ. Distances use the Gram form with squared distances clamped at ``eps``.
    """
    s, t = _check_rkd(f_s, f_t)
    return F.smooth_l1_loss(_normalised_pdist(s, eps), _normalised_pdist(t, eps),
                            reduction=_check_red(reduction))


def _angles(e: Tensor) -> Tensor:
    """cos∠(e_j, e_i, e_k) = ⟨ê_ij, ê_ik⟩ with ê_ij = (e_j − e_i)/‖e_j − e_i‖: [N, N, N];
    entries with j = i or k = i are 0 (and pass no gradient)."""
    n = e.shape[0]
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # [i, j] = e_j - e_i
    unit = F.normalize(diff, p=2.0, dim=2)
    unit = torch.where(_offdiag(n, e.device).unsqueeze(2), unit, torch.zeros_like(unit))
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle_loss(f_s: Tensor, f_t: Tensor, reduction: str = "mean") -> Tensor:
    """RKD angle-wise loss (Park et al. 2019, Eqs. 6-7): ψ_A(t_i, t_j, t_k) = cos∠t_i t_j t_k =
    ⟨e_ij, e_kj⟩ of the unit difference vectors e_ij = (t_i − t_j)/‖t_i − t_j‖, for all
    triplets (the [N, N, N] tensor of the authors' code; entries whose outer index equals the
    apex are 0); Huber (smooth-L1, δ = 1) between the
    student's and teacher's, averaged over all N³ entries for ``reduction="mean"``.
    Memory O(N²·D + N³).
    """
    s, t = _check_rkd(f_s, f_t)
    return F.smooth_l1_loss(_angles(s), _angles(t), reduction=_check_red(reduction))


def _check_red(reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


class RKDLoss(nn.Module):
    """Relational KD (Park et al., CVPR 2019, Eq. 8 without the task loss):
    ``w_dist``·:func:`rkd_distance_loss` + ``w_angle``·:func:`rkd_angle_loss` on flattened
    embeddings [N, ...]. Defaults are the paper's λ_D = 25, λ_A = 50 (torchdistill's sample
    config uses 1 and 2). A zero weight skips that term.
    """

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0, eps: float = 1e-12):
        super().__init__()
        self.w_dist, self.w_angle, self.eps = float(w_dist), float(w_angle), eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        s, t = _check_rkd(f_s, f_t)
        loss = s.new_zeros(())
        if self.w_dist != 0:
            loss = loss + self.w_dist * rkd_distance_loss(s, t, eps=self.eps)
        if self.w_angle != 0:
            loss = loss + self.w_angle * rkd_angle_loss(s, t)
        return loss

    def extra_repr(self) -> str:
        return f"w_dist={self.w_dist}, w_angle={self.w_angle}"
