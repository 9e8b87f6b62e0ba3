"""`python -m pydistill_ext.info`: versions, build knobs and, per op, the available backends."""
from __future__ import annotations

import importlib.util
import os
import platform

import torch

import pydistill_ext
from pydistill_ext._lib import WITH_CUDA, has_kernel, ops

# public op -> native op names (forward, backward)
OPS = {
    "kd_loss": ("kd_loss_forward", "kd_loss_backward"),
    "kd_loss_topk": ("kd_loss_topk_forward", "kd_loss_topk_backward"),
    "fused_linear_kd_loss": ("kd_loss_forward", None),
    "class_mean": ("class_mean_forward", None),
    "attention_map": ("attention_map_forward", "attention_map_backward"),
    "gradient_match_distance": ("gradient_match_forward", "gradient_match_backward"),
    "dsa_augment": ("dsa_apply_forward", "dsa_apply_backward"),
    "bn_moments": ("bn_moments_forward", "bn_moments_backward"),
    "frozen_bn_moments": ("frozen_bn_moments_forward", "frozen_bn_moments_backward"),
    "param_distance": ("param_distance_forward", "param_distance_backward"),
    "sgd_step_accumulate": ("sgd_step_accumulate", None),
}
# ops with a Triton kernel
TRITON_OPS = ("kd_loss", "kd_loss_topk")


def triton_status() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    import triton
    if torch.cuda.is_available():
        return f"{triton.__version__} (GPU)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return f"{triton.__version__} (TRITON_INTERPRET=1: CPU interpreter)"
    return f"{triton.__version__} (no GPU: usable only with TRITON_INTERPRET=1)"


def backends(op: str) -> list:
    fwd, _ = OPS[op]
    out = []
    if has_kernel(fwd, "CPU"):
        out.append(f"cpu ({ops.cpu_capability()})")
    if has_kernel(fwd, "CUDA"):
        out.append("cuda" + ("" if torch.cuda.is_available() else " (built, no GPU visible)"))
    if importlib.util.find_spec("triton") is not None and op in TRITON_OPS:
        out.append("triton")
    elif op == "fused_linear_kd_loss":
        out.append("(chunks over kd_loss: same backends)")
    return out


def report() -> str:
    lines = [
        f"pydistill_ext {pydistill_ext.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})",
        f"CPU kernels: at::vec {ops.cpu_capability()} (torch's CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()})",
        f"CUDA kernels built: {WITH_CUDA}",
        f"triton: {triton_status()}",
        f"PYDISTILL_CUDA_BACKEND={os.environ.get('PYDISTILL_CUDA_BACKEND', '') or '(default: cuda)'}",
        "",
        "op                      backends",
    ]
    for op in OPS:
        lines.append(f"{op:<24}{', '.join(backends(op))}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
