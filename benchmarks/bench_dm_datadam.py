"""One DM iteration and one DataDAM iteration (frozen random ConvNet-3 forward on the real and
the synthetic batch, matching loss, backward to the images, SGD step) on CIFAR-10 shapes:
pydistill_ext's batched methods vs the faithful eager per-class anchors
(python/reference/matching_eager.py), side by side in one process (median wall times).

    python -m benchmarks.bench_dm_datadam --threads 1 --reps 5   # results/bench_dm_datadam.{json,md}
    python -m benchmarks.bench_dm_datadam --smoke                # CI: tiny shapes, nothing written

Problem: 10 classes, IPC 10, 3x32x32, ConvNet-3 (width 128, instance norm); DM batch_real 256
per class (2,560 real images), DataDAM batch_real 64 per class (640). Random tensors; DSA off
in both variants (the same dsa_augment would run in both; the anchor would call it per class).
Rows:

* ``iteration``: the whole step. pydistill = ``pydistill_ext.methods.dm.dm_objective`` /
  ``datadam.datadam_objective`` (one forward per side, real side without a graph, fused
  class_mean / attention_map) + backward + SGD, as the methods run by default: the frozen
  ConvNet's passes through ``torch.compile`` (``compile=True``); "eager network" is the same
  with ``compile=False``, to show what the compilation adds; eager = ``reference.matching_eager
  .dm_iteration`` (two forwards per class, as main_DM.py) / ``datadam_iteration`` (hooks on
  the ReLUs, eager attention, reshape means, as main_DataDAM.py).
* ``matching only``: the loss from given network outputs, forward + backward (the part the
  fused ops replace): dm_loss vs a per-class masked-mean loop; attention_match_loss + dm_loss
  vs the anchor's eager attention + reshape means.
"""
from __future__ import annotations

import sys

import torch

from benchmarks import harness

from pydistill_ext.losses.matching import attention_match_loss, dm_loss  # noqa: E402
from pydistill_ext.methods.datadam import datadam_objective, maps_and_embedding  # noqa: E402
from pydistill_ext.methods.dm import dm_objective  # noqa: E402
from pydistill_ext.models import get_model  # noqa: E402
from reference import matching_eager as ref  # noqa: E402

VARIANTS = ("pydistill", "pydistill_eager_net", "eager")


def _ours_iteration(objective, net, xr, yr, syn, ys, opt, k, compile):
    loss = objective(net, xr, yr, syn, ys, k, compile=compile)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _eager_dm_match(er, yr, es, ys, k):
    loss = 0.0
    for c in range(k):
        loss = loss + ((er[yr == c].mean(0) - es[ys == c].mean(0)) ** 2).sum()
    return loss


def _eager_dd_match(maps_r, er, maps_s, es, k, b, ipc, p=1.0):
    def err(r, s):
        return ((r.reshape(k, b, -1).mean(1) - s.reshape(k, ipc, -1).mean(1)) ** 2).sum()
    loss = 0.0
    for fr, fs in zip(maps_r, maps_s):
        loss = loss + 100 * err(ref._eager_attention(fr, p), ref._eager_attention(fs, p))
    return loss + 100 * 0.01 * err(er, es)


def problems(smoke):
    k, ipc = (3, 2) if smoke else (10, 10)
    size, width = (8, 16) if smoke else (32, 128)
    g = torch.Generator().manual_seed(0)
    out = []
    for method, b in (("DM", 4 if smoke else 256), ("DataDAM", 4 if smoke else 64)):
        net = get_model("convnet", 3, k, size, seed=1, width=width).requires_grad_(False)
        xr = torch.randn(k * b, 3, size, size, generator=g)
        yr = torch.arange(k).repeat_interleave(b)
        syn0 = torch.randn(k * ipc, 3, size, size, generator=g)
        ys = torch.arange(k).repeat_interleave(ipc)
        per_class = [xr[yr == c] for c in range(k)]
        out.append(dict(method=method, k=k, ipc=ipc, b=b, net=net, xr=xr, yr=yr, syn0=syn0, ys=ys,
                        per_class=per_class,
                        shape=f"{k} classes, IPC {ipc}, batch_real {b}/class, 3x{size}x{size}"))
    return out


