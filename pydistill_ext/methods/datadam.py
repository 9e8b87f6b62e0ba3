"""DataDAM: "DataDAM: Efficient Dataset Distillation with Attention Matching" (Sajedi et al.,
ICCV 2023).

Each iteration: a random frozen ConvNet, ``batch_real`` real images per class and the
synthetic set, Siamese DSA (one seed for both sides), then (REFERENCE.md 3, DataDAM)

    L = 100 * sum_{l < L} sum_c || mean A_l(real_c) - mean A_l(syn_c) ||^2
      + 100 * task_balance * sum_c || mean emb(real_c) - mean emb(syn_c) ||^2

with A_l = normalize_L2(flatten(sum_ch |f_l|^p)) of block l's activation (after ReLU, before
pooling: what the original's hooks on the ReLUs see), the last block excluded from the
attention term as in the released code (``range(length_of_network - 1)``), and emb the
flattened final features (``ConvNet.embed``; the "MMD" term is a linear-kernel MMD).
SGD on the images with momentum 0.5.

Defaults and their sources: ``p = 1`` (released code ``get_attention(param=1)``; the paper's
table says 4 -- ``--option p=4``), ``task_balance = 0.01`` (code default; 0.02 at high
resolution), ``batch_real = 64`` (REFERENCE.md), ``lr_img = 1.0`` (code default, "1 for low
IPCs, 10 for >= 100"), ``init = real``, 8000 iterations. DSA: the paper uses Siamese DSA; the
released ``main_DataDAM.py`` has the DSA call commented out -- ``--option dsa=false``
reproduces that.

The fast path: one forward per side computing every block's activation and the embedding,
attention maps by the fused ``pde.attention_map``, class means by ``pde.class_mean``
(:func:`pydistill_ext.losses.matching.attention_means_loss`); the real side runs without an
autograd graph, in cache-sized chunks each reduced to its attention maps at once; the network
passes go through ``torch.compile`` (option ``compile``, default on, as DM).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from pydistill_ext.losses.matching import attention_means_loss, dm_loss
from pydistill_ext.methods.base import register_method
from pydistill_ext.methods.dm import MatchingMethod, compiled, cpu_layout, real_chunks
from pydistill_ext.models.convnet import ConvNet
from pydistill_ext.ops.attention_map import attention_map


def maps_and_embedding(net, x) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Each block's activation (``feature_maps``' first output) and the flattened final
    features (``embed``) from ONE pass for a ConvNet; other models take two passes."""
    if isinstance(net, ConvNet):
        maps, out = [], x
        for i, layer in enumerate(net.features):
            out = layer(out)
            if i in net._act_index:
                maps.append(out)
        return maps, out.flatten(1)
    maps, _ = net.feature_maps(x)
    return maps, net.embed(x)


def _attention_rows(f: torch.Tensor, p: float) -> torch.Tensor:
    """normalize_L2(flatten(sum_ch |f|^p)) in plain torch ops, for the compiled real side
    (no graph), where Inductor fuses it into the block's norm + ReLU kernel, so the block's
    activation is never copied out for a separate kernel; ``pde.attention_map`` computes the
    same map everywhere else, and the tests hold the two together."""
    return F.normalize(f.abs().pow(p).sum(1).flatten(1), p=2.0, dim=1, eps=1e-12)


def _attention_and_embedding(net, x, p: float):
    """Every block's attention map and the embedding, from one pass (compiled real side)."""
    maps, emb = maps_and_embedding(net, x)
    return [_attention_rows(m, p) for m in maps], emb


def _attention_pass(net, x, p: float, compile: bool):
    if compile:
        return compiled(_attention_and_embedding)(net, cpu_layout(x), float(p))
    maps, emb = maps_and_embedding(net, cpu_layout(x))
    return [attention_map(m, p) for m in maps], emb


def _real_side(net, x_real, n_att, chunk=None, *, p=1.0, compile=False):
    """Attention maps A_l [N, H_l*W_l] of the first ``n_att`` blocks and the embedding of
    the real batch, without a graph, in chunks (``dm.real_chunks``; channels-last on the CPU).
    Each chunk's activations are reduced to attention maps at once, so the full real
    activations are never kept. Eager: ``pde.attention_map`` per chunk; ``compile``: each
    chunk (network + maps) is one ``dm.compiled`` graph."""
    atts, embs = [[] for _ in range(n_att)], []
    with torch.no_grad():
        for c in real_chunks(x_real, chunk):
            a, e = _attention_pass(net, c, p, compile)
            for lst, t in zip(atts, a):
                lst.append(t)
            embs.append(e)
    return [torch.cat(lst) for lst in atts], torch.cat(embs)


def datadam_objective(net, x_real, y_real, x_syn, y_syn, num_classes, p=1.0,
                      task_balance=0.01, *, compile=False) -> torch.Tensor:
    """DataDAM's loss for one network (module docstring): one pass per side (the real one
    chunked, without a graph, reduced to attention maps chunk by chunk), attention maps
    (``pde.attention_map``) and class means (``pde.class_mean``). ``compile``: the network
    passes run through ``dm.compiled``, the real side's maps inside the same graph (same
    loss up to float32 rounding order)."""
    # synthetic side (with a graph): the maps go through pde.attention_map's fused forward
    # and backward (timed: as fast as folding the maps into the compiled graph, which pays
    # for it in the saved-for-backward forward)
    f = compiled(maps_and_embedding) if compile else maps_and_embedding
    maps_s, emb_s = f(net, cpu_layout(x_syn))
    n_att = max(len(maps_s) - 1, 0)
    att_s = [attention_map(m, p) for m in maps_s[:n_att]]
    att_r, emb_r = _real_side(net, x_real, n_att, p=p, compile=compile)
    loss = 100.0 * task_balance * dm_loss(emb_r, y_real, emb_s, y_syn, num_classes)
    if n_att:
        loss = loss + 100.0 * attention_means_loss(att_r, y_real, att_s, y_syn, num_classes)
    return loss


@register_method
class DataDAM(MatchingMethod):
    name = "datadam"
    description = ("DataDAM (Sajedi et al., ICCV 2023): attention-map + final-feature matching "
                   "on random frozen ConvNets, Siamese DSA")
    default_iterations = 8000
    options = {**MatchingMethod.options, "p": float, "task_balance": float}
    defaults = {"lr_img": 1.0, "batch_real": 64, "init": "real", "model": "convnet",
                "dsa": True, "p": 1.0, "task_balance": 0.01, "compile": True}

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        super().__init__(dataset, ipc, seed, device, **options)
        self.hp["p"], self.hp["task_balance"] = float(self.hp["p"]), float(self.hp["task_balance"])
        if not self.hp["p"] > 0:
            raise ValueError(f"p must be > 0, got {self.hp['p']}")

    def objective(self, net, x_real, y_real, x_syn):
        return datadam_objective(net, x_real, y_real, x_syn, self._labels_dev, self.num_classes,
                                 p=self.hp["p"], task_balance=self.hp["task_balance"],
                                 compile=self.hp["compile"])
