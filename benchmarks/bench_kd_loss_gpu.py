"""GPU benchmark of kd_loss (forward_kl, jsd): pydistill_ext's CUDA and Triton kernels against
the eager composite, torch.compile of the eager composite, and Liger-Kernel when installed.

    python benchmarks/bench_kd_loss_gpu.py --out results.json [--budget-s 240] [--no-compile]

Cases (REFERENCE.md 2.1 / 2.3):
  * 8192 x 128256 (Llama 3 vocabulary), bf16 and fp32, forward_kl and jsd (beta 0.5);
  * Liger's published shapes, fp32: forward_kl ("kl_div", batchmean) 16384 x {4096, 32768,
    131072}; jsd 8192 x {8192, 16384, 131072}.
Modes: "fwd" (loss only, under no_grad) and "fwd+bwd" (loss, then backward to the student
logits; the teacher needs no gradient).

Per variant: median time over warm runs (CUDA events, do_bench style: the number of repeats
is fitted to a per-measurement time budget), peak memory beyond the inputs
(max_memory_allocated - memory_allocated before the call), and effective bandwidth =
nominal bytes / time, nominal bytes = units * N * V * element size.

Bytes model (units of N * V elements; our schedule, REFERENCE.md 2.3). The forward returns
per-row statistics (row maxima, log normalisers, loss, family sums: 32 B per row, negligible)
and the backward given them makes one pass per row:
  fwd      2 units: read s, t once. forward_kl is exactly that; jsd (like skew/tvd) has a
           second pass over the row pair for its cross-column sums, served by the kernel's
           shared-memory row cache where the pair fits (V <= ~56K bf16 / ~28K fp32) and by
           L2 / DRAM otherwise, so its DRAM traffic lies between 2 and 4 units.
  fwd+bwd  5 units: the forward's 2, then the backward reads s, t once and writes the student
           gradient (2 + 1); jsd: between 5 and 7 for the same reason.
TB/s and "of peak" use the lower (compulsory) counts for every variant, so they compare the
variants' speed on one scale; the "TB/s 2-pass" column re-states jsd with the upper counts
(4 / 7: pass 2 re-read from DRAM), an upper bound on the bandwidth our jsd kernels really
draw. Before the statistics (backward = recompute: 2 reads for the max / normaliser pass,
2 for the gradient pass, 1 write) forward_kl fwd+bwd moved 7 units; the "cuda-recompute" and
"triton-recompute" variants time that path (backward op with stats=None) on the Llama-3
cases. The fraction of the card's peak uses 3.35 TB/s (H100 SXM), 2.0 (H100 PCIe), 3.9
(H100 NVL), 4.8 (H200); a device-to-device copy is also timed as the measured ceiling.

Order (the run stops starting new measurements when --budget-s is spent): all variants but
torch.compile on every case; then, on the Llama-3 fwd+bwd cases, the recompute backward
(cuda-recompute, triton-recompute); then tuning variants of the CUDA kernels on the Llama-3
cases (cuda-t512: 512 threads per row for re-reading launches; cuda-nocache: no
shared-memory row cache; cuda-1pass1024: 1024 threads for single-pass launches, which the
backward with statistics is; see pick_threads in csrc/cuda/kd_loss_kernel.cu); then
torch.compile on the Llama-3 cases.

Liger is called as a user would: log_softmax of both logits (in their dtype) inside the timed
region, then LigerKLDIVLoss(reduction="batchmean", log_target=True)(log p_s, log p_t) or
LigerJSD(beta)(log p_s, log p_t). Every variant failing (missing package, out of memory,
error) is recorded and the run goes on. Results: a Markdown table on stdout and next to the
JSON (same name, .md).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, os.path.join(HERE, ".."))

from reference import kd_loss as ref  # noqa: E402

# compulsory traffic of our schedule (module docstring): the forward reads s, t; the backward
# with the forward's statistics reads s, t and writes the student gradient
UNITS = {("forward_kl", "fwd"): 2, ("forward_kl", "fwd+bwd"): 5,
         ("jsd", "fwd"): 2, ("jsd", "fwd+bwd"): 5}
# jsd when its second forward pass re-reads the row pair from DRAM (row pair beyond the
# shared-memory cache and L2): the upper end of what our jsd kernels move
UNITS_2PASS = {("jsd", "fwd"): 4, ("jsd", "fwd+bwd"): 7}
# the backward without statistics (recompute): + 2 reads for the max / normaliser pass
UNITS_RECOMPUTE_BWD = 2
BETA = 0.5
MODEL = ("nominal bytes = units x N x V x elem, units = compulsory traffic of our schedule: "
         "fwd 2 (read s, t); fwd+bwd 5 (fwd 2 + backward from the forward's per-row "
         "statistics: read s, t, write grad_s); jsd's second forward pass is served by the "
         "shared-memory row cache where the row pair fits, so its traffic lies between these "
         "and the 2-pass counts (fwd 4, fwd+bwd 7) of the 'TB/s 2-pass' column; the "
         "recompute backward (stats=None, *-recompute variants) moves 2 units more")


def peak_bandwidth(name: str):
    n = name.upper()
    if "H200" in n:
        return 4.8e12
    if "H100" in n:
        if "PCIE" in n:
            return 2.0e12
        if "NVL" in n:
            return 3.9e12
        return 3.35e12
    if "B200" in n:
        return 8.0e12
    if "A100" in n:
        return 2.0e12 if "80GB" in n else 1.555e12
    return None


# ---------------------------------------------------------------- variants

def _liger_losses():
    """(kl_div(log p_s, log p_t), jsd(log p_s, log p_t, beta)) from Liger: the nn.Module API
    (liger_kernel.transformers), or its autograd Functions (liger_kernel.ops) when the
    transformers package cannot be imported (it may need HF transformers)."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return kl, lambda ls, lt, beta: LigerJSD(beta=beta)(ls, lt)
    except Exception:  # noqa: BLE001
        from liger_kernel.ops.jsd import LigerJSDFunction
        from liger_kernel.ops.kl_div import LigerKLDivLossFunction
        return ((lambda ls, lt: LigerKLDivLossFunction.apply(ls, lt, "batchmean", True)),
                (lambda ls, lt, beta: LigerJSDFunction.apply(ls, lt, None, beta, -100)))


