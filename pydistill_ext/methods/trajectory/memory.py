"""Counting the bytes autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``).

Allocation counting rather than timing or RSS: every tensor a graph node saves is packed
through the hook; we hold it in a small handle whose deletion (when the graph node is freed)
releases its bytes. Tensors sharing one storage (views of the flat parameter vector, the same
activation saved by two nodes) are counted once. ``peak`` is the largest live total.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["SavedTensorMeter"]


class _Handle:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """``with SavedTensorMeter() as m: ...`` then ``m.peak`` / ``m.current`` (bytes)."""

    def __init__(self):
        self.current = 0
        self.peak = 0
        self.packed = 0
        self._live: Dict[tuple, list] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        self.packed += 1
        try:
            st = t.untyped_storage()
            key, nbytes = (t.device.type, st.data_ptr()), st.nbytes()
        except (RuntimeError, NotImplementedError):   # tensors without a plain storage
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        # keep a detached alias: holding a saved *output* itself (which points to its grad_fn,
        # which holds this handle) would make an uncollectable cycle and leak the node
        return _Handle(t.detach(), key, self)

    @staticmethod
    def _unpack(h: "_Handle"):
        return h.tensor

    def _release(self, key):
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[key]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False