def run_problem(pr, reps):
    k, ipc, b, net = pr["k"], pr["ipc"], pr["b"], pr["net"]
    dm = pr["method"] == "DM"
    rows = []
    # ---- whole iteration
    state = {}
    for var in VARIANTS:
        syn = pr["syn0"].clone().requires_grad_(True)
        state[var] = (syn, torch.optim.SGD([syn], lr=1.0, momentum=0.5))
    objective = dm_objective if dm else datadam_objective

    def ours(var="pydistill"):
        syn, opt = state[var]
        return _ours_iteration(objective, net, pr["xr"], pr["yr"], syn, pr["ys"], opt, k,
                               compile=var == "pydistill")

    def ours_eager_net():
        return ours("pydistill_eager_net")

    def eager():
        syn, opt = state["eager"]
        if dm:
            return ref.dm_iteration(net, pr["per_class"], syn, opt, ipc)
        return ref.datadam_iteration(net, pr["per_class"], syn, opt, ipc, p=1.0, task_balance=0.01)

    # same loss and same first update first (a benchmark of a wrong step is worthless)
    la, lc, lb = ours(), ours_eager_net(), eager()   # (the first call compiles)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lc, lb, rtol=1e-4, atol=1e-5)
    # the first updates agree up to float32 summation order (channels-last convolutions,
    # Inductor's fused kernels): relative L2 error of the image update
    d_eager = state["eager"][0].detach() - pr["syn0"]
    for var in VARIANTS[:2]:
        d_ours = state[var][0].detach() - pr["syn0"]
        rel = float((d_ours - d_eager).norm() / d_eager.norm())
        assert rel < 1e-3, f"{pr['method']} {var}: updates differ (relative L2 {rel:.2e})"
    res = {"pydistill": harness.median_time(ours, reps, warmup=1),
           "pydistill_eager_net": harness.median_time(ours_eager_net, reps, warmup=1),
           "eager": harness.median_time(eager, reps, warmup=1)}
    rows.append(dict(method=pr["method"], part="iteration", shape=pr["shape"],
                     **{f"{v}_s": t for v, t in res.items()},
                     speedup=res["eager"] / res["pydistill"],
                     speedup_eager_net=res["eager"] / res["pydistill_eager_net"]))
    print(_line(rows[-1]), flush=True)
    # ---- matching only (given the network's outputs), fwd + bwd
    syn = pr["syn0"]
    with torch.no_grad():
        maps_r, er = maps_and_embedding(net, pr["xr"])
        maps_s, es = maps_and_embedding(net, syn)
    yr, ys = pr["yr"], pr["ys"]

    def leaf(t):
        return t.detach().requires_grad_(True)

    if dm:
        def m_ours():
            e = leaf(es)
            dm_loss(er, yr, e, ys, k).backward()
            return e.grad

        def m_eager():
            e = leaf(es)
            _eager_dm_match(er, yr, e, ys, k).backward()
            return e.grad
    else:
        def m_ours():
            ms, e = [leaf(m) for m in maps_s[:-1]], leaf(es)
            loss = (100 * attention_match_loss(maps_r[:-1], yr, ms, ys, k, p=1.0)
                    + 100 * 0.01 * dm_loss(er, yr, e, ys, k))
            loss.backward()
            return ms[0].grad

        def m_eager():
            ms, e = [leaf(m) for m in maps_s[:-1]], leaf(es)
            _eager_dd_match(maps_r[:-1], er, ms, e, k, b, ipc).backward()
            return ms[0].grad
    torch.testing.assert_close(m_ours(), m_eager(), rtol=1e-4, atol=1e-6)
    res = {"pydistill": harness.median_time(m_ours, max(reps, 5) * 3, warmup=2),
           "eager": harness.median_time(m_eager, max(reps, 5) * 3, warmup=2)}
    rows.append(dict(method=pr["method"], part="matching only", shape=pr["shape"],
                     **{f"{v}_s": t for v, t in res.items()},
                     speedup=res["eager"] / res["pydistill"]))
    print(_line(rows[-1]), flush=True)
    return rows


def main(argv=None):
    a = harness.parse_bench_args(harness.bench_parser(__doc__, "bench_dm_datadam", 5), argv)
    reps = 1 if a.smoke else a.reps
    rows = []
    for pr in problems(a.smoke):
        rows += run_problem(pr, reps)
    table = _table(rows)
    print(table)
    if not a.smoke:
        harness.write_results(a.name, rows, table, a.out)


def _line(r):
    mid = (f"  (eager network {r['pydistill_eager_net_s'] * 1e3:.1f} ms)"
           if "pydistill_eager_net_s" in r else "")
    return (f"{r['method']} {r['part']} ({r['shape']}): pydistill {r['pydistill_s'] * 1e3:.1f} ms"
            f"{mid}  eager {r['eager_s'] * 1e3:.1f} ms  (x{r['speedup']:.2f})")


def _table(rows):
    m = harness.machine()
    out = [f"Machine: {m['cpu']}, {m['threads']} thread(s) used (shared machine: noisy), torch "
           f"{m['torch']}, at::vec {m['cpu_capability']}. float32, median ms over the reps, both "
           f"variants in one process. Command: `python -m benchmarks.bench_dm_datadam "
           f"{' '.join(sys.argv[1:])}`.", "",
           "| method | part | problem | pydistill ms | pydistill, eager network ms | "
           "eager anchor ms | speed-up | speed-up, eager network |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "pydistill_eager_net_s" in r:
            mid = f"{r['pydistill_eager_net_s'] * 1e3:.1f}"
            last = f"{r['speedup_eager_net']:.2f}×"
        else:
            mid = last = "–"
        out.append(f"| {r['method']} | {r['part']} | {r['shape']} | {r['pydistill_s'] * 1e3:.1f} | "
                   f"{mid} | {r['eager_s'] * 1e3:.1f} | {r['speedup']:.2f}× | {last} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
