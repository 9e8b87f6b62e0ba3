"""One outer step of DC (gradient matching) at IPC 50 on MNIST shapes: the matching loss over
the ten classes (real class gradients, second-order synthetic gradients, backward to the
images, SGD) and DC's ``inner_loop`` epochs of network training on the synthetic set;
pydistill's fast path vs the eager anchor, side by side in one process (median wall times).

    python -m benchmarks.bench_dc_step --threads 1 --reps 3   # results/bench_dc_step.{json,md}
    python -m benchmarks.bench_dc_step --smoke                # CI: tiny shapes, nothing written

Variants:

* ``pydistill``: as ``pydistill distill --method dc`` runs by default: the first-order passes
  (real class gradients, inner-loop training) through ``torch.compile(net, dynamic=False)``
  in ``GRAD_CHUNK``-row chunks; the synthetic gradient eager (double backward).
* ``pydistill, compile=False``: the same chunks, eager.
* ``eager anchor``: ``reference.dc_eager.dc_matching_loss`` (DC's ``main.py`` body: one
  forward per class batch) and the inner loop as DC's ``epoch('train')`` (one forward and
  backward per 256-row minibatch).

All three start from the same network and images; the benchmark first checks that the three
image updates agree (relative L2 difference < 1e-3) before timing.
"""
from __future__ import annotations

import copy
import sys

import torch

from benchmarks import harness

from pydistill_ext.data.dataset import RealDataset  # noqa: E402
from pydistill_ext.methods import dc as dc_mod  # noqa: E402
from pydistill_ext.methods import get_method  # noqa: E402
from pydistill_ext.models import get_model  # noqa: E402
from reference.dc_eager import dc_matching_loss  # noqa: E402

VARIANTS = ("pydistill", "pydistill_eager", "eager")


def _dataset(k, size, n_per_class, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = k * n_per_class
    images = torch.randn(n, 1, size, size, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    return RealDataset(name="bench", num_classes=k, class_names=[str(c) for c in range(k)],
                       channels=1, im_size=(size, size), train_images=images,
                       train_labels=labels, test_images=images[:k], test_labels=labels[:k],
                       mean=(0.0,), std=(1.0,))


def run(smoke, reps):
    k, size, ipc, batch_real, inner = (3, 8, 2, 8, 2) if smoke else (10, 28, 50, 256, 10)
    ds = _dataset(k, size, batch_real + 4)
    width = 16 if smoke else 128
    net0 = get_model("convnet", 1, k, (size, size), seed=1, width=width)
    reals = [ds.train_images[ds.train_labels == c][:batch_real] for c in range(k)]
    methods, nets = {}, {}
    for var in VARIANTS:
        m = get_method("dc")(ds, ipc, 0, batch_real=batch_real, inner_loop=inner,
                             compile=var == "pydistill")
        m.images.data = torch.randn(m.images.shape, generator=torch.Generator().manual_seed(3))
        methods[var], nets[var] = m, copy.deepcopy(net0)

    def outer_step(var):
        m, net = methods[var], nets[var]
        syns = [m._syn_class(c) for c in range(k)]
        if var == "eager":
            loss = dc_matching_loss(net, reals, syns, "ours")
            forward, chunk = None, None
        else:
            forward, chunk = m._fast_path(net, bool(dc_mod.bn_layers(net)))
            loss = dc_mod.gradient_matching_loss(net, reals, syns, forward=forward, chunk=chunk)
        m.opt.zero_grad()
        loss.backward()
        m.opt.step()
        for p in net.parameters():
            p.grad = None
        opt = torch.optim.SGD(net.parameters(), lr=0.0)   # lr 0: the same network every rep
        m._train_network(net, opt, forward, chunk)
        return loss.detach()

    start = {v: methods[v].images.detach().clone() for v in VARIANTS}
    losses = {v: outer_step(v) for v in VARIANTS}          # also compiles
    for v in VARIANTS[:2]:
        torch.testing.assert_close(losses[v], losses["eager"], rtol=1e-4, atol=1e-6)
        d = methods[v].images.detach() - start[v]
        d_ref = methods["eager"].images.detach() - start["eager"]
        rel = float((d - d_ref).norm() / d_ref.norm())
        assert rel < 1e-3, f"{v}: image update differs from the anchor's (relative L2 {rel:.2e})"
    res = {v: harness.median_time(lambda v=v: outer_step(v), reps, warmup=0) for v in VARIANTS}
    shape = (f"{k} classes, IPC {ipc}, batch_real {batch_real}/class, 1x{size}x{size}, "
             f"inner_loop {inner}")
    row = dict(problem=shape, **{f"{v}_s": t for v, t in res.items()},
               speedup=res["eager"] / res["pydistill"],
               speedup_eager_net=res["eager"] / res["pydistill_eager"])
    print(f"DC outer step ({shape}): pydistill {res['pydistill']:.2f} s, compile=False "
          f"{res['pydistill_eager']:.2f} s, eager anchor {res['eager']:.2f} s "
          f"(x{row['speedup']:.2f})", flush=True)
    return [row]


def main(argv=None):
    a = harness.parse_bench_args(harness.bench_parser(__doc__, "bench_dc_step", 3), argv)
    rows = run(a.smoke, 1 if a.smoke else a.reps)
    m = harness.machine()
    table = "\n".join([
        f"Machine: {m['cpu']}, {m['threads']} thread(s) used (shared machine: noisy), torch "
        f"{m['torch']}. float32, median s over the reps, the variants in one process. Command: "
        f"`python -m benchmarks.bench_dc_step {' '.join(sys.argv[1:])}`.", "",
        "| problem | pydistill s | pydistill, compile=False s | eager anchor s | speed-up | "
        "speed-up, compile=False |", "|---|---|---|---|---|---|"] + [
        f"| {r['problem']} | {r['pydistill_s']:.2f} | {r['pydistill_eager_s']:.2f} | "
        f"{r['eager_s']:.2f} | {r['speedup']:.2f}× | {r['speedup_eager_net']:.2f}× |"
        for r in rows]) + "\n"
    print(table)
    if not a.smoke:
        harness.write_results(a.name, rows, table, a.out)


if __name__ == "__main__":
    sys.exit(main())
