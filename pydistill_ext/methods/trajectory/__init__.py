"""Trajectory matching (REFERENCE.md 5): the unrolled inner loop with exact / unroll / TESLA
gradients (:mod:`.unroll`) and batched expert buffers (:mod:`.experts`)."""
from pydistill_ext.methods.trajectory.unroll import (MODES, Augment, FlatModel, TrajectoryResult,
                                                     derive_seed, param_distance_loss,
                                                     step_batch, trajectory_step)

__all__ = ["MODES", "Augment", "FlatModel", "TrajectoryResult", "derive_seed",
           "param_distance_loss", "step_batch", "trajectory_step"]
from pydistill_ext.methods.trajectory.experts import (ExpertBuffer, ExpertConfig, expert_seed,
                                                      train_experts)

__all__ += ["ExpertBuffer", "ExpertConfig", "expert_seed", "train_experts"]
from pydistill_ext.methods.trajectory.memory import SavedTensorMeter

__all__ += ["SavedTensorMeter"]
