"""Float64 oracle of attention_map (REFERENCE.md 3: attention transfer, DataDAM) and the eager
composite the benchmarks compare against."""
import torch
import torch.nn.functional as F


def _abs_pow(x, p):
    """|x|^p whose autograd gradient at x = 0 is 0 for every p > 0 (the op's subgradient):
    the pow branch never sees a 0, so no inf * 0."""
    v = x.abs()
    nz = v > 0
    safe = torch.where(nz, v, torch.ones_like(v))
    return torch.where(nz, safe.pow(p), torch.zeros_like(v))


def attention_map(features, p=4.0, eps=1e-12):
    """a = sum_c |f|^p, flattened, then F.normalize (a / max(||a||, eps)); float64."""
    a = _abs_pow(features.double(), p).sum(1).flatten(1)
    return F.normalize(a, p=2.0, dim=1, eps=eps)


def eager_attention_map(features, p=4.0):
    """The anchors' formulation: F.normalize(f.abs().pow(p).sum(1).flatten(1))."""
    return F.normalize(features.abs().pow(p).sum(1).flatten(1))
