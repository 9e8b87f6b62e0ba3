"""Functional and nn.Module losses composed from the ops."""
from pydistill_ext.losses.kd import FusedLinearKDLoss, KDLoss, fused_linear_kd_loss  # noqa: F401
