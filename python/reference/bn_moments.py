"""Float64 oracle of bn_moments (REFERENCE.md 4.1), the anchors' eager BN hook written out
literally (NVlabs/DeepInversion DeepInversionFeatureHook, VILA-Lab/SRe2L BNFeatureHook), and the
baselines the benchmark compares against."""
import torch


def _dims(x, per_sample):
    return list(range(2, x.dim())) if per_sample else [0] + list(range(2, x.dim()))


def bn_moments(x, per_sample=False, unbiased=False):
    """(mean, var) in float64 via torch.var_mean over every dim but 1 (per_sample: the trailing
    dims only). Differentiable (autograd of var_mean)."""
    xd = x.double()
    dims = _dims(x, per_sample)
    if not dims:  # per_sample on [N, C]: each group is one element
        return xd.clone(), torch.zeros_like(xd) if not unbiased else xd * float("nan")
    var, mean = torch.var_mean(xd, dim=dims, correction=1 if unbiased else 0)
    return mean, var


def hook_moments(x):
    """The anchors' hook, verbatim math, for a 4-D x (computed in x's dtype):
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view(C, -1).var(1, unbiased=False)"""
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    return mean, var


def hook_loss(x, running_mean, running_var):
    """The anchors' per-layer BN loss: ||running_var - var||_2 + ||running_mean - mean||_2."""
    mean, var = hook_moments(x)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def var_mean_loss(x, running_mean, running_var):
    """The same loss with torch.var_mean (one fused reduction) instead of the hook's copy."""
    var, mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def naive_moments_fp32(x):
    """E[x^2] - E[x]^2 accumulated in float32: the formula that cancels catastrophically when
    |mean| >> std (kept to show that it does, and that bn_moments does not)."""
    xf = x.float()
    dims = _dims(x, False)
    mean = xf.mean(dims)
    return mean, (xf * xf).mean(dims) - mean * mean
