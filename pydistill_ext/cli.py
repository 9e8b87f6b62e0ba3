"""The ``pydistill`` command line.

    pydistill distill  --method NAME --dataset NAME --ipc N [--seed S] [--iterations K] --out DIR [--resume]
    pydistill baseline --kind random|herding|full --dataset NAME --ipc N [--seed S] --out DIR
    pydistill eval     DIR/distilled.safetensors --dataset NAME [--model convnet] [--epochs E] [--repeats R]
    pydistill kd       --teacher digit-recognizer --student convnet-small --dataset mnist [--epochs E]
    pydistill bench    [OPS...]
    pydistill info

``torchrun --nproc_per_node=K -m pydistill_ext.cli eval ...`` spreads the evaluation repeats over
K processes (gloo on CPU, NCCL on GPUs) and gathers them on rank 0. Repeat r always uses seed
``--seed + r``, so the numbers do not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import torch

from pydistill_ext import artifacts as art


def _common(p: argparse.ArgumentParser):
    p.add_argument("--data-root", default=None,
                   help="folder with mnist.npz, fashion_mnist.npz, cifar10-jpeg-q75.tar.xz "
                        "(default: $PYDISTILL_DATA, then ../shared/data beside the checkout)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; use 1 per process when "
                        "several jobs share the cores: OpenMP spin-waits when oversubscribed)")


def _load_dataset(args, zca: bool = False):
    from pydistill_ext.data import load_dataset
    return load_dataset(args.dataset, root=args.data_root, zca=zca)


def _parse_options(pairs: List[str]):
    opts = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise SystemExit(f"--option expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


# ---------------------------------------------------------------------------------------------
def cmd_distill(args) -> int:
    from pydistill_ext.methods import get_method, list_methods, run_distill
    if args.method == "list":
        for name in list_methods():
            cls = get_method(name)
            print(f"{name:12s} {cls.description}")
        return 0
    if args.dataset is None or args.out is None or args.ipc is None:
        raise SystemExit("distill needs --dataset, --ipc and --out")
    get_method(args.method)  # unknown name -> error listing the known ones, before loading data
    ds = _load_dataset(args, zca=args.zca)
    metrics = run_distill(args.method, ds, ipc=args.ipc, seed=args.seed,
                          iterations=args.iterations, out_dir=args.out, resume=args.resume,
                          device=args.device, progress=not args.quiet,
                          checkpoint_seconds=args.checkpoint_seconds, stop_after=args.stop_after,
                          options=_parse_options(args.option))
    if metrics.get("finished"):
        print(f"wrote {Path(args.out) / art.DISTILLED_FILE} ({metrics['images']} images, "
              f"{metrics['seconds']:.1f} s)")
    else:
        print(f"stopped at iteration {metrics['iteration']}; continue with --resume")
    return 0


def cmd_baseline(args) -> int:
    from pydistill_ext.methods import run_distill
    if args.kind != "full" and args.ipc is None:
        raise SystemExit(f"baseline --kind {args.kind} needs --ipc")
    ds = _load_dataset(args, zca=args.zca)
    m = run_distill(args.kind, ds, ipc=args.ipc or 1, seed=args.seed, iterations=0,
                    out_dir=args.out, progress=not args.quiet, device=args.device)
    print(f"wrote {Path(args.out) / art.DISTILLED_FILE} ({m['images']} images)")
    return 0


# ---------------------------------------------------------------------------------------------
def _dist_setup(device: str):
    """(rank, world, device) — initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def cmd_eval(args) -> int:
    syn = art.load_distilled(args.path)
    made_on = syn.meta.get("dataset", {}) if isinstance(syn.meta.get("dataset"), dict) else {}
    ds = _load_dataset(args, zca=bool(made_on.get("zca", False)))
    if made_on.get("name") and made_on["name"] != ds.name:
        raise SystemExit(f"{args.path} was distilled from dataset {made_on['name']!r}, "
                         f"not {ds.name!r}")
    rank, world, device = _dist_setup(args.device)
    for model in args.model:
        _eval_one(args, syn, ds, model, rank, world, device)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()  # rank 0 has written the results; leave together
        dist.destroy_process_group()
    return 0


def _eval_one(args, syn, ds, model, rank, world, device):
    from pydistill_ext.evaluation import EvalConfig, EvalResult, evaluate_synset
    config = EvalConfig(model=model, epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, augment=args.augment, device=device)
    seeds = [args.seed + r for r in range(args.repeats)]
    mine = seeds[rank::world]
    src = Path(args.path).resolve()
    out_dir = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    # finished repeats are kept per rank, so --resume skips them (each repeat is self-seeded)
    partial = out_dir / f".eval_{model}.rank{rank}.partial.json"
    done = {}
    if args.resume and partial.exists():
        prev = json.loads(partial.read_text())
        if prev.get("config") == config.to_dict():
            done = {int(k): tuple(v) for k, v in prev["rows"].items()}

    def keep(seed, acc, secs):
        done[int(seed)] = (acc, secs)
        art.write_json(partial, {"config": config.to_dict(),
                                 "rows": {str(k): list(v) for k, v in done.items()}})

    todo = [s for s in mine if s not in done]
    if todo:
        evaluate_synset(syn.images, syn.labels, ds, config, seeds=todo,
                        progress=not args.quiet and rank == 0, on_result=keep)
    rows = [(s, *done[s]) for s in mine]
    if world > 1:
        import torch.distributed as dist
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted(r for part in gathered for r in part)
    if rank != 0:
        return
    result = EvalResult(model, [r[0] for r in rows], [r[1] for r in rows],
                        [r[2] for r in rows], config.to_dict())
    record = {**result.to_dict(), "processes": world, "distilled": str(args.path),
              "images": len(syn), "dataset": ds.name}
    art.write_json(out_dir / f"eval_{model}.json", record)
    metrics_path = out_dir / art.METRICS_FILE
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        metrics.setdefault("evaluation", {})[model] = record
        art.write_json(metrics_path, metrics)
    for p in out_dir.glob(f".eval_{model}.rank*.partial.json"):
        p.unlink()
    print(f"{ds.name} | {syn.meta.get('method', '?')} | {len(syn)} images | "
          f"{result.summary()} | epochs {args.epochs} | seeds {result.seeds}")


