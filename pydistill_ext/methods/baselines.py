"""The baselines as zero-iteration methods, so ``pydistill distill --method random`` and
``pydistill baseline --kind random`` produce the same files."""
from __future__ import annotations

from pydistill_ext.evaluation.baselines import make_baseline
from pydistill_ext.methods.base import DistillMethod, register_method


class _Baseline(DistillMethod):
    kind = ""
    default_iterations = 0

    def __init__(self, dataset, ipc, seed, device="cpu", **options):
        if self.kind == "full":
            ipc = ipc or 1
        super().__init__(dataset, ipc, seed, device, **options)
        self._set = make_baseline(self.kind, dataset, None if self.kind == "full" else ipc, seed)

    def step(self, iteration):
        return {}

    def synthetic_set(self):
        return self._set

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@register_method
class RandomReal(_Baseline):
    name = kind = "random"
    description = "random real subset: ipc training images per class (seeded)"


@register_method
class Herding(_Baseline):
    name = kind = "herding"
    description = "herding coreset per class in pixel space (Welling 2009)"


@register_method
class FullData(_Baseline):
    name = kind = "full"
    description = "the full training set (upper bound)"
