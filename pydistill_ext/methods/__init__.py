"""Distillation methods: the registry every method joins, the checkpointing runner, and the
knowledge-distillation recipe. Method issues add their modules here and register them."""
from pydistill_ext.methods.base import (DistillMethod, get_method, list_methods, register_method,
                                        unregister_method)
from pydistill_ext.methods.kd import KDConfig, hinton_kd_loss, teacher_logits, train_student
from pydistill_ext.methods.runner import run_distill

__all__ = ["DistillMethod", "KDConfig", "get_method", "hinton_kd_loss", "list_methods",
           "register_method", "run_distill", "teacher_logits", "train_student",
           "unregister_method"]