def _liger():
    try:
        _liger_losses()
        import liger_kernel
        version = getattr(liger_kernel, "__version__", None)
        if version is None:
            from importlib.metadata import version as _v
            version = _v("liger-kernel")
        return str(version)
    except Exception as exc:  # noqa: BLE001
        return exc


# Tuning variants of the CUDA kernels (knobs read by csrc/cuda/kd_loss_kernel.cu at each call)
CUDA_TUNING = {
    "cuda-t512": {"PYDISTILL_CUDA_KD_THREADS": "512"},
    "cuda-nocache": {"PYDISTILL_CUDA_KD_CACHE": "0"},
    "cuda-1pass1024": {"PYDISTILL_CUDA_KD_THREADS_1": "1024"},
}


def _recompute_variant(backend, divergence):
    """batchmean kd_loss whose backward is the backward op with stats=None (the recompute path,
    as before the forward returned its statistics): forward op, then backward op."""
    if backend == "cuda":
        fwd, bwd = torch.ops.pydistill_ext.kd_loss_forward, torch.ops.pydistill_ext.kd_loss_backward
    else:
        from pydistill_ext.triton import kd_loss as tkd
        fwd, bwd = tkd.kd_loss_forward_triton, tkd.kd_loss_backward_triton

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, t):
            rows = fwd(s, t, None, divergence, BETA, 1.0, False, False)[0]
            ctx.save_for_backward(s, t)
            return (rows.sum() / rows.numel()).to(s.dtype)

        @staticmethod
        def backward(ctx, g):
            s, t = ctx.saved_tensors
            n = s.numel() // s.shape[-1]
            grad_rows = (g.float() / n).expand(n).contiguous()
            gs, _ = bwd(grad_rows, s, t, None, None, divergence, BETA, 1.0, True, False)
            return gs, None

    return Recompute.apply


def make_variant(name, divergence, compiled_cache):
    """A callable (student, teacher) -> scalar loss, or raises."""
    import torch.nn.functional as F
    if name in ("cuda-recompute", "triton-recompute"):
        return _recompute_variant(name.split("-")[0], divergence)
    if name in CUDA_TUNING:
        name = "cuda"
    if name in ("cuda", "triton"):
        import pydistill_ext as pde

        def fn(s, t):
            return pde.kd_loss(s, t, divergence=divergence, beta=BETA, _backend=name)
        return fn
    if name == "eager":
        return ref.eager_composite(divergence, beta=BETA)
    if name == "compile":
        key = divergence
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(ref.eager_composite(divergence, beta=BETA))
        return compiled_cache[key]
    if name == "liger":
        kl, jsd = _liger_losses()
        if divergence == "forward_kl":
            def fn(s, t):
                return kl(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1))
        else:
            def fn(s, t):
                return jsd(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), BETA)
        return fn
    raise ValueError(name)


# ---------------------------------------------------------------- timing

def time_fn(step, budget_ms=400.0, min_reps=3, max_reps=50, before=None):
    """Median ms of step() over warm repeats (CUDA events); step() is warmed up once first."""
    if before:
        before()
    step()
    torch.cuda.synchronize()
    # estimate
    t0 = time.perf_counter()
    if before:
        before()
    step()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    reps = int(max(min_reps, min(max_reps, budget_ms / max(est, 1e-3))))
    times = []
    for _ in range(reps):
        if before:
            before()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], reps


