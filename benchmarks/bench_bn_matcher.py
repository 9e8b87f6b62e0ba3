"""BatchNorm-statistic matching on a CIFAR ResNet-18: pde.BNStatMatcher (fused
pde.bn_moments) vs the anchors' eager hook vs a torch.var_mean hook vs torch.compile of the
anchors' hook, side by side in one process (median wall times, CPU).

    python -m benchmarks.bench_bn_matcher --threads 1 --reps 7   # results/bench_bn_matcher.{json,md}
    python -m benchmarks.bench_bn_matcher --smoke                # CI: tiny, nothing written
    python -m benchmarks.bench_bn_matcher --device cuda --reps 51 --name bench_bn_matcher_gpu

Two measurements:

* ``stats``: the statistics part alone, forward + backward: the BN inputs of one forward of
  ResNet-18 (batch 64, 32x32; 20 BN layers) are captured once, then each variant computes
  sum_l s_l (||mu_l - mu_run|| + ||var_l - var_run||) from them and backpropagates to them.
* ``recover``: one whole SRe2L recover iteration: forward of the frozen teacher on the
  synthetic batch with the hooks, CE + r_bn * BN loss, backward to the images, Adam step;
  ``none`` = the same iteration without any BN term (the floor).

``saved`` counts the bytes autograd keeps for the backward of the statistics beyond the BN
inputs themselves (unique storages seen by torch.autograd.graph.saved_tensors_hooks): the
eager hook keeps a permuted contiguous copy of every BN input.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness

import pydistill_ext as pde  # noqa: E402
from pydistill_ext.models import get_model  # noqa: E402
# DeepInversion / SRe2L BNFeatureHook statistics (mean; biased var of the permuted copy)
from reference.bn_moments import hook_moments as anchor_stats  # noqa: E402

VARIANTS = ("pydistill", "eager", "var_mean", "compile")


def var_mean_stats(x):
    var, mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
    return mean, var


def fused_stats(x):
    return pde.bn_moments(x)


_compiled = {}


def compiled_stats(x):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(anchor_stats, fullgraph=True, dynamic=False)
    return _compiled["fn"](x)


STATS = {"pydistill": fused_stats, "eager": anchor_stats, "var_mean": var_mean_stats,
         "compile": compiled_stats}


def layer_loss(stats, x, bn):
    mean, var = stats(x)
    return torch.linalg.vector_norm(bn.running_mean - mean) + \
        torch.linalg.vector_norm(bn.running_var - var)


class HookMatcher:
    """The anchors' hook structure with a pluggable statistics function."""

    def __init__(self, model, stats, first=10.0):
        self.losses = []
        self.stats = stats
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.scales = [first] + [1.0] * (len(bns) - 1)
        self.handles = [m.register_forward_hook(self._hook) for m in bns]

    def _hook(self, module, inputs, _out):
        self.losses.append(layer_loss(self.stats, inputs[0], module))

    @property
    def loss(self):
        out = sum(s * v for s, v in zip(self.scales, self.losses))
        self.losses = []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def teacher(smoke):
    net = get_model("resnet18" if not smoke else "resnet10", 3, 10, (32, 32), seed=0)
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    net.eval().requires_grad_(False)
    return net


def bn_inputs(net, x):
    caps = []
    hs = [m.register_forward_hook(lambda m, i, o: caps.append((m, i[0].detach())))
          for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for h in hs:
        h.remove()
    return caps


def saved_bytes(fn, inputs=()):
    """Bytes of unique storages autograd saves while ``fn`` builds its graph, not counting
    the storages of ``inputs`` (the BN inputs exist anyway; a saved reference costs nothing,
    a saved copy costs its size)."""
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            if key not in skip:
                seen[key] = t.untyped_storage().nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="bench_bn_matcher")
    p.add_argument("--device", default="cpu", help="cpu or cuda (synchronised timing)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 1 if args.smoke else args.reps
    batch = 4 if args.smoke else args.batch
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    net = teacher(args.smoke).to(dev)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
    y = (torch.arange(batch) % 10).to(dev)
    rows = []

    # ---------------------------------------------------------------- statistics part
    caps = bn_inputs(net, x0)
    scales = [10.0] + [1.0] * (len(caps) - 1)

    def stats_step(stats):
        xs = [x.clone().requires_grad_() for _, x in caps]

        def build():
            return sum(s * layer_loss(stats, x, bn) for s, x, (bn, _) in zip(scales, xs, caps))
        loss, nbytes = saved_bytes(build, xs)
        loss.backward()
        return nbytes

    results = {}
    for v in VARIANTS:
        stats_step(STATS[v])  # warm-up (compiles)
        t = harness.median_time(lambda: stats_step(STATS[v]), reps, sync=sync)
        results[v] = (t, stats_step(STATS[v]))
    elems = sum(x.numel() for _, x in caps)
    for v in VARIANTS:
        t, nb = results[v]
        rows.append(dict(part="stats", variant=v, ms=1e3 * t, saved_mb=nb / 2**20,
                         speedup_vs_eager=results["eager"][0] / t,
                         shape=f"{'ResNet-10' if args.smoke else 'ResNet-18'} BN inputs, batch {batch}, 32x32 ({len(caps)} layers, "
                               f"{elems / 1e6:.1f} M elements)", device=str(dev)))

    # ---------------------------------------------------------------- whole recover iteration
    def make(v):
        img = x0.clone().requires_grad_()
        opt = torch.optim.Adam([img], lr=0.25, betas=(0.5, 0.9))
        if v == "none":
            matcher = None
        elif v == "pydistill":
            matcher = pde.BNStatMatcher(net, first_bn_multiplier=10.0)
        else:
            matcher = HookMatcher(net, STATS[v])

        def it():
            logits = net(img)
            loss = F.cross_entropy(logits, y)
            if matcher is not None:
                loss = loss + 0.01 * matcher.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return it, matcher

    times = {}
    for v in ("none",) + VARIANTS:
        it, matcher = make(v)
        it()
        times[v] = harness.median_time(it, reps, sync=sync)
        if matcher is not None:
            matcher.remove()
    for v in ("none",) + VARIANTS:
        rows.append(dict(part="recover", variant=v, ms=1e3 * times[v], saved_mb=None,
                         speedup_vs_eager=times["eager"] / times[v],
                         shape=f"{'ResNet-10' if args.smoke else 'ResNet-18'} recover iteration, batch {batch}, 32x32",
                         device=str(dev)))

    lines = ["| part | variant | ms (median) | speed-up vs eager hook | extra saved for backward (MB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        mb = "" if r["saved_mb"] is None else harness.fmt_mb(r["saved_mb"] * 2**20)
        lines.append(f"| {r['part']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['speedup_vs_eager']:.2f}x | {mb} |")
    table = "\n".join(lines)
    print(rows[0]["shape"])
    print(table)
    if not args.smoke:
        harness.write_results(args.name, rows, table, args.out)


if __name__ == "__main__":
    main()
