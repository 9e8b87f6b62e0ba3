"""Trajectory matching: memory and time of one distillation iteration per gradient mode, and
the batched expert ensemble against training experts one after another (issue 6).

Part A — one call of ``trajectory_step`` (forward unroll + gradient w.r.t. images and syn_lr)
on ConvNet-3 (width 128, instance norm) at syn_steps 10, 20, 40, 80 for ``exact``, ``tesla``
and ``unroll``. Memory is counted, not sampled: the peak of live bytes autograd saves for
backward (``SavedTensorMeter``, saved_tensors_hooks), plus the trajectory storage θ_0..θ_{N−1}
that ``exact`` / ``tesla`` keep outside the graph (N·P·4 bytes), plus the process's peak-RSS
rise during the call (VmHWM after ``clear_refs``; glibc's mmap threshold is pinned so freed
blocks are returned). Time: median wall time of the call.

Part B — K experts × 1 epoch with ``train_experts(batched="grouped")`` (the K ConvNets as one
grouped-convolution network), ``batched="vmap"`` (vmap over the stacked flat parameters) and
``batched=False`` (the same per-expert function in a loop); throughput
= expert-images per second (CPU: per second of process CPU time; CUDA: per second of wall
time, synchronised). ``synthetic-mnist`` / ``synthetic-cifar`` are random images of those shapes
(for machines without the datasets, e.g. the GPU machine: throughput does not depend on the
pixels).

``python -m benchmarks.bench_trajectory [--smoke] [--shape mnist|cifar] [--batch B]``
``python -m benchmarks.bench_trajectory --device cuda --skip-part-a --expert-data synthetic-mnist:16384:256``
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import harness
from pydistill_ext.methods.trajectory import (Augment, FlatModel, SavedTensorMeter,
                                              train_experts, trajectory_step)
from pydistill_ext.models import get_model

STEPS = (10, 20, 40, 80)
# label -> (mode, checkpoint_every)
VARIANTS = {"exact": ("exact", None), "exact-sqrt": ("exact", "sqrt"),
            "tesla": ("tesla", None), "unroll": ("unroll", None)}
MODES = tuple(VARIANTS)


def _theta_store(label, n, p):
    mode, every = VARIANTS[label]
    if mode == "unroll":
        return 0
    if every is None:
        return n * p * 4
    k = max(1, math.ceil(math.sqrt(n)))
    return (math.ceil(n / k) + k - 1) * p * 4


def _rss_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _problem(shape, batch, seed=0):
    c, h = (1, 28) if shape == "mnist" else (3, 32)
    net = get_model("convnet", c, 10, (h, h), seed=seed)
    fm = FlatModel(net)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(batch, c, h, h, generator=g)
    y = torch.arange(batch) % 10
    th0 = fm.flatten()
    tgt = th0 + 0.01 * torch.randn(fm.num_params, generator=g)
    strategy = "color_crop_cutout_scale_rotate" if shape == "mnist" else \
        "color_crop_cutout_flip_scale_rotate"
    return fm, X, y, th0, tgt, Augment(strategy)


def _rss_rise(shape, batch, n, label):
    """Peak-RSS rise of one call, measured in a fresh process (glibc mmap threshold pinned so
    freed blocks go back to the OS and cannot hide under the high-water mark)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([harness.ROOT, os.path.join(harness.ROOT, "python"),
                                         env.get("PYTHONPATH", "")])
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_trajectory", "--measure-rss",
                          shape, str(batch), str(n), label], cwd=harness.ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    return int(out.stdout.strip().splitlines()[-1])


def _measure_rss(shape, batch, n, label):
    torch.set_num_threads(1)
    fm, X, y, th0, tgt, aug = _problem(shape, batch)
    lr = torch.tensor(0.01)
    # warm-up (one step): one-time allocations (oneDNN primitives, thread pools) not counted
    mode, every = VARIANTS[label]
    trajectory_step(X, y, th0, tgt, lr, 1, batch, 0, mode, model=fm, augment=aug)
    gc.collect()
    if not _rss_reset():
        print(-1)
        return
    base = harness.current_rss_bytes()
    res = trajectory_step(X, y, th0, tgt, lr, n, batch, 0, mode, model=fm, augment=aug,
                          checkpoint_every=every)
    print(_hwm() - base)
    del res


