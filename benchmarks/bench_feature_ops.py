"""Feature-level ops on CPU: pydistill_ext.class_mean / attention_map / gradient_match_distance
vs the anchors' eager code (python/reference) vs torch.compile of that code, forward and
forward+backward, side by side in one process (median wall times).

    THP_MEM_ALLOC_ENABLE=1 python -m benchmarks.bench_feature_ops --threads 1 --reps 15
                                                       # results/bench_feature_ops.{json,md}
    python -m benchmarks.bench_feature_ops --smoke    # CI: tiny shapes, 1 rep, nothing written

Problems: class_mean on DM's shape (N=2560 embeddings of D=2048, 10 classes; eager = one masked
mean per class); attention_map at [256, 128, 16, 16], p=4 (eager =
F.normalize(f.abs().pow(p).sum(1).flatten(1))); gradient_match_distance 'ours' on ConvNet-3's
CIFAR-10 parameter shapes (eager = DC's per-tensor distance_wb loop). The class_mean compile
baseline is compiled with fullgraph=False: the masked selection has a data-dependent shape.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import harness

import pydistill_ext as pde  # noqa: E402
from reference import attention_map as ref_am  # noqa: E402
from reference import class_mean as ref_cm  # noqa: E402
from reference import gradient_match as ref_gm  # noqa: E402

VARIANTS = ("pydistill", "eager", "compile")
CONVNET3 = [(128, 3, 3, 3), (128,), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128,),
            (128, 128, 3, 3), (128,), (128,), (128,), (10, 2048), (10,)]


def problems(smoke: bool):
    g = torch.Generator().manual_seed(0)
    n, d, k = (64, 32, 4) if smoke else (2560, 2048, 10)
    feats = torch.randn(n, d, generator=g)
    labels = torch.arange(n) % k
    shape = (4, 8, 4, 4) if smoke else (256, 128, 16, 16)
    fmap = torch.randn(shape, generator=g)
    shapes = [(8, 3, 3, 3), (8,), (10, 32), (10,)] if smoke else CONVNET3
    ga = [torch.randn(s, generator=g) for s in shapes]
    gb = [torch.randn(s, generator=g) for s in shapes]
    return [
        dict(op="class_mean", shape=f"N={n} D={d} K={k}", inputs=[feats],
             fns=dict(pydistill=lambda x: pde.class_mean(x, labels, k),
                      eager=lambda x: ref_cm.eager_class_mean(x, labels, k)),
             fullgraph=False),
        dict(op="attention_map", shape="x".join(map(str, shape)) + " p=4", inputs=[fmap],
             fns=dict(pydistill=lambda x: pde.attention_map(x, p=4.0),
                      eager=lambda x: ref_am.eager_attention_map(x, 4.0)),
             fullgraph=True),
        dict(op="gradient_match_distance", shape=f"ConvNet-3 ({sum(t.numel() for t in ga)} params) ours",
             inputs=ga, fns=dict(pydistill=lambda *xs: pde.gradient_match_distance(list(xs), gb, "ours"),
                                 eager=lambda *xs: ref_gm.eager_match_loss(list(xs), gb, "ours")),
             fullgraph=True),
    ]


def step(fn, inputs, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    xs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*xs)
    # a fixed, non-trivial upstream gradient (not 1s: keeps the backward honest)
    out.backward(torch.full_like(out, 0.5) if out.dim() == 0 else torch.ones_like(out) * 0.5)
    return xs[0].grad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, nothing written")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="bench_feature_ops")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (on a 2-core machine shared with other jobs, 1 "
                        "avoids timing every parallel region at the scheduler's time slice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    reps = 1 if a.smoke else a.reps
    rows = []
    for prob in problems(a.smoke):
        torch._dynamo.reset()
        fns = dict(prob["fns"])
        fns["compile"] = torch.compile(fns["eager"], fullgraph=prob["fullgraph"], dynamic=False)
        for mode in ("fwd", "fwd+bwd"):
            backward = mode == "fwd+bwd"
            # same result first (a benchmark of a wrong kernel is worthless)
            ref_out = step(fns["eager"], prob["inputs"], backward)
            got = step(fns["pydistill"], prob["inputs"], backward)
            torch.testing.assert_close(got, ref_out, rtol=1e-4, atol=1e-5)
            res = {var: harness.median_time(lambda: step(fns[var], prob["inputs"], backward), reps,
                                            warmup=2) for var in VARIANTS}
            row = dict(op=prob["op"], shape=prob["shape"], mode=mode,
                       **{f"{k}_s": x for k, x in res.items()},
                       speedup_vs_eager=res["eager"] / res["pydistill"],
                       speedup_vs_compile=res["compile"] / res["pydistill"])
            rows.append(row)
            print(_line(row), flush=True)
    table = _table(rows)
    print(table)
    if not a.smoke:
        harness.write_results(a.name, rows, table, a.out)


def _line(r):
    return (f"{r['op']} {r['shape']} {r['mode']}: "
            + "  ".join(f"{k} {r[k + '_s'] * 1e3:.2f} ms" for k in VARIANTS)
            + f"  (x{r['speedup_vs_eager']:.2f} eager, x{r['speedup_vs_compile']:.2f} compile)")


def _table(rows):
    m = harness.machine()
    out = [f"Machine: {m['cpu']}, {m['threads']} thread(s) used (the machine is shared with other "
           f"jobs: noisy), torch {m['torch']}, at::vec {m['cpu_capability']}, THP_MEM_ALLOC_ENABLE "
           f"{m['THP_MEM_ALLOC_ENABLE'] or 'unset'} (unset: page faults of each fresh gradient "
           f"buffer, ~12 ms per 32 MB here, dominate fwd+bwd of every variant). float32, median ms. "
           f"Command: `python -m benchmarks.bench_feature_ops {' '.join(sys.argv[1:])}`.", "",
           "| op | problem | mode | pydistill ms | eager ms | compile ms | vs eager | vs compile |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['pydistill_s'] * 1e3:.2f} | "
                   f"{r['eager_s'] * 1e3:.2f} | {r['compile_s'] * 1e3:.2f} | "
                   f"{r['speedup_vs_eager']:.2f}× | {r['speedup_vs_compile']:.2f}× |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