def peak_extra(step, before=None):
    if before:
        before()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def copy_bandwidth():
    n = 1 << 30  # 1 Gi float32 = 4.3 GB
    try:
        a = torch.empty(n, device="cuda")
        b = torch.empty_like(a)
        a.uniform_()
        ms, _ = time_fn(lambda: b.copy_(a), budget_ms=200)
        del a, b
        return 2 * 4 * n / (ms * 1e-3)
    except torch.cuda.OutOfMemoryError:
        return None


# ---------------------------------------------------------------- main

def run_case(case, variants, results, deadline, peak_bw, compiled_cache, eager_values):
    N, V, dtype, divergence, mode, label = (case[k] for k in
                                             ("N", "V", "dtype", "divergence", "mode", "label"))
    dt = getattr(torch, dtype)
    elem = torch.finfo(dt).bits // 8
    nominal = UNITS[(divergence, mode)] * N * V * elem
    upper = UNITS_2PASS.get((divergence, mode))
    upper = upper * N * V * elem if upper else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        s = (torch.randn(N, V, device="cuda", generator=gen, dtype=torch.float32) * 2).to(dt)
        t = (torch.randn(N, V, device="cuda", generator=gen, dtype=torch.float32) * 2).to(dt)
    except torch.cuda.OutOfMemoryError:
        for v in variants:
            results.append(dict(case, variant=v, status="oom (inputs)"))
        return
    key = tuple(case[k] for k in ("N", "V", "dtype", "divergence", "mode"))
    values = {}
    start_len = len(results)
    for v in variants:
        row = dict(case, variant=v, nominal_gb=nominal / 1e9,
                   units=UNITS[(divergence, mode)],
                   units_2pass=UNITS_2PASS.get((divergence, mode)))
        if time.time() > deadline:
            row["status"] = "skipped (time budget)"
            results.append(row)
            continue
        saved_env = {k: os.environ.get(k) for k in CUDA_TUNING.get(v, {})}
        os.environ.update(CUDA_TUNING.get(v, {}))
        try:
            fn = make_variant(v, divergence, compiled_cache)
            if mode == "fwd":
                def step():
                    with torch.no_grad():
                        return fn(s, t)
                before = None
            else:
                s.requires_grad_(True)

                def step():
                    fn(s, t).backward()

                def before():
                    s.grad = None
            with torch.no_grad():
                val = fn(s, t)
            values[v] = float(val)
            ms, reps = time_fn(step, before=before)
            row.update(ms=ms, reps=reps, peak_extra_gb=peak_extra(step, before),
                       tb_s=nominal / (ms * 1e-3) / 1e12)
            if upper:
                row["tb_s_2pass"] = upper / (ms * 1e-3) / 1e12
            if peak_bw:
                row["frac_peak"] = nominal / (ms * 1e-3) / peak_bw
            row["loss"] = values[v]
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as exc:  # noqa: BLE001
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            traceback.print_exc(limit=2)
        finally:
            for k, old in saved_env.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old
            s.grad = None
            s.requires_grad_(False)
            gc.collect()
            torch.cuda.empty_cache()
        results.append(row)
        print(fmt_row(row), flush=True)
    if "eager" in values:
        eager_values[key] = values["eager"]
    base = eager_values.get(key)
    if base is not None:
        for row in results[start_len:]:
            if "loss" in row:
                row["rel_diff_vs_eager"] = abs(row["loss"] - base) / max(abs(base), 1e-30)
    del s, t
    gc.collect()
    torch.cuda.empty_cache()


def fmt_row(r):
    def f(k, spec):
        return format(r[k], spec) if k in r and r[k] is not None else "-"
    return (f"| {r['label']} | {r['N']}x{r['V']} | {r['dtype']} | {r['divergence']} | {r['mode']} | "
            f"{r['variant']} | {f('ms', '.3f')} | {f('tb_s', '.2f')} | {f('tb_s_2pass', '.2f')} | "
            f"{f('frac_peak', '.0%')} | {f('peak_extra_gb', '.2f')} | {r.get('status', '')} |")