def _float64_check(shape, batch, n):
    """exact vs unroll in float64 (the algorithmic difference) and each float32 gradient's
    distance to the float64 one (the float32 floor of this problem)."""
    fm, X, y, th0, tgt, aug = _problem(shape, batch)
    out = {}
    for dt in (torch.float64, torch.float32):
        fm.module.to(dt)
        for mode in ("exact", "unroll"):
            out[(dt, mode)] = trajectory_step(X.to(dt), y, th0.to(dt), tgt.to(dt),
                                              torch.tensor(0.01, dtype=dt), n, batch, 0, mode,
                                              model=fm, augment=aug).grad_images.double()
    ref = out[(torch.float64, "unroll")]

    def rel(a):
        return float((a - ref).norm() / ref.norm())
    return {"syn_steps": n, "float64_exact_vs_unroll": rel(out[(torch.float64, "exact")]),
            "float32_exact_vs_float64": rel(out[(torch.float32, "exact")]),
            "float32_unroll_vs_float64": rel(out[(torch.float32, "unroll")])}


def part_a(shape, batch, steps, reps, rss=True):
    fm, X, y, th0, tgt, aug = _problem(shape, batch)
    lr = torch.tensor(0.01)
    rows = []
    for n in steps:
        def call(label):
            mode, every = VARIANTS[label]
            return trajectory_step(X, y, th0, tgt, lr, n, batch, 0, mode, model=fm,
                                   augment=aug, checkpoint_every=every)
        grp, ref = {}, {}
        for mode in MODES:
            with SavedTensorMeter() as m:
                ref[mode] = call(mode)
            store = _theta_store(mode, n, fm.num_params)
            grp[mode] = {"part": "modes", "shape": shape, "batch": batch, "syn_steps": n,
                         "mode": mode, "saved_peak_bytes": m.peak,
                         "theta_store_bytes": store, "total_bytes": m.peak + store,
                         "num_params": fm.num_params, "cpu_s": [], "wall_s": []}
        for _ in range(reps):                 # interleaved: load changes hit every mode
            for mode in MODES:
                gc.collect()
                c0, w0 = time.process_time(), time.perf_counter()
                call(mode)
                grp[mode]["cpu_s"].append(time.process_time() - c0)
                grp[mode]["wall_s"].append(time.perf_counter() - w0)
        e, u, ts = ref["exact"], ref["unroll"], ref["tesla"]
        assert torch.equal(ref["exact-sqrt"].grad_images, e.grad_images)
        rel = float((e.grad_images - u.grad_images).norm() / u.grad_images.norm())
        rel_t = float((ts.grad_images - e.grad_images).norm() / e.grad_images.norm())
        cos_t = float(torch.nn.functional.cosine_similarity(ts.grad_images.flatten(),
                                                            e.grad_images.flatten(), 0))
        del ref, e, u, ts
        for mode, r in grp.items():
            r["seconds"] = statistics.median(r["cpu_s"])
            r["wall_seconds"] = statistics.median(r["wall_s"])
            r["rss_rise_bytes"] = _rss_rise(shape, batch, n, mode) if rss else float("nan")
            r.update({"exact_vs_unroll_rel_err": rel, "tesla_vs_exact_rel_err": rel_t,
                      "tesla_vs_exact_cos": cos_t})
            rows.append(r)
        print(_line_a(rows[-len(MODES):]), flush=True)
    return rows


