"""KD divergence on CPU: pydistill_ext.kd_loss vs eager PyTorch vs torch.compile of the eager
composite, forward and forward+backward, side by side in one process (median times), peak
extra memory in a fresh process per variant.

    python -m benchmarks.bench_kd_loss                      # the README table
    python -m benchmarks.bench_kd_loss --smoke              # CI: tiny shape, 1 rep
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import harness

import pydistill_ext as pde  # noqa: E402
from reference import kd_loss as ref  # noqa: E402

SHAPES = [(1024, 32000), (4096, 32000), (512, 128256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("pydistill", "eager", "compile")


def make_fn(variant: str, divergence: str, beta: float = 0.5):
    eager = ref.eager_composite(divergence, beta)
    if variant == "pydistill":
        return lambda s, t: pde.kd_loss(s, t, divergence=divergence, beta=beta)
    if variant == "eager":
        return eager
    if variant == "compile":
        return torch.compile(eager, fullgraph=True, dynamic=False)
    raise ValueError(variant)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 2).to(dtype)
    t = (torch.randn(shape, generator=g) * 2).to(dtype)
    return s, t


def step(fn, s, t, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(s, t)
    x = s.detach().requires_grad_()
    fn(x, t).backward()
    return x.grad


def measure_memory(variant, n, v, dtype_name, mode, divergence):
    """Child process: peak RSS above the baseline (inputs allocated, warm-up done)."""
    s, t = inputs((n, v), DTYPES[dtype_name])
    fn = make_fn(variant, divergence)
    print(harness.measure_peak_extra(lambda: step(fn, s, t, mode == "fwd+bwd")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape, one rep (CI)")
    p.add_argument("--divergences", nargs="+", default=["forward_kl"])
    p.add_argument("--shapes", nargs="+", default=None, help="NxV ...")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="bench_kd_loss")
    p.add_argument("--measure-memory", nargs=6, metavar=("VARIANT", "N", "V", "DTYPE", "MODE", "DIV"))
    a = p.parse_args(argv)
    if a.measure_memory:
        var, n, v, dt, mode, div = a.measure_memory
        return measure_memory(var, int(n), int(v), dt, mode, div)

    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    reps = a.reps
    if a.smoke:
        shapes, reps, a.dtypes = [(64, 1000)], 1, ["fp32"]
    rows = []
    for div in a.divergences:
        for (n, v) in shapes:
            for dt in a.dtypes:
                torch._dynamo.reset()  # fresh compile cache per configuration
                s, t = inputs((n, v), DTYPES[dt])
                for mode in ("fwd", "fwd+bwd"):
                    backward = mode == "fwd+bwd"
                    res = {}
                    for var in VARIANTS:
                        fn = make_fn(var, div)
                        # eager is slow at these sizes: fewer reps, still a median
                        r = reps if var != "eager" else max(1, min(reps, 3))
                        res[var] = harness.median_time(lambda: step(fn, s, t, backward), r, warmup=1)
                    mem = {}
                    if not a.no_memory and not a.smoke:
                        for var in VARIANTS:
                            mem[var] = harness.peak_memory_subprocess(
                                "benchmarks.bench_kd_loss", [var, str(n), str(v), dt, mode, div])
                    row = dict(divergence=div, n=n, v=v, dtype=dt, mode=mode,
                               **{f"{k}_s": x for k, x in res.items()},
                               speedup_vs_eager=res["eager"] / res["pydistill"],
                               speedup_vs_compile=res["compile"] / res["pydistill"],
                               **{f"{k}_peak_bytes": x for k, x in mem.items()},
                               nv_tensor_bytes=n * v * s.element_size())
                    rows.append(row)
                    print(_line(row), flush=True)
    table = _table(rows)
    print(table)
    if not a.smoke:
        harness.write_results(a.name, rows, table, a.out)


def _line(r):
    return (f"{r['divergence']} {r['n']}x{r['v']} {r['dtype']} {r['mode']}: "
            + "  ".join(f"{k} {harness.fmt_ms(r[k + '_s'])} ms" for k in VARIANTS)
            + f"  (x{r['speedup_vs_eager']:.2f} eager, x{r['speedup_vs_compile']:.2f} compile)")


def _table(rows):
    m = harness.machine()
    thp = "set (huge pages for every torch tensor)" if m["THP_MEM_ALLOC_ENABLE"] else "unset"
    out = [f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
           f"at::vec {m['cpu_capability']}, THP_MEM_ALLOC_ENABLE {thp}. Median ms; peak = extra resident memory of one "
           "call, in units of one [N, V] input tensor.", "",
           "| divergence | N×V | dtype | mode | pydistill ms | eager ms | compile ms | vs eager | vs compile | peak pydistill | peak eager | peak compile |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = r["nv_tensor_bytes"]
        peaks = [f"{r[k + '_peak_bytes'] / unit:.2f}" if k + "_peak_bytes" in r else "–" for k in VARIANTS]
        out.append(f"| {r['divergence']} | {r['n']}×{r['v']} | {r['dtype']} | {r['mode']} | "
                   f"{harness.fmt_ms(r['pydistill_s'])} | {harness.fmt_ms(r['eager_s'])} | "
                   f"{harness.fmt_ms(r['compile_s'])} | {r['speedup_vs_eager']:.2f}× | "
                   f"{r['speedup_vs_compile']:.2f}× | " + " | ".join(peaks) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
