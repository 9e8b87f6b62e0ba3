"""Functional and nn.Module losses composed from the ops.

- ``kd``: logit-level KD (``KDLoss``, ``FusedLinearKDLoss``).
- ``feature``: feature-level KD (FitNets hint, attention transfer, cosine, RKD).
- ``matching``: dataset-distillation matching losses (DM mean embedding, DataDAM attention
  matching, MMD with linear / RBF kernels).
- ``bn_matching``: BatchNorm-statistic matching (``BNStatMatcher``, ``BNStatCommittee``).
Each submodule lists its public names in ``__all__``; they are re-exported here.
"""
import importlib as _importlib
import importlib.util as _util

from pydistill_ext.losses.kd import FusedLinearKDLoss, KDLoss, fused_linear_kd_loss  # noqa: F401

__all__ = ["KDLoss", "FusedLinearKDLoss", "fused_linear_kd_loss"]
for _name in ("feature", "matching", "bn_matching"):
    if _util.find_spec(f"pydistill_ext.losses.{_name}") is not None:
        _mod = _importlib.import_module(f"pydistill_ext.losses.{_name}")
        for _k in getattr(_mod, "__all__", ()):
            globals()[_k] = getattr(_mod, _k)
            __all__.append(_k)
