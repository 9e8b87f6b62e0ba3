"""Float64 oracles of the feature-level KD losses (REFERENCE.md 3), written from the papers'
equations with plain loops, independently of pydistill_ext.losses.feature. Differentiable
(autograd through the loops), meant for tiny inputs only."""
import torch


def _d(x):
    return x.double()


# ----------------------------------------------------------------------------- FitNets


def conv2d_same(x, weight, bias):
    """Stride-1 convolution with zero padding k // 2 (odd k), as a sum over kernel taps of
    shifted channel contractions."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ph, pw = kh // 2, kw // 2
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    out = torch.zeros(n, o, h, w, dtype=x.dtype) + bias.view(1, o, 1, 1)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + h, j:j + w]                    # [n, c, h, w]
            out = out + torch.einsum("oc,nchw->nohw", weight[:, :, i, j], patch)
    return out


def batch_norm_train(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm: biased statistics over (N, H, W) per channel."""
    out = []
    for c in range(x.shape[1]):
        v = x[:, c]
        mu = v.sum() / v.numel()
        var = ((v - mu) ** 2).sum() / v.numel()
        out.append((v - mu) / torch.sqrt(var + eps) * gamma[c] + beta[c])
    return torch.stack(out, 1)


def hint_loss(regressed, teacher, reduction="sum", half=True):
    """½ Σ (u − r)² (FitNets Eq. 3); 'mean' over elements, 'batchmean' / N."""
    r, u = _d(regressed), _d(teacher)
    total = torch.zeros((), dtype=torch.float64)
    for n in range(r.shape[0]):
        total = total + ((u[n] - r[n]) ** 2).sum()
    if reduction == "mean":
        total = total / r.numel()
    elif reduction == "batchmean":
        total = total / r.shape[0]
    return 0.5 * total if half else total


def hint_module_loss(f_s, f_t, weight, bias, bn=None, relu=False, reduction="sum", half=True):
    r = conv2d_same(_d(f_s), weight.double(), bias.double())
    if bn is not None:
        r = batch_norm_train(r, bn[0].double(), bn[1].double(), bn[2])
    if relu:
        r = torch.clamp(r, min=0)
    return hint_loss(r, f_t, reduction, half)


# ----------------------------------------------------------------- attention transfer


def at_map(f, p=2.0):
    """Per sample: Q = Σ_c |f_c|^p (flattened), Q / ‖Q‖₂."""
    f = _d(f)
    out = []
    for n in range(f.shape[0]):
        q = torch.zeros(f.shape[2] * f.shape[3], dtype=torch.float64)
        for c in range(f.shape[1]):
            q = q + f[n, c].abs().reshape(-1) ** p
        out.append(q / max_norm(q))
    return torch.stack(out)


def max_norm(v, eps=1e-12):
    nrm = torch.sqrt((v * v).sum())
    return torch.clamp(nrm, min=eps)


def attention_transfer_loss(f_s, f_t, p=2.0, mode="code"):
    if isinstance(f_s, torch.Tensor):
        f_s, f_t = [f_s], [f_t]
    total = torch.zeros((), dtype=torch.float64)
    for a, b in zip(f_s, f_t):
        qa, qb = at_map(a, p), at_map(b, p)
        if mode == "code":
            total = total + ((qa - qb) ** 2).sum() / qa.numel()
        else:
            per = [torch.sqrt(((qa[n] - qb[n]) ** 2).sum()) for n in range(qa.shape[0])]
            total = total + sum(per) / len(per)
    return total


# ----------------------------------------------------------------------------- cosine


def cosine_feature_loss(f_s, f_t, reduction="mean", eps=1e-8):
    s, t = _d(f_s).reshape(f_s.shape[0], -1), _d(f_t).reshape(f_t.shape[0], -1)
    per = []
    for n in range(s.shape[0]):
        ns = torch.clamp(torch.sqrt((s[n] ** 2).sum()), min=eps)
        nt = torch.clamp(torch.sqrt((t[n] ** 2).sum()), min=eps)
        per.append(1.0 - (s[n] * t[n]).sum() / (ns * nt))
    per = torch.stack(per)
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]


# -------------------------------------------------------------------------------- RKD


def huber(x, y, delta=1.0):
    """Smooth-L1 / Huber with δ = 1 of one pair of scalars."""
    a = (x - y).abs()
    return 0.5 * a * a / delta if a.item() < delta else a - 0.5 * delta


def rkd_distance_loss(f_s, f_t):
    """Park et al. Eqs. 4-5: distances over i ≠ j normalised by their mean; Huber over all
    N² entries (diagonal 0 on both sides), averaged."""
    def psi(e):
        e = _d(e).reshape(e.shape[0], -1)
        n = e.shape[0]
        d = [[torch.sqrt(((e[i] - e[j]) ** 2).sum()) if i != j else torch.zeros((), dtype=torch.float64)
              for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    ds, dt = psi(f_s), psi(f_t)
    n = len(ds)
    return sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / (n * n)


def rkd_angle_loss(f_s, f_t):
    """Park et al. Eqs. 6-7: cos of the angle at apex j between t_i and t_k for every triplet;
    triplets with i = j or k = j count as 0; Huber averaged over N³ entries."""
    def psi(e):
        e = _d(e).reshape(e.shape[0], -1)
        n = e.shape[0]
        out = {}
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    if i == j or k == j:
                        out[i, j, k] = torch.zeros((), dtype=torch.float64)
                        continue
                    u, v = e[i] - e[j], e[k] - e[j]
                    out[i, j, k] = (u * v).sum() / (torch.sqrt((u * u).sum()) * torch.sqrt((v * v).sum()))
        return out

    a_s, a_t = psi(f_s), psi(f_t)
    return sum(huber(a_s[key], a_t[key]) for key in a_s) / len(a_s)


def rkd_loss(f_s, f_t, w_dist=25.0, w_angle=50.0):
    return w_dist * rkd_distance_loss(f_s, f_t) + w_angle * rkd_angle_loss(f_s, f_t)
