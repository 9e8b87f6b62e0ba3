"""The contract every dataset-distillation method implements, and the method registry.

A method is a class with a ``name``; ``pydistill distill --method NAME`` builds it with
``(dataset, ipc, seed, device, **options)`` and calls ``step(i)`` for i = start .. iterations-1.
All of its randomness must come from generators it owns and returns in ``state_dict()`` —
then the runner's checkpoint/resume reproduces an uninterrupted run exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Type

import torch

from pydistill_ext.artifacts import DistilledSet

_REGISTRY: Dict[str, Type["DistillMethod"]] = {}


class DistillMethod:
    name: str = ""
    description: str = ""
    default_iterations: int = 0
    # keyword options accepted from the CLI as --option key=value, with their types
    options: Dict[str, type] = {}

    def __init__(self, dataset, ipc: int, seed: int, device="cpu", **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {sorted(unknown)}; "
                             f"known: {sorted(self.options) or 'none'}")
        if not isinstance(ipc, int) or ipc < 1:
            raise ValueError(f"ipc must be an integer >= 1, got {ipc!r}")
        self.dataset, self.ipc, self.seed = dataset, ipc, int(seed)
        self.device = torch.device(device)

    def step(self, iteration: int) -> Dict[str, float]:
        """One optimisation step; returns scalar metrics to record (e.g. {"loss": ...})."""
        raise NotImplementedError

    def synthetic_set(self) -> DistilledSet:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError


def register_method(cls: Type[DistillMethod]) -> Type[DistillMethod]:
    """Class decorator: make ``cls`` available to ``pydistill distill --method cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered "
                         f"({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Type[DistillMethod]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods() -> List[str]:
    _load_builtin()
    return sorted(_REGISTRY)


# modules whose import registers built-in methods (a method issue adds its module here)
BUILTIN_MODULES = ("baselines", "dm", "datadam", "dc", "bn_synthesis", "zeroq",
                   "trajectory.methods")


def _load_builtin():
    import importlib
    import importlib.util
    for name in BUILTIN_MODULES:
        mod = f"pydistill_ext.methods.{name}"
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def as_bool(v) -> bool:
    """A method option's boolean: a bool, 0 / 1, or a string from the command line
    (``1/true/yes/on`` or ``0/false/no/off``); anything else is refused."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ValueError(f"expected a boolean, got {v!r}")
