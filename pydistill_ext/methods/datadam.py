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
(:func:`pydistill_ext.losses.matching.attention_match_loss`); the real side runs without an
autograd graph.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from pydistill_ext.losses.matching import attention_match_loss, dm_loss
from pydistill_ext.methods.base import register_method
from pydistill_ext.methods.dm import REAL_CHUNK, MatchingMethod, cpu_layout
from pydistill_ext.models.convnet import ConvNet


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


def _real_side(net, x_real, n_att, chunk=REAL_CHUNK):
    """Block activations (first ``n_att``) and embedding of the real batch, without a graph,
    in chunks of ``chunk`` rows (channels-last on the CPU)."""
    maps, embs = [[] for _ in range(n_att)], []
    with torch.no_grad():
        for c in x_real.split(chunk):
            m, e = maps_and_embedding(net, cpu_layout(c))
            for lst, t in zip(maps, m):
                lst.append(t)
            embs.append(e)
    return [torch.cat(lst) for lst in maps], torch.cat(embs)


def datadam_objective(net, x_real, y_real, x_syn, y_syn, num_classes, p=1.0,
                      task_balance=0.01) -> torch.Tensor:
    """DataDAM's loss for one network (module docstring): one pass per side (the real one
    chunked, without a graph), fused attention maps and class means."""
    maps_s, emb_s = maps_and_embedding(net, cpu_layout(x_syn))
    n_att = max(len(maps_s) - 1, 0)
    maps_r, emb_r = _real_side(net, x_real, n_att)
    loss = 100.0 * task_balance * dm_loss(emb_r, y_real, emb_s, y_syn, num_classes)
    if n_att:
        loss = loss + 100.0 * attention_match_loss(maps_r[:n_att], y_real, maps_s[:n_att], y_syn,
                                                   num_classes, p=p)
    return loss


@register_method
class DataDAM(MatchingMethod):
    name = "datadam"
    description = ("DataDAM (Sajedi et al., ICCV 2023): attention-map + final-feature matching "
                   "on random frozen ConvNets, Siamese DSA")
    default_iterations = 8000
    options = {**MatchingMethod.options, "p": float, "task_balance": float}
    defaults = {"lr_img": 1.0, "batch_real": 64, "init": "real", "model": "convnet",
                "dsa": True, "p": 1.0, "task_balance": 0.01}

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        super().__init__(dataset, ipc, seed, device, **options)
        self.hp["p"], self.hp["task_balance"] = float(self.hp["p"]), float(self.hp["task_balance"])
        if not self.hp["p"] > 0:
            raise ValueError(f"p must be > 0, got {self.hp['p']}")

    def objective(self, net, x_real, y_real, x_syn):
        return datadam_objective(net, x_real, y_real, x_syn, self._labels_dev, self.num_classes,
                                 p=self.hp["p"], task_balance=self.hp["task_balance"])