# ---------------------------------------------------------------------------------------------
def cmd_kd(args) -> int:
    from pydistill_ext.methods.kd_experiment import run_kd_experiment
    run_kd_experiment(args)
    return 0


def cmd_bench(args) -> int:
    import importlib
    import pydistill_ext
    root = Path(pydistill_ext.__file__).resolve().parents[1]
    if not (root / "benchmarks" / "harness.py").exists():
        raise SystemExit(f"the micro-benchmarks ship with the source checkout (benchmarks/); "
                         f"not found under {root}")
    sys.path.insert(0, str(root))
    known = {"kd_loss": "benchmarks.bench_kd_loss",
             "fused_linear_kd_loss": "benchmarks.bench_fused_linear_kd_loss",
             "feature_ops": "benchmarks.bench_feature_ops",
             "dm_datadam": "benchmarks.bench_dm_datadam",
             "dsa_augment": "benchmarks.bench_dsa_augment"}
    for op in args.ops or list(known):
        if op not in known:
            raise SystemExit(f"unknown benchmark {op!r}; known: {', '.join(known)}")
        mod = importlib.import_module(known[op])
        mod.main(["--smoke"] if args.smoke else [])
    return 0


def cmd_info(args) -> int:
    from pydistill_ext.info import report
    print(report())
    return 0


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pydistill", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="run a distillation method (--method list shows them)")
    d.add_argument("--method", required=True)
    d.add_argument("--dataset")
    d.add_argument("--ipc", type=int)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--iterations", type=int, default=None)
    d.add_argument("--out")
    d.add_argument("--resume", action="store_true")
    d.add_argument("--zca", action="store_true", help="distil in ZCA-whitened space")
    d.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option (repeatable)")
    d.add_argument("--checkpoint-seconds", type=float, default=300.0)
    d.add_argument("--stop-after", type=int, default=None,
                   help="run at most this many iterations now, checkpoint, exit (time slices)")
    _common(d)
    d.set_defaults(fn=cmd_distill)

    b = sub.add_parser("baseline", help="random / herding / full real-data baseline")
    b.add_argument("--kind", required=True, choices=["random", "herding", "full"])
    b.add_argument("--dataset", required=True)
    b.add_argument("--ipc", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    b.add_argument("--zca", action="store_true")
    _common(b)
    b.set_defaults(fn=cmd_baseline)

    e = sub.add_parser("eval", help="train fresh networks on a set, test on real data")
    e.add_argument("path", help="DIR/distilled.safetensors (or DIR)")
    e.add_argument("--dataset", required=True)
    e.add_argument("--model", nargs="+", default=["convnet"],
                   help="one or more architectures (cross-architecture generalisation)")
    e.add_argument("--epochs", type=int, default=1000)
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--lr", type=float, default=0.01)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--augment", default="dsa", choices=["dsa", "none"])
    e.add_argument("--out", default=None, help="where eval_<model>.json goes (default: beside path)")
    e.add_argument("--resume", action="store_true", help="skip repeats an interrupted eval finished")
    _common(e)
    e.set_defaults(fn=cmd_eval)

    k = sub.add_parser("kd", help="knowledge distillation of a teacher into a student")
    k.add_argument("--teacher", default="digit-recognizer")
    k.add_argument("--student", default="convnet-small")
    k.add_argument("--dataset", default="mnist")
    k.add_argument("--epochs", type=int, default=3)
    k.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    k.add_argument("--alpha", type=float, default=0.1)
    k.add_argument("--temperature", type=float, default=4.0)
    k.add_argument("--divergence", default="forward_kl")
    k.add_argument("--lr", type=float, default=0.05)
    k.add_argument("--batch-size", type=int, default=128)
    k.add_argument("--train-subset", type=int, default=None,
                   help="use only this many training images (class-balanced, seeded)")
    k.add_argument("--out", required=True)
    k.add_argument("--resume", action="store_true")
    _common(k)
    k.set_defaults(fn=cmd_kd)

    be = sub.add_parser("bench", help="the micro-benchmarks, as a table")
    be.add_argument("ops", nargs="*")
    be.add_argument("--smoke", action="store_true", help="tiny shapes, one rep")
    be.set_defaults(fn=cmd_bench)

    i = sub.add_parser("info", help="backends, versions")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ["PYDISTILL_QUIET"] = "1"
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if os.environ.get("PYDISTILL_DEBUG"):
            raise
        print(f"pydistill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