HEADER = ("| case | shape | dtype | divergence | mode | variant | ms (median) | TB/s (nominal) | "
          "TB/s 2-pass | of peak | peak extra GB | status |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 240)))
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kd_loss_gpu: needs a CUDA device")
    start = time.time()
    deadline = start + args.budget_s
    try:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    except Exception:  # noqa: BLE001
        pass

    dev = torch.cuda.get_device_properties(0)
    peak_bw = peak_bandwidth(dev.name)
    meta = dict(device=dev.name, sm_count=dev.multi_processor_count,
                mem_gb=dev.total_memory / 1e9, torch=torch.__version__,
                cuda=torch.version.cuda, peak_bw_tb_s=peak_bw / 1e12 if peak_bw else None,
                units=({f"{k[0]}/{k[1]}": u for k, u in UNITS.items()}),
                units_2pass=({f"{k[0]}/{k[1]}": u for k, u in UNITS_2PASS.items()}),
                bytes_model=MODEL,
                cuda_backend_env=os.environ.get("PYDISTILL_CUDA_BACKEND"))
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        meta["triton"] = f"unavailable: {exc}"
    lg = _liger()
    meta["liger"] = lg if isinstance(lg, str) else f"unavailable: {lg}"
    try:
        import pydistill_ext as pde  # noqa: F401
        from pydistill_ext._lib import has_kernel
        meta["pydistill_cuda_kernels"] = has_kernel("kd_loss_forward", "CUDA")
    except Exception as exc:  # noqa: BLE001
        meta["pydistill_cuda_kernels"] = f"import failed: {exc}"
    cbw = copy_bandwidth()
    meta["copy_tb_s"] = cbw / 1e12 if cbw else None
    print(f"device {dev.name}: peak {meta['peak_bw_tb_s']} TB/s, measured copy "
          f"{meta['copy_tb_s'] and round(meta['copy_tb_s'], 2)} TB/s; liger {meta['liger']}; "
          f"triton {meta['triton']}", flush=True)

    variants = ["cuda", "triton", "eager"]
    if isinstance(lg, str):
        variants.append("liger")

    cases = []
    if args.quick:
        big = [(256, 4096)]
        liger_kl = [(512, 4096)]
        liger_jsd = [(256, 8192)]
    else:
        big = [(8192, 128256)]
        liger_kl = [(16384, 4096), (16384, 32768), (16384, 131072)]
        liger_jsd = [(8192, 8192), (8192, 16384), (8192, 131072)]
    # priority order: the Llama-3 cases first (all variants), then Liger's shapes
    for (N, V) in big:
        for dtype in ("bfloat16", "float32"):
            for div in ("forward_kl", "jsd"):
                for mode in ("fwd", "fwd+bwd"):
                    cases.append((dict(label="llama3", N=N, V=V, dtype=dtype, divergence=div,
                                       mode=mode), variants))
    for (N, V) in liger_kl:
        for mode in ("fwd", "fwd+bwd"):
            cases.append((dict(label="liger-kl_div", N=N, V=V, dtype="float32",
                               divergence="forward_kl", mode=mode), variants))
    for (N, V) in liger_jsd:
        for mode in ("fwd", "fwd+bwd"):
            cases.append((dict(label="liger-jsd", N=N, V=V, dtype="float32", divergence="jsd",
                               mode=mode), variants))

    llama = [c for c, _ in cases if c["label"] == "llama3"]
    # then the backward without statistics (the recompute path) on the Llama-3 fwd+bwd cases
    for c in llama:
        if c["mode"] == "fwd+bwd":
            cases.append((c, ["cuda-recompute", "triton-recompute"]))
    # then the CUDA kernels' tuning knobs on the Llama-3 cases (same build, other launch shapes):
    # a jsd forward re-reads (pass B); fwd+bwd: the forward is single-pass for forward_kl and
    # the backward with statistics always is, so both knobs kinds apply
    for c in llama:
        if c["mode"] == "fwd+bwd":
            knobs = ["cuda-t512", "cuda-nocache", "cuda-1pass1024"] if c["divergence"] == "jsd" \
                else ["cuda-1pass1024"]
        else:
            knobs = ["cuda-t512", "cuda-nocache"] if c["divergence"] == "jsd" \
                else ["cuda-1pass1024"]
        cases.append((c, knobs))
    # torch.compile last: each new dtype/divergence/mode costs a compilation (tens of seconds)
    if not args.no_compile:
        cases += [(c, ["compile"]) for c in llama]

    results = []
    compiled_cache = {}
    eager_values = {}
    print(f"bytes model: {MODEL}", flush=True)
    print(HEADER, flush=True)
    for case, vs in cases:
        run_case(case, vs, results, deadline, peak_bw, compiled_cache, eager_values)
    meta["elapsed_s"] = time.time() - start

    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1, default=str)
    md = [f"# kd_loss GPU benchmark — {dev.name}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, liger {meta['liger']}; peak "
          f"{meta['peak_bw_tb_s']} TB/s, measured D2D copy {meta['copy_tb_s']} TB/s.", "",
          f"Bytes model: {MODEL}.", "",
          HEADER] + [fmt_row(r) for r in results]
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
