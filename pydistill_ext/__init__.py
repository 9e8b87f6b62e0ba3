"""pydistill_ext: fused, torch.compile-safe PyTorch ops for distillation.

    import pydistill_ext as pde
    loss = pde.kd_loss(student_logits, teacher_logits, divergence="forward_kl")
"""
from pydistill_ext import _lib  # noqa: F401  (loads the kernels first)
from pydistill_ext.ops.kd_loss import DIVERGENCES, REDUCTIONS, kd_loss, kd_loss_topk
from pydistill_ext.ops.attention_map import attention_map
from pydistill_ext.ops.class_mean import class_mean, class_moments
from pydistill_ext.ops.gradient_match import gradient_match_distance
from pydistill_ext.ops.bn_moments import bn_moments, frozen_bn_moments
from pydistill_ext.ops.dsa_augment import dsa_augment
from pydistill_ext.ops.trajectory_ops import param_distance, sgd_step_accumulate
from pydistill_ext.losses.kd import KDLoss, FusedLinearKDLoss, fused_linear_kd_loss
from pydistill_ext.losses.bn_matching import BNStatCommittee, BNStatMatcher

__version__ = "0.1.0"

__all__ = ["kd_loss", "kd_loss_topk", "fused_linear_kd_loss", "KDLoss", "FusedLinearKDLoss",
           "DIVERGENCES", "REDUCTIONS", "class_mean", "class_moments",
           "attention_map", "gradient_match_distance", "bn_moments", "frozen_bn_moments",
           "dsa_augment", "param_distance", "sgd_step_accumulate",
           "BNStatMatcher", "BNStatCommittee", "__version__"]
