"""Eager anchor of DC's gradient-matching loss (REFERENCE.md 3, "DC gradient matching"),
written from the definitions of `VICO-UoE/DatasetCondensation: utils.py distance_wb,
match_loss` and `main.py`'s per-class loop with plain torch ops: a Python loop over the
classes and over the parameters, 1-D parameters contributing 0 to the ``ours`` distance.

It is the float64 reference the ``dc`` / ``dsa`` methods' fused loss is tested against
(``tests/methods/test_dc.py``).
"""
import torch
import torch.nn.functional as F


def distance_wb(gwr, gws):
    """DC's layer distance: rows of the gradient reshaped to [out, rest], summed
    ``1 - cos`` with the 1e-6 guard; tensors of one dimension (biases, norms) give 0."""
    shape = gwr.shape
    if len(shape) == 4:      # conv weight [out, in, kh, kw]
        gwr = gwr.reshape(shape[0], shape[1] * shape[2] * shape[3])
        gws = gws.reshape(shape[0], shape[1] * shape[2] * shape[3])
    elif len(shape) == 3:    # layernorm weight [C, H, W]
        gwr = gwr.reshape(shape[0], shape[1] * shape[2])
        gws = gws.reshape(shape[0], shape[1] * shape[2])
    elif len(shape) == 2:    # linear weight [out, in]
        pass
    elif len(shape) == 1:    # bias / norm affine: DC returns 0
        return torch.zeros((), dtype=gwr.dtype, device=gwr.device)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1)
                     / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))


def match_loss(gw_syn, gw_real, metric="ours"):
    """DC's ``match_loss``: the distance between two lists of parameter gradients."""
    dis = torch.zeros((), dtype=gw_real[0].dtype, device=gw_real[0].device)
    if metric == "ours":
        for ig in range(len(gw_real)):
            dis = dis + distance_wb(gw_real[ig], gw_syn[ig])
    elif metric == "mse":
        vr = torch.cat([g.reshape(-1) for g in gw_real])
        vs = torch.cat([g.reshape(-1) for g in gw_syn])
        dis = torch.sum((vs - vr) ** 2)
    elif metric == "cos":
        vr = torch.cat([g.reshape(-1) for g in gw_real])
        vs = torch.cat([g.reshape(-1) for g in gw_syn])
        dis = 1 - torch.sum(vr * vs, dim=-1) / (torch.norm(vr, dim=-1) * torch.norm(vs, dim=-1)
                                               + 0.000001)
    else:
        raise ValueError(f"unknown distance function: {metric}")
    return dis


def dc_matching_loss(net, real_batches, syn_batches, metric="ours"):
    """DC main.py's inner body for one outer step: for each class c, the CE gradients of a
    real and a synthetic batch (labels c) w.r.t. all parameters, real detached, synthetic
    with ``create_graph=True``, summed ``match_loss``. Differentiable w.r.t. the syn images."""
    net_parameters = list(net.parameters())
    loss = None
    for c, (img_real, img_syn) in enumerate(zip(real_batches, syn_batches)):
        lab_real = torch.ones((img_real.shape[0],), dtype=torch.long) * c
        lab_syn = torch.ones((img_syn.shape[0],), dtype=torch.long) * c
        loss_real = F.cross_entropy(net(img_real), lab_real.to(img_real.device))
        gw_real = torch.autograd.grad(loss_real, net_parameters)
        gw_real = [g.detach().clone() for g in gw_real]
        loss_syn = F.cross_entropy(net(img_syn), lab_syn.to(img_syn.device))
        gw_syn = torch.autograd.grad(loss_syn, net_parameters, create_graph=True)
        d = match_loss(gw_syn, gw_real, metric)
        loss = d if loss is None else loss + d
    return loss
