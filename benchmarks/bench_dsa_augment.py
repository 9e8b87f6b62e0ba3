"""DSA augmentation on CPU: the fused op (pde.dsa_augment / dsa_apply) vs (a) a per-sample
eager loop (each image transformed alone by the pure-torch path, as per-image augmentation
pipelines do; the issue's >= 5x target is against this), (b) the batched pure-torch path
(dsa_apply(..., fused=False)), (c) torch.compile of (b). Median wall times side by side in one
process, at 1 thread and at all threads.

    THP_MEM_ALLOC_ENABLE=1 python -m benchmarks.bench_dsa_augment --reps 9
                                                    # results/bench_dsa_augment.{json,md}
    python -m benchmarks.bench_dsa_augment --smoke  # CI: tiny shapes, 1 rep, nothing written
    python -m benchmarks.bench_dsa_augment --device cuda --no-compile --print-only
                                                    # GPU session (benchmarks/gpu_check.sh)

Problems: a 256-image batch, CIFAR (3x32x32, strategy color_crop_cutout_flip_scale_rotate) and
MNIST (1x28x28, color_crop_cutout_scale_rotate: no flip for digits, as the methods do), with
per-sample parameters (per_sample=True: each image its own transform, which is what a per-image
pipeline gives). mode "all" applies every op (two bilinear resamplings: the fused op's worst
case, 16 taps per pixel); mode "single" applies one group per call: its time is the mean over
one transform of each group. fwd: the augmented batch; fwd+bwd: plus the gradient w.r.t. the
batch (upstream gradient 0.5).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import harness

import pydistill_ext  # noqa: F401,E402  (loads the kernels)
from pydistill_ext.augment import (DEFAULT_STRATEGY, DIGIT_STRATEGY, DSA_STRATEGIES,  # noqa: E402
                                   dsa_apply, dsa_params)
from reference import dsa_augment as ref  # noqa: E402

VARIANTS = ("fused", "loop", "batched", "compile")


def transforms(shape, strategy, mode):
    """mode 'all': one transform; 'single': one transform of each group of the strategy (the
    first seeds that pick it)."""
    if mode == "all":
        return [dsa_params(0, shape, strategy=strategy, mode="all", per_sample=True)]
    groups = strategy.split("_")
    out, seed = {}, 0
    while len(out) < len(groups):
        t = dsa_params(seed, shape, strategy=strategy, mode="single", per_sample=True)
        out.setdefault(t.groups[0], t)
        seed += 1
    return [out[g] for g in groups if g in DSA_STRATEGIES]


def problems(smoke: bool, device: str = "cpu"):
    n = 4 if smoke else 256
    g = torch.Generator().manual_seed(0)
    out = []
    for name, shape, strategy in (("CIFAR", (n, 3, 32, 32), DEFAULT_STRATEGY),
                                  ("MNIST", (n, 1, 28, 28), DIGIT_STRATEGY)):
        x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
        for mode in ("all", "single"):
            out.append(dict(data=name, shape="x".join(map(str, shape)), strategy=strategy,
                            mode=mode, x=x, ts=transforms(shape, strategy, mode)))
    return out


def _batched(x, t):
    return dsa_apply(x, t, fused=False)


def make_fns(ts, with_compile=True):
    fns = dict(fused=[lambda x, t=t: dsa_apply(x, t) for t in ts],
               loop=[lambda x, t=t: ref.per_sample_eager(x, t) for t in ts],
               batched=[lambda x, t=t: _batched(x, t) for t in ts])
    if not with_compile:
        return fns
    # one graph per transform (its parameters are constants of the graph) and grad mode: more
    # than dynamo's default recompile limit of 8 for mode "single"
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(_batched, fullgraph=True, dynamic=False)
    fns["compile"] = [lambda x, t=t: compiled(x, t) for t in ts]
    return fns


def step(fns, x, backward):
    """All transforms of the problem once; returns the last output / gradient."""
    res = None
    for fn in fns:
        if not backward:
            with torch.no_grad():
                res = fn(x)
        else:
            a = x.detach().requires_grad_()
            fn(a).backward(torch.full_like(x, 0.5))
            res = a.grad
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, nothing written")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="bench_dsa_augment")
    p.add_argument("--threads", type=int, nargs="*", default=None,
                   help="thread counts to run (default: 1 and all, os.cpu_count())")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--print-only", action="store_true", help="print the table, write nothing")
    a = p.parse_args(argv)
    reps = 1 if a.smoke else a.reps
    threads = a.threads or sorted({1, os.cpu_count() or 1})
    if a.smoke or a.device == "cuda":
        threads = threads[:1]
    sync = torch.cuda.synchronize if a.device == "cuda" else None
    variants = tuple(v for v in VARIANTS if not (a.no_compile and v == "compile"))
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for prob in problems(a.smoke, a.device):
            torch._dynamo.reset()
            fns = make_fns(prob["ts"], with_compile="compile" in variants)
            k = len(prob["ts"])
            for mode in ("fwd", "fwd+bwd"):
                backward = mode == "fwd+bwd"
                # same result first (a benchmark of a wrong kernel is worthless)
                want = step(fns["batched"], prob["x"], backward)
                for var in (v for v in variants if v != "batched"):
                    torch.testing.assert_close(step(fns[var], prob["x"], backward), want,
                                               rtol=1e-4, atol=1e-4)
                res = {var: harness.median_time(lambda: step(fns[var], prob["x"], backward),
                                                reps, warmup=1, sync=sync) / k
                       for var in variants}
                res.setdefault("compile", float("nan"))
                row = dict(device=a.device, threads=nt, data=prob["data"], shape=prob["shape"],
                           strategy=prob["strategy"], aug_mode=prob["mode"], transforms=k,
                           mode=mode, **{f"{v}_s": res[v] for v in VARIANTS},
                           speedup_vs_loop=res["loop"] / res["fused"],
                           speedup_vs_batched=res["batched"] / res["fused"],
                           speedup_vs_compile=res["compile"] / res["fused"])
                rows.append(row)
                print(_line(row), flush=True)
                if not (a.smoke or a.print_only):  # after every row: a cut-short run keeps them
                    harness.write_results(a.name, rows, _table(rows), a.out)
    print(_table(rows))


def _line(r):
    return (f"[{r['threads']} thr] {r['data']} {r['shape']} {r['aug_mode']} {r['mode']}: "
            + "  ".join(f"{k} {r[k + '_s'] * 1e3:.2f} ms" for k in VARIANTS)
            + f"  (x{r['speedup_vs_loop']:.1f} loop, x{r['speedup_vs_batched']:.2f} batched, "
              f"x{r['speedup_vs_compile']:.2f} compile)")


def _table(rows):
    m = harness.machine()
    gpu = f", GPU {m['gpu']} (the rows with device cuda)" if "gpu" in m else ""
    out = [f"Machine: {m['cpu']}, {os.cpu_count()} logical CPUs{gpu} (shared with other jobs: "
           f"noisy), torch {m['torch']}, at::vec {m['cpu_capability']}, THP_MEM_ALLOC_ENABLE "
           f"{m['THP_MEM_ALLOC_ENABLE'] or 'unset'}. float32, per_sample=True, median ms per "
           f"call (mode single: mean over one transform of each group). fused = the native op; "
           f"loop = each image alone through the pure-torch path; batched = the pure-torch path "
           f"on the batch; compile = torch.compile(fullgraph=True) of batched. "
           f"Command: `python -m benchmarks.bench_dsa_augment {' '.join(sys.argv[1:])}`.", "",
           "| device | threads | data | batch | DSA mode | pass | fused ms | loop ms | batched ms | "
           "compile ms | vs loop | vs batched | vs compile |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['device']} | {r['threads']} | {r['data']} | {r['shape']} | {r['aug_mode']} | "
                   f"{r['mode']} | {r['fused_s'] * 1e3:.2f} | {r['loop_s'] * 1e3:.2f} | "
                   f"{r['batched_s'] * 1e3:.2f} | {r['compile_s'] * 1e3:.2f} | "
                   f"{r['speedup_vs_loop']:.1f}× | {r['speedup_vs_batched']:.2f}× | "
                   f"{r['speedup_vs_compile']:.2f}× |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
