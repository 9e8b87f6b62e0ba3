"""BN-statistic matching on CPU, the statistics part of one layer (REFERENCE.md 4.1, 4.4):
loss = ||mu - mu_run||_2 + ||var - var_run||_2, forward and forward+backward to x, with
  pydistill  pde.bn_moments (one read of x forward; backward a_c + b_c x: one read, one write)
  eager      the anchors' hook: x.mean([0,2,3]) and x.permute(1,0,2,3).contiguous().view(C,-1).var(1)
  var_mean   torch.var_mean(x, [0,2,3], correction=0)
  compile    torch.compile(eager hook, fullgraph=True)
side by side in one process (median wall times, the variants taking turns rep by rep), at 1 and 2
threads, on ResNet-18 CIFAR shapes (batch 64): 64x64x32x32, 64x128x16x16, 64x256x8x8, 64x512x4x4,
plus 64x128x16x16 channels_last. Then a whole frozen BN layer (eval BatchNorm + statistics loss)
at 64x128x16x16: pde.frozen_bn_moments vs F.batch_norm + bn_moments / eager hook / compile.

    THP_MEM_ALLOC_ENABLE=1 python -m benchmarks.bench_bn_moments --reps 21
                                                      # results/bench_bn_moments.{json,md}
    python -m benchmarks.bench_bn_moments --smoke     # CI: tiny shapes, 1 rep, nothing written

Memory: bytes autograd saves for the backward beyond x itself (saved_tensors_hooks; the eager
hook saves its contiguous copy of x), and the peak RSS of one forward+backward above the
memory held before it, measured in a fresh process per variant (64x128x16x16).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks import harness

import pydistill_ext as pde  # noqa: E402
from reference import bn_moments as ref  # noqa: E402

VARIANTS = ("pydistill", "eager", "var_mean", "compile")
SHAPES = [(64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8), (64, 512, 4, 4)]
MAIN = (64, 128, 16, 16)


def fused_loss(x, running_mean, running_var):
    mean, var = pde.bn_moments(x)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def _fns():
    return dict(pydistill=fused_loss, eager=ref.hook_loss, var_mean=ref.var_mean_loss)


# A whole frozen BN layer: y = BN_eval(x) feeds the rest of the network (returned, so every
# variant materialises it; a fixed upstream gradient u stands in for the network's) and the
# layer's statistics loss is added.
LAYER_VARIANTS = ("frozen_fused", "bn+pydistill", "bn+eager", "bn+compile")


def _layer_fns(c, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)
    brm, brv = (torch.randn(c, generator=g) * 0.1).to(device), (torch.rand(c, generator=g) + 0.5).to(device)
    F = torch.nn.functional

    def fused(x, rm, rv, u):
        y, mean, var = pde.frozen_bn_moments(x, w, b, brm, brv, 1e-5)
        return y, torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)

    def bn_pd(x, rm, rv, u):
        y = F.batch_norm(x, brm, brv, w, b, training=False, eps=1e-5)
        return y, fused_loss(x, rm, rv)

    def bn_eager(x, rm, rv, u):
        y = F.batch_norm(x, brm, brv, w, b, training=False, eps=1e-5)
        return y, ref.hook_loss(x, rm, rv)

    return {"frozen_fused": fused, "bn+pydistill": bn_pd, "bn+eager": bn_eager,
            "bn+compile": torch.compile(bn_eager, fullgraph=True, dynamic=False)}


def _problem(shape, channels_last, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    rm, rv = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
    return x.to(device), rm.to(device), rv.to(device)


def cuda_peak_extra(fn, x, rm, rv) -> int:
    """CUDA: peak allocated bytes of one forward+backward above those allocated before it."""
    step(fn, x, rm, rv, True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step(fn, x, rm, rv, True)
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def step(fn, x, rm, rv, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(x, rm, rv)
    xs = x.detach().requires_grad_()
    fn(xs, rm, rv).backward()
    return xs.grad


def interleaved_medians(fns, reps, warmup, sync=lambda: None):
    """Median wall time of each fn, the variants taking turns rep by rep (on a shared, noisy
    machine a slow spell then hits every variant alike instead of one)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return ({k: statistics.median(t) for k, t in times.items()},
            {k: min(t) for k, t in times.items()})


def saved_extra_bytes(fn, x, rm, rv) -> int:
    """Bytes of the tensors autograd saves for the backward, excluding storages of x itself."""
    seen, total = set(), 0
    xs = x.detach().requires_grad_()
    base = xs.untyped_storage().data_ptr()

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        key = st.data_ptr()
        if key != base and key not in seen:
            seen.add(key)
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(xs, rm, rv)
    del loss
    return total


