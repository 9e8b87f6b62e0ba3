"""Data augmentation for distillation: Differentiable Siamese Augmentation (DSA).

    from pydistill_ext.augment import dsa_augment
    y_real = dsa_augment(x_real, seed=s)   # same seed -> same transformation (Siamese)
    y_syn = dsa_augment(x_syn, seed=s)
"""
from pydistill_ext.augment.dsa import (DEFAULT_STRATEGY, DIGIT_STRATEGY, DSA_MODES, DSA_OPS,
                                       DSA_STRATEGIES, DSAOp, DSAParams, DSATransform,
                                       default_strategy, dsa_apply, dsa_augment, dsa_params)

__all__ = ["dsa_augment", "dsa_params", "dsa_apply", "DSAParams", "DSAOp", "DSATransform",
           "DSA_STRATEGIES", "DSA_OPS", "DSA_MODES", "DEFAULT_STRATEGY",
           "DIGIT_STRATEGY", "default_strategy"]
