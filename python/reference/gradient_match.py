"""Float64 oracle of gradient_match_distance (REFERENCE.md 3, DC gradient matching), written from
DC's definitions with plain torch ops; it is also the eager per-tensor loop the benchmarks
compare against (called on the inputs' dtype)."""
import torch


def _distance_wb(a, b):
    """DC's per-tensor distance: [out, rest] rows, 1-D (and 0-d) tensors contribute 0."""
    if a.dim() < 2:
        return torch.zeros((), dtype=a.dtype, device=a.device)
    rest = a.numel() // a.shape[0] if a.shape[0] else 0  # [0, ...] tensors: no rows
    a = a.reshape(a.shape[0], rest)
    b = b.reshape(b.shape[0], rest)
    return torch.sum(1 - torch.sum(a * b, dim=-1) /
                     (torch.norm(a, dim=-1) * torch.norm(b, dim=-1) + 0.000001))


def gradient_match_distance(grads_a, grads_b, metric="ours", dtype=torch.float64):
    """match_loss(grads_a, grads_b) in ``dtype`` (float64: the oracle)."""
    a = [t.to(dtype) for t in grads_a]
    b = [t.to(dtype) for t in grads_b]
    if metric == "ours":
        dis = torch.zeros((), dtype=dtype, device=a[0].device)
        for x, y in zip(a, b):
            dis = dis + _distance_wb(x, y)
        return dis
    if metric == "mse":
        return sum(((y - x) ** 2).sum() for x, y in zip(a, b))
    if metric == "cos":
        va = torch.cat([x.reshape(-1) for x in a])
        vb = torch.cat([y.reshape(-1) for y in b])
        return 1 - torch.sum(va * vb) / (torch.norm(va) * torch.norm(vb) + 0.000001)
    raise ValueError(metric)


def eager_match_loss(grads_a, grads_b, metric="ours"):
    """DC's eager loop on the inputs' own dtype (benchmark baseline)."""
    return gradient_match_distance(grads_a, grads_b, metric, dtype=grads_a[0].dtype)