def _measure_memory(variant, channels_last):
    x, rm, rv = _problem(MAIN, channels_last)
    fn = _fns().get(variant)
    if fn is None:
        fn = torch.compile(ref.hook_loss, fullgraph=True, dynamic=False)
    print(harness.measure_peak_extra(lambda: step(fn, x, rm, rv, True)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, nothing written")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    p.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="bench_bn_moments")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (then --threads is "
                   "ignored, times are synchronised, peak memory is torch.cuda's)")
    p.add_argument("--measure-memory", nargs=2, metavar=("VARIANT", "CL"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure_memory:
        torch.set_num_threads(1)
        _measure_memory(a.measure_memory[0], a.measure_memory[1] == "1")
        return 0
    reps = 1 if a.smoke else a.reps
    cases = [((4, 8, 4, 4), False), ((4, 8, 4, 4), True)] if a.smoke else \
        [(s, False) for s in SHAPES] + [(MAIN, True)]
    cuda = a.device.startswith("cuda")
    threads = [1] if cuda else [int(t) for t in a.threads.split(",")]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    old_threads = torch.get_num_threads()
    rows = []
    for shape, cl in cases:
        x, rm, rv = _problem(shape, cl, device=a.device)
        torch._dynamo.reset()
        fns = _fns()
        fns["compile"] = torch.compile(ref.hook_loss, fullgraph=True, dynamic=False)
        saved = {v: saved_extra_bytes(fns[v], x, rm, rv) for v in VARIANTS}
        for nt in threads:
            if not cuda:
                torch.set_num_threads(nt)
            for mode in ("fwd", "fwd+bwd"):
                backward = mode == "fwd+bwd"
                # same result first (a benchmark of a wrong kernel is worthless)
                want = step(fns["eager"], x, rm, rv, backward)
                for v in VARIANTS:
                    torch.testing.assert_close(step(fns[v], x, rm, rv, backward), want,
                                               rtol=1e-4, atol=1e-6)
                res, best = interleaved_medians({v: (lambda v=v: step(fns[v], x, rm, rv, backward))
                                                 for v in VARIANTS}, reps, warmup=3, sync=sync)
                row = dict(shape="x".join(map(str, shape)) + (" CL" if cl else ""), threads=nt,
                           mode=mode, **{f"{k}_s": t for k, t in res.items()},
                           **{f"{k}_min_s": t for k, t in best.items()},
                           min_speedup_vs_eager=best["eager"] / best["pydistill"],
                           min_speedup_vs_compile=best["compile"] / best["pydistill"],
                           **{f"{k}_saved_bytes": b for k, b in saved.items()},
                           speedup_vs_eager=res["eager"] / res["pydistill"],
                           speedup_vs_var_mean=res["var_mean"] / res["pydistill"],
                           speedup_vs_compile=res["compile"] / res["pydistill"])
                rows.append(row)
                print(_line(row), flush=True)
    layer_rows = []
    if not cuda:  # frozen_bn_moments is CPU-only
        for shape, cl in cases[:1] + cases[-1:] if a.smoke else [(MAIN, False), (MAIN, True)]:
            x, rm, rv = _problem(shape, cl)
            u = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(
                memory_format=torch.channels_last if cl else torch.contiguous_format)
            torch._dynamo.reset()
            lf = _layer_fns(shape[1])
            for nt in threads:
                torch.set_num_threads(nt)
                res = {}
                for mode in ("fwd", "fwd+bwd"):
                    backward = mode == "fwd+bwd"

                    def lstep(f, backward=backward):
                        if not backward:
                            with torch.no_grad():
                                return f(x, rm, rv, u)[1]
                        xs = x.detach().requires_grad_()
                        y, loss = f(xs, rm, rv, u)
                        torch.autograd.backward((y, loss), (u, None))
                        return xs.grad
                    for v in LAYER_VARIANTS:
                        torch.testing.assert_close(lstep(lf[v]), lstep(lf["bn+eager"]),
                                                   rtol=1e-4, atol=1e-5)
                    res, _ = interleaved_medians({v: (lambda v=v: lstep(lf[v]))
                                                  for v in LAYER_VARIANTS}, reps, warmup=3)
                    row = dict(layer=True, shape="x".join(map(str, shape)) + (" CL" if cl else ""),
                               threads=nt, mode=mode, **{f"{k}_s": t for k, t in res.items()})
                    layer_rows.append(row)
                    print("layer " + row["shape"] + f" t={nt} {mode}: " + "  ".join(
                        f"{k} {res[k] * 1e3:.3f} ms" for k in LAYER_VARIANTS), flush=True)
    torch.set_num_threads(old_threads)
    rows += layer_rows
    peak = {}
    if cuda and not a.no_memory:
        for cl in (False, True):
            x, rm, rv = _problem(MAIN, cl, device=a.device)
            fns = _fns()
            fns["compile"] = torch.compile(ref.hook_loss, fullgraph=True, dynamic=False)
            for v in VARIANTS:
                peak[(v, cl)] = cuda_peak_extra(fns[v], x, rm, rv)
    elif not a.smoke and not a.no_memory:
        for cl in (False, True):
            for v in VARIANTS:
                peak[(v, cl)] = harness.peak_memory_subprocess(
                    "benchmarks.bench_bn_moments", [v, "1" if cl else "0"])
                print(f"peak RSS above baseline, {v} {'CL' if cl else 'NCHW'}: "
                      f"{peak[(v, cl)] / 2**20:.1f} MiB", flush=True)
    table = _table(rows, peak)
    print(table)
    if not a.smoke:
        for (v, cl), b in peak.items():
            rows.append(dict(shape="x".join(map(str, MAIN)) + (" CL" if cl else ""), variant=v,
                             peak_rss_extra_bytes=b))
        harness.write_results(a.name, rows, table, a.out)
    return 0


def _line(r):
    return (f"{r['shape']} t={r['threads']} {r['mode']}: "
            + "  ".join(f"{k} {r[k + '_s'] * 1e3:.3f} ms" for k in VARIANTS)
            + f"  (x{r['speedup_vs_eager']:.2f} eager, x{r['speedup_vs_var_mean']:.2f} var_mean, "
              f"x{r['speedup_vs_compile']:.2f} compile)")


def _table(rows, peak):
    m = harness.machine()
    dev = m.get("gpu", "") + " (CUDA); CPU " if "gpu" in m and "cuda" in " ".join(sys.argv) else ""
    out = [f"Machine: {dev}{m['cpu']} (`lscpu` model name), torch {m['torch']}, at::vec "
           f"{m['cpu_capability']}, THP_MEM_ALLOC_ENABLE {m['THP_MEM_ALLOC_ENABLE'] or 'unset'}; "
           f"2 cores shared with other jobs (load average at the end "
           f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}: noisy; with a load above 2 a "
           f"2-thread parallel region waits for a scheduler slice, so those rows time the "
           f"scheduler). float32, median ms (and the ratios of the minima) of loss = "
           f"||mu - mu_run|| + ||var - var_run|| (fwd) and its backward to x (fwd+bwd). "
           f"Command: `python -m benchmarks.bench_bn_moments {' '.join(sys.argv[1:])}`.", "",
           "| shape | threads | mode | pydistill ms | eager hook ms | var_mean ms | compile ms | "
           "vs eager | vs var_mean | vs compile | min: vs eager | min: vs compile |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("layer"):
            continue
        out.append(f"| {r['shape']} | {r['threads']} | {r['mode']} | {r['pydistill_s'] * 1e3:.3f} | "
                   f"{r['eager_s'] * 1e3:.3f} | {r['var_mean_s'] * 1e3:.3f} | "
                   f"{r['compile_s'] * 1e3:.3f} | {r['speedup_vs_eager']:.2f}× | "
                   f"{r['speedup_vs_var_mean']:.2f}× | {r['speedup_vs_compile']:.2f}× | "
                   f"{r['min_speedup_vs_eager']:.2f}× | {r['min_speedup_vs_compile']:.2f}× |")
    layer = [r for r in rows if r.get("layer")]
    if layer:
        out += ["", "A whole frozen BN layer: y = BN_eval(x) returned (materialised) with the "
                "statistics loss; backward with grad_y = u (a fixed stand-in for the rest of the "
                "network's gradient) and 1 for the loss. frozen_fused = "
                "pde.frozen_bn_moments; bn+X = F.batch_norm(eval) plus the statistics by X. "
                "Median ms.", "",
                "| shape | threads | mode | " + " | ".join(LAYER_VARIANTS) +
                " | fused vs bn+pydistill | fused vs bn+eager | fused vs bn+compile |",
                "|---|---|---|" + "---|" * (len(LAYER_VARIANTS) + 3)]
        for r in layer:
            f = r["frozen_fused_s"]
            out.append(f"| {r['shape']} | {r['threads']} | {r['mode']} | " + " | ".join(
                f"{r[v + '_s'] * 1e3:.3f}" for v in LAYER_VARIANTS) + " | " + " | ".join(
                f"{r[v + '_s'] / f:.2f}×" for v in LAYER_VARIANTS[1:]) + " |")
    out += ["", "Bytes saved by autograd for the backward beyond x itself (one forward):", "",
            "| shape | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    done = set()
    for r in rows:
        if r.get("layer") or r["shape"] in done:
            continue
        done.add(r["shape"])
        out.append(f"| {r['shape']} | " + " | ".join(
            f"{r[v + '_saved_bytes'] / 2**20:.2f} MiB" for v in VARIANTS) + " |")
    if peak:
        out += ["", f"Peak memory of one forward+backward above the memory held before it "
                f"({'x'.join(map(str, MAIN))}; CPU: RSS in a fresh process per variant, 1 thread; "
                f"CUDA: torch.cuda.max_memory_allocated; x is "
                f"{MAIN[0] * MAIN[1] * MAIN[2] * MAIN[3] * 4 / 2**20:.0f} MiB, its gradient as much):", "",
                "| layout | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
        for cl in (False, True):
            out.append(f"| {'channels_last' if cl else 'NCHW'} | " + " | ".join(
                f"{peak[(v, cl)] / 2**20:.1f} MiB" for v in VARIANTS) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