def _synthetic(name, n):
    from pydistill_ext.data.dataset import RealDataset
    c, hw = (1, 28) if name == "synthetic-mnist" else (3, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return RealDataset(name=name, num_classes=10, class_names=[str(i) for i in range(10)],
                       channels=c, im_size=(hw, hw), train_images=x, train_labels=y,
                       test_images=x[:10], test_labels=y[:10], mean=(0.0,) * c, std=(1.0,) * c)


def part_b_step(shape, k, batch, reps, device="cpu"):
    """One ensemble gradient (K experts × one batch, no augmentation) per form, the forms
    interleaved rep by rep on the same inputs; median seconds (CPU: process time)."""
    import torch.nn.functional as F
    from torch.func import grad, vmap
    from pydistill_ext.methods.trajectory.ensemble import GroupedConvNet
    c, hw = (1, 28) if shape == "mnist" else (3, 32)
    net = get_model("convnet", c, 10, (hw, hw), seed=0).to(device)
    fm, ens = FlatModel(net), GroupedConvNet(net)
    g = grad(lambda t, x, y: F.cross_entropy(fm(t, x), y))
    gen = torch.Generator().manual_seed(0)
    theta = torch.stack([fm.flatten(get_model("convnet", c, 10, (hw, hw), seed=s))
                         for s in range(k)]).to(device)
    x = torch.randn(k, batch, c, hw, hw, generator=gen).to(device)
    y = torch.randint(0, 10, (k, batch), generator=gen).to(device)
    forms = {"grouped": ens.grad_fn(), "vmap": vmap(g),
             False: lambda t, a, b: torch.stack([g(t[i], a[i], b[i]) for i in range(k)])}
    cuda = str(device).startswith("cuda")
    times = {f: [] for f in forms}
    for rep in range(reps + 1):                   # rep 0 warms up
        for f, fn in forms.items():
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(theta, x, y)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0 if cuda else time.process_time() - c0
            if rep:
                times[f].append(dt)
    med = {f: statistics.median(v) for f, v in times.items()}
    rows = [{"part": "ensemble_step", "shape": shape, "experts": k, "batch": batch,
             "batched": f, "seconds": med[f], "reps": reps, "device": str(device),
             "batched_over_sequential": med[False] / med[f]} for f in forms]
    print(f"ensemble gradient {shape} K={k} B={batch}: " + ", ".join(
        f"{r['batched'] or 'sequential'} {r['seconds']:.2f} s ({r['batched_over_sequential']:.2f}x)"
        for r in rows), flush=True)
    return rows


def part_b(shape, k, epochs, n_images, batch, device="cpu"):
    if shape.startswith("synthetic-"):
        ds = _synthetic(shape, n_images or 4096)
    else:
        from pydistill_ext.data import load_dataset
        ds = load_dataset(shape)
    if n_images and n_images < ds.train_images.shape[0]:
        ds = ds.subset_train(torch.arange(n_images))
    cuda = str(device).startswith("cuda")
    rows = []
    out = {}
    if cuda:       # warm-up: cuDNN autotuning and lazy init stay out of the timing
        for form in ("grouped", "vmap"):
            train_experts(ds.subset_train(torch.arange(batch)), "convnet", num_experts=k,
                          epochs=1, batch=batch, seed=0, batched=form, device=device)
        torch.cuda.synchronize()
    for batched in ("grouped", "vmap", False):
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        buf = train_experts(ds, "convnet", num_experts=k, epochs=epochs, batch=batch, seed=0,
                            batched=batched, device=device)
        if cuda:
            torch.cuda.synchronize()
        wall, dt = time.perf_counter() - t0, time.process_time() - c0
        if cuda:
            dt = wall
        out[batched] = buf
        imgs = k * epochs * ds.train_images.shape[0]
        rows.append({"part": "experts", "dataset": ds.name, "train_images":
                     int(ds.train_images.shape[0]), "experts": k, "epochs": epochs,
                     "batch": batch, "batched": batched, "seconds": dt, "wall_seconds": wall,
                     "images_per_s": imgs / dt, "device": str(device),
                     "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None})
    seq = rows[-1]
    for r in rows:
        b = r["batched"]
        r["batched_over_sequential"] = r["images_per_s"] / seq["images_per_s"]
        r["max_abs_diff"] = max(float((out[b].trajectory(i) - out[False].trajectory(i))
                                      .abs().max()) for i in range(k))
    print(f"experts {ds.name} K={k} batch {batch}: " + ", ".join(
        f"{r['batched'] or 'sequential'} {r['seconds']:.1f} s "
        f"({r['batched_over_sequential']:.2f}x)" for r in rows)
        + f"; max |diff| {max(r['max_abs_diff'] for r in rows):.2e}", flush=True)
    return rows


def _training_name(batched):
    # rows written before the grouped form existed record batched as True (= vmap)
    return {"grouped": "grouped conv (batched)", "vmap": "vmap (batched)",
            True: "vmap (batched)"}.get(batched, "sequential")


def _line_a(rs):
    return "  ".join(f"{r['mode']} N={r['syn_steps']}: {r['seconds']:.2f} s, saved "
                     f"{harness.fmt_mb(r['saved_peak_bytes'])} MB" for r in rs)


def _table(rows, argv):
    m = harness.machine()
    out = [f"Machine: {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}. Command: "
           f"`python -m benchmarks.bench_trajectory {' '.join(argv)}`. float32.", ""]
    a = [r for r in rows if r["part"] == "modes"]
    if a:
        r0 = a[0]
        out += [f"**One distillation iteration** (`trajectory_step`, forward + gradients), "
                f"ConvNet-3 {r0['shape']}-shaped, {r0['batch']} synthetic images per step, DSA, "
                f"P = {r0['num_params']:,}. Saved = peak live bytes saved for backward "
                f"(counted by saved_tensors_hooks); θ store = θ_0..θ_(N−1) kept by exact/tesla "
                f"(N·P·4 B); RSS = peak resident-memory rise during the call.", "",
                "Time = median CPU seconds of the process (single thread; the machine is shared, "
                "so CPU time is steadier than wall time, also given).", "",
                "| syn_steps | mode | CPU s | wall s | saved MB | θ store MB | saved + θ MB | "
                "RSS rise MB | exact/unroll time | exact vs unroll rel. err (fp32) | "
                "TESLA vs exact rel. err (cos) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        nm = len(MODES)
        for i in range(0, len(a), nm):
            grp = {r["mode"]: r for r in a[i:i + nm]}
            ratio = grp["exact"]["seconds"] / grp["unroll"]["seconds"]
            for mode in MODES:
                r = grp[mode]
                out.append(
                    f"| {r['syn_steps']} | {mode} | {r['seconds']:.2f} | {r['wall_seconds']:.2f} | "
                    f"{r['saved_peak_bytes'] / 2**20:.1f} | {r['theta_store_bytes'] / 2**20:.1f} | "
                    f"{r['total_bytes'] / 2**20:.1f} | {r['rss_rise_bytes'] / 2**20:.0f} | "
                    + (f"{ratio:.2f}× | {r['exact_vs_unroll_rel_err']:.1e} | "
                       f"{r['tesla_vs_exact_rel_err']:.3f} ({r['tesla_vs_exact_cos']:.4f}) |"
                       if mode == "exact" else " | | |"))
        for r in rows:
            if r["part"] == "float64":
                out += ["", f"float64 check at syn_steps {r['syn_steps']} (same problem): exact vs "
                            f"unroll relative error {r['float64_exact_vs_unroll']:.1e}; the "
                            f"float32 gradients' distance to the float64 one: exact "
                            f"{r['float32_exact_vs_float64']:.1e}, unroll "
                            f"{r['float32_unroll_vs_float64']:.1e} — the fp32 difference between "
                            f"the modes is this problem's float32 rounding floor, not the "
                            f"method."]
        ex = [r for r in a if r["mode"] == "exact"]
        un = [r for r in a if r["mode"] == "unroll"]
        if len(ex) > 1:
            out += ["", f"exact saved-graph peak, {ex[-1]['syn_steps']} vs {ex[0]['syn_steps']} "
                        f"steps: {ex[-1]['saved_peak_bytes'] / ex[0]['saved_peak_bytes']:.3f}× "
                        f"(with θ store: {ex[-1]['total_bytes'] / ex[0]['total_bytes']:.3f}×); "
                        f"unroll: {un[-1]['saved_peak_bytes'] / un[0]['saved_peak_bytes']:.2f}×. "
                        f"exact time / unroll time: "
                        + ", ".join(f"{e['seconds'] / u['seconds']:.2f}× (N={e['syn_steps']})"
                                    for e, u in zip(ex, un)) + "."]
            sq = [r for r in a if r["mode"] == "exact-sqrt"]
            if sq:
                out += ["", f"exact with checkpoint_every='sqrt' (θ_i kept every ⌈√N⌉ steps, "
                            f"segments recomputed; bitwise the same gradient): saved + θ "
                            f"{sq[-1]['total_bytes'] / sq[0]['total_bytes']:.3f}× from "
                            f"{sq[0]['syn_steps']} to {sq[-1]['syn_steps']} steps; time / unroll: "
                            + ", ".join(f"{e['seconds'] / u['seconds']:.2f}× "
                                        f"(N={e['syn_steps']})" for e, u in zip(sq, un)) + "."]
    st = [r for r in rows if r["part"] == "ensemble_step"]
    if st:
        out += ["", "**One ensemble gradient** (K experts × one batch, ConvNet-3, no augmentation; "
                "the three forms interleaved on the same inputs, median of "
                f"{st[0]['reps']}; CPU: process time, CUDA: synchronised wall time):", "",
                "| device | shape | K | batch | form | s | speed vs sequential |",
                "|---|---|---|---|---|---|---|"]
        for r in st:
            out.append(f"| {r['device']} | {r['shape']} | {r['experts']} | {r['batch']} | "
                       f"{_training_name(r['batched'])} | {r['seconds']:.3f} | "
                       f"{r['batched_over_sequential']:.2f}× |")
    b = [r for r in rows if r["part"] == "experts"]
    if b:
        out += ["", "**Expert ensemble** (K experts × epochs, ConvNet-3, SGD lr 0.01, DSA):", "",
                "| device | dataset | train images | K | epochs | batch | training | CPU s | "
                "wall s | expert-images/s (CPU; CUDA: wall) | batched / sequential | "
                "max abs diff |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in b:
            out.append(f"| {r.get('device', 'cpu')} | {r['dataset']} | {r['train_images']} | "
                       f"{r['experts']} | "
                       f"{r['epochs']} | {r['batch']} | "
                       f"{_training_name(r['batched'])} | "
                       f"{r['seconds']:.1f} | {r['wall_seconds']:.1f} | {r['images_per_s']:.0f} | "
                       f"{r['batched_over_sequential']:.2f}× | {r['max_abs_diff']:.1e} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny problem, nothing written")
    p.add_argument("--shape", default="mnist", choices=["mnist", "cifar"])
    p.add_argument("--batch", type=int, default=10, help="synthetic images per inner step")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-data", nargs="+", default=["digits:0:256", "mnist:2048:256"],
                   help="DATASET:N_IMAGES:BATCH for part B (0 = all)")
    p.add_argument("--skip-experts", action="store_true")
    p.add_argument("--step", nargs="*", default=[],
                   help="SHAPE:K:BATCH (mnist|cifar) for the one-gradient ensemble comparison")
    p.add_argument("--step-reps", type=int, default=3)
    p.add_argument("--skip-part-a", action="store_true")
    p.add_argument("--device", default="cpu", help="part B's device (part A runs on the CPU)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-call RSS subprocesses")
    p.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="bench_trajectory")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    if a.smoke:
        rows += part_a(a.shape, 2, [1, 2], 1, rss=not a.no_rss)
        rows.append({"part": "float64", **_float64_check(a.shape, 2, 2)})
        rows += part_b("digits", 2, 1, 64, 32)
        rows += part_b_step("mnist", 2, 8, 1)
        print(_table(rows, argv))
        return
    if not a.skip_part_a:
        rows += part_a(a.shape, a.batch, a.steps, a.reps, rss=not a.no_rss)
        rows.append({"part": "float64", **_float64_check(a.shape, a.batch, min(a.steps))})
        print(rows[-1], flush=True)
    for spec in a.step:
        shape, k, b = spec.split(":")
        rows += part_b_step(shape, int(k), int(b), a.step_reps, device=a.device)
    if not a.skip_experts:
        for spec in a.expert_data:
            name, n, b = spec.split(":")
            rows += part_b(name, a.experts, 1, int(n), int(b), device=a.device)
    table = _table(rows, argv)
    print(table)
    harness.write_results(a.name, rows, table, a.out)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--measure-rss":
        _measure_rss(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
