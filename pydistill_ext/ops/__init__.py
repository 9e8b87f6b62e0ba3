"""Typed wrappers, fake kernels and autograd of the native ops (one module per op)."""
from pydistill_ext.ops import fused_linear_kd_loss, kd_loss  # noqa: F401
from pydistill_ext.ops import attention_map, class_mean, gradient_match  # noqa: F401
from pydistill_ext.ops import bn_moments, dsa_augment, trajectory_ops  # noqa: F401
