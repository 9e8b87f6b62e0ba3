"""Loads the compiled kernels (pydistill_ext._C) with an actionable error."""
import torch

try:
    from pydistill_ext import _C  # noqa: F401  (registers torch.ops.pydistill_ext.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "pydistill_ext: the compiled extension pydistill_ext._C could not be loaded "
        f"({exc}). Build it against the installed torch {torch.__version__} with "
        "`pip install --no-build-isolation -e .` from the repository root; a build made for "
        "another torch version must be rebuilt."
    ) from exc

ops = torch.ops.pydistill_ext
WITH_CUDA = bool(_C.with_cuda)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.pydistill_ext.<op_name> has a kernel for dispatch_key."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pydistill_ext::{op_name}", dispatch_key)
