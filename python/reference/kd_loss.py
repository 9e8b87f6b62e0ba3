"""Float64 oracles for the KD divergences (REFERENCE.md section 1), written from the
definitions with plain PyTorch ops, plus the eager composites the benchmarks compare against.

Conventions match pydistill_ext.kd_loss: p = softmax(logits / T) on both sides, per-row loss,
rows whose label equals ignore_index count 0, reductions batchmean / sum / mean / none, no T^2.
"""
import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _kl_terms(p, lp, lq):
    # xlogy rule: a zero-probability entry contributes exactly 0. The unselected branch is
    # made finite too, so that autograd through the where gives 0 there and not 0 * inf.
    live = p > 0
    zero = torch.zeros_like(p)
    lp, lq = torch.where(live, lp, zero), torch.where(live, lq, zero)
    return torch.where(live, p * (lp - lq), zero).sum(-1)


def _log_mix(w, lp, lq):
    """log(w * p + (1 - w) * q) in log space."""
    a = lp + math.log(w) if w > 0 else torch.full_like(lp, -math.inf)
    b = lq + math.log1p(-w) if w < 1 else torch.full_like(lq, -math.inf)
    return torch.logaddexp(a, b)


def divergence_rows(student, teacher, divergence="forward_kl", beta=0.5, temperature=1.0):
    """Per-row divergence [...]. Rows with every logit -inf on a side give 0."""
    lps = torch.log_softmax(student / temperature, dim=-1)
    lpt = torch.log_softmax(teacher / temperature, dim=-1)
    ps, pt = lps.exp(), lpt.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        rows = _kl_terms(pt, lpt, lps)
    elif divergence == "reverse_kl":
        rows = _kl_terms(ps, lps, lpt)
    elif divergence == "jsd":
        lm = _log_mix(beta, lpt, lps)
        rows = beta * _kl_terms(pt, lpt, lm) + (1 - beta) * _kl_terms(ps, lps, lm)
    elif divergence == "skew_forward_kl":
        rows = _kl_terms(pt, lpt, _log_mix(beta, lpt, lps))
    elif divergence == "skew_reverse_kl":
        rows = _kl_terms(ps, lps, _log_mix(beta, lps, lpt))
    elif divergence == "tvd":
        rows = 0.5 * (pt - ps).abs().sum(-1)  # d|x|/dx at 0 is 0 in PyTorch: sign(0) = 0
    else:
        raise ValueError(divergence)
    dead = torch.isneginf(student.amax(-1)) | torch.isneginf(teacher.amax(-1))
    return torch.where(dead, torch.zeros_like(rows), rows)


def reduce_rows(rows, valid, reduction, vocab):
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        n = int(valid.sum())
    else:
        n = rows.numel()
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / max(n, 1)
    if reduction == "mean":
        return rows.sum() / (max(n, 1) * vocab)
    raise ValueError(reduction)


def kd_loss(student, teacher, *, divergence="forward_kl", beta=0.5, temperature=1.0,
            reduction="batchmean", labels=None, ignore_index=-100):
    """Oracle of pydistill_ext.kd_loss (computes in the dtype it is given: pass float64)."""
    rows = divergence_rows(student, teacher, divergence, beta, temperature)
    valid = None if labels is None else labels != ignore_index
    return reduce_rows(rows, valid, reduction, student.shape[-1])


def kd_loss_topk(student, teacher_indices, teacher_logits_topk, **kw):
    """Oracle of pydistill_ext.kd_loss_topk: the teacher is -inf off its K entries, so its
    softmax is the softmax over the K given logits."""
    dense = torch.full_like(student, -math.inf, dtype=teacher_logits_topk.dtype)
    dense = dense.scatter(-1, teacher_indices, teacher_logits_topk)
    return kd_loss(student, dense.to(student.dtype), **kw)


# ---- eager composites (benchmark baselines): what a user writes without this library ----

def eager_forward_kl(student, teacher, temperature=1.0):
    """log_softmax + F.kl_div(log_target=True, reduction='batchmean')."""
    ls = F.log_softmax(student.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True)


def eager_composite(divergence, beta=0.5):
    """The eager composite of one divergence (upcast to fp32, batchmean)."""
    if divergence == "forward_kl":
        return eager_forward_kl

    def fn(student, teacher, temperature=1.0):
        rows = divergence_rows(student.float(), teacher.float(), divergence, beta, temperature)
        return rows.sum() / rows.shape[0]

    return fn
