"""lm_head + KD on CPU: pydistill_ext.fused_linear_kd_loss (chunked, logits never
materialised) vs eager (full logits, then the eager KL composite) vs full logits then
pydistill_ext.kd_loss. Forward+backward with gradients for the student hidden states and
weight; the teacher is given as hidden states + its own frozen lm_head.

    python -m benchmarks.bench_fused_linear_kd_loss          # N=2048, H=1024, V=32000 fp32
    python -m benchmarks.bench_fused_linear_kd_loss --smoke
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import harness

import pydistill_ext as pde  # noqa: E402
from reference import kd_loss as ref  # noqa: E402

VARIANTS = ("fused", "eager", "matmul+kd_loss")


def inputs(n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(h=torch.randn(n, h, generator=g), w=torch.randn(v, h, generator=g) * h ** -0.5,
                th=torch.randn(n, h, generator=g), tw=torch.randn(v, h, generator=g) * h ** -0.5)


def run(variant, x):
    h = x["h"].detach().requires_grad_()
    w = x["w"].detach().requires_grad_()
    if variant == "fused":
        loss = pde.fused_linear_kd_loss(h, w, teacher_hidden=x["th"], teacher_weight=x["tw"])
    else:
        with torch.no_grad():
            t_logits = x["th"] @ x["tw"].t()
        s_logits = h @ w.t()
        if variant == "eager":
            loss = ref.eager_forward_kl(s_logits, t_logits)
        else:
            loss = pde.kd_loss(s_logits, t_logits)
    loss.backward()
    return h.grad, w.grad


def measure_memory(variant, n, hd, v):
    x = inputs(n, hd, v)
    print(harness.measure_peak_extra(lambda: run(variant, x)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--measure-memory", nargs=4, metavar=("VARIANT", "N", "H", "V"))
    a = p.parse_args(argv)
    if a.measure_memory:
        var, n, hd, v = a.measure_memory
        return measure_memory(var, int(n), int(hd), int(v))
    n, hd, v, reps = a.n, a.hidden, a.vocab, a.reps
    if a.smoke:
        n, hd, v, reps = 64, 32, 500, 1
    x = inputs(n, hd, v)
    times = {var: harness.median_time(lambda: run(var, x), reps) for var in VARIANTS}
    mem = {}
    if not a.smoke:
        mem = {var: harness.peak_memory_subprocess("benchmarks.bench_fused_linear_kd_loss",
                                                   [var, str(n), str(hd), str(v)])
               for var in VARIANTS}
    m = harness.machine()
    lines = [f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}. "
             f"N={n}, H={hd}, V={v}, fp32, forward_kl, fwd+bwd (grads of h and W); teacher = "
             "hidden + frozen lm_head. Median of "
             f"{reps}; peak = extra resident memory of one call.", "",
             "| variant | ms | vs eager | peak MiB | peak vs eager |", "|---|---|---|---|---|"]
    for var in VARIANTS:
        pk = mem.get(var)
        lines.append(f"| {var} | {harness.fmt_ms(times[var])} | {times['eager'] / times[var]:.2f}× | "
                     f"{harness.fmt_mb(pk) if pk is not None else '–'} | "
                     f"{pk / mem['eager']:.2f} |" if pk is not None else
                     f"| {var} | {harness.fmt_ms(times[var])} | {times['eager'] / times[var]:.2f}× | – | – |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not a.smoke:
        rows = [dict(variant=var, seconds=times[var], peak_bytes=mem.get(var), n=n, h=hd, v=v)
                for var in VARIANTS]
        harness.write_results("bench_fused_linear_kd_loss", rows, table, a.out)


if __name__ == "__main__":
    sys.exit(main())
