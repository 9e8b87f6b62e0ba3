"""The ``pydistill`` command line.

    pydistill distill  --method NAME --dataset NAME --ipc N [--seed S] [--iterations K] --out DIR [--resume]
    pydistill baseline --kind random|herding|full --dataset NAME --ipc N [--seed S] --out DIR
    pydistill eval     DIR/distilled.safetensors --dataset NAME [--model convnet] [--epochs E] [--repeats R]
    pydistill experts  --dataset NAME --num-experts K --epochs E --out DIR [--train-subset N] [--sam gsam]
    pydistill squeeze  --dataset NAME [--model convnet-bn] [--epochs E] --out DIR [--resume]
    pydistill relabel  DIR/distilled.safetensors --teacher DIR --dataset NAME --epochs E --batch-size B --k K --out DIR [--repeats R]
    pydistill quantize --teacher DIR --dataset NAME --calibration DIR/distilled.safetensors|real|noise [--weight-bits 8] [--act-bits 8]
    pydistill kd       --teacher digit-recognizer --student convnet-small --dataset mnist [--epochs E]
    pydistill bench    [OPS...]
    pydistill info

``torchrun --nproc_per_node=K -m pydistill_ext.cli eval ...`` spreads the evaluation repeats over
K processes (gloo on CPU, NCCL on GPUs) and gathers them on rank 0. Repeat r always uses seed
``--seed + r``, so the numbers do not depend on the number of processes.
``torchrun --nproc_per_node=K -m pydistill_ext.cli experts ...`` gives each rank a contiguous
slice of the experts (one GPU each); an expert depends only on the buffer seed and its index,
so the buffer is the same for any number of ranks.
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


def cmd_squeeze(args) -> int:
    from pydistill_ext.methods.squeeze import train_teacher
    ds = _load_dataset(args, zca=args.zca)
    r = train_teacher(ds, model=args.model, epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, seed=args.seed, out_dir=args.out,
                      device=args.device, resume=args.resume, progress=not args.quiet,
                      train_subset=args.train_subset)
    print(f"wrote {r['path']}: {args.model} on {ds.name}, test accuracy "
          f"{100 * r['test_accuracy']:.2f} % ({r['seconds']:.0f} s)")
    return 0


def expert_slice(num_experts: int, rank: int, world: int):
    """(first, count) of the experts rank ``rank`` of ``world`` trains: contiguous blocks,
    the first ``num_experts % world`` ranks one larger."""
    base, extra = divmod(num_experts, world)
    count = base + (rank < extra)
    return rank * base + min(rank, extra), count


def cmd_experts(args) -> int:
    from pydistill_ext.methods.trajectory.experts import train_experts
    ds = _load_dataset(args, zca=args.zca)
    rank, world, device = _dist_setup(args.device)
    first, count = expert_slice(args.num_experts, rank, world)
    if count:
        batched = args.batched if args.batched is not None else device.startswith("cuda")
        buf = train_experts(ds, args.model, num_experts=count, epochs=args.epochs, lr=args.lr,
                            batch=args.batch_size, dsa=not args.no_dsa, seed=args.seed,
                            out_dir=args.out, batched=batched, momentum=args.momentum,
                            weight_decay=args.weight_decay, sam=args.sam, rho=args.rho,
                            first_expert=first, group=args.group, device=device,
                            progress=not args.quiet, train_subset=args.train_subset,
                            stop_after_epochs=args.stop_after_epochs)
        print(f"rank {rank}/{world}: experts {first}..{first + count - 1} of {args.out} "
              f"({buf.stats['seconds']:.0f} s of training in this call)")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def cmd_quantize(args) -> int:
    from pydistill_ext.evaluation.protocol import test_accuracy
    from pydistill_ext.methods.squeeze import load_teacher
    from pydistill_ext.quant import quantize_model
    ds = _load_dataset(args)
    net = load_teacher(args.teacher, device=args.device)
    shape = (ds.channels, *ds.im_size)
    if args.calibration == "real":
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(ds.train_images.shape[0], generator=g)[:args.images]
        cal = ds.train_images[idx]
    elif args.calibration == "noise":
        cal = torch.randn(args.images, *shape, generator=torch.Generator().manual_seed(args.seed))
    else:
        cal = art.load_distilled(args.calibration).images[:args.images]
    q = quantize_model(net, cal, weight_bits=args.weight_bits or None,
                       act_bits=args.act_bits or None, per_channel=not args.per_tensor,
                       act_clip=args.act_clip, percentile=args.percentile,
                       fold_bn=not args.no_fold_bn, quantize_input=args.quantize_input)
    fp = test_accuracy(net, ds.test_images, ds.test_labels, device=args.device)
    acc = test_accuracy(q, ds.test_images, ds.test_labels, device=args.device)
    result = {"teacher": str(args.teacher), "dataset": ds.name, "calibration": args.calibration,
              "seed": args.seed, **q.quant_config, "fp32_accuracy": fp, "quantized_accuracy": acc}
    print(f"{ds.name}: fp32 {100 * fp:.2f} %, W{args.weight_bits}A{args.act_bits} "
          f"({args.act_clip}, calibrated on {q.quant_config['calibration_images']} "
          f"{args.calibration} images) {100 * acc:.2f} %")
    if args.out:
        art.write_json(Path(args.out), result)
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


def _gather_rows(rows, rank: int, world: int, key: str) -> list:
    """Every rank's ``rows`` (JSON-able), exchanged through the process group's key-value
    store rather than ``all_gather_object``.

    Why not the collective: gloo runs it on a worker thread that keeps the (Python-made)
    tensors alive until the *next* collective -- here the closing ``barrier`` -- is destroyed,
    on that thread, after the main thread has already returned from ``barrier()``. Dropping
    them takes the GIL; if the main thread is by then finalising the interpreter, the worker
    thread is ended by ``pthread_exit`` inside a C++ destructor and the rank aborts
    ("terminate called without an active exception"). Seen under load, about 1 launch in
    40 (3 in 113); a core dump showed that stack. The store moves bytes, no tensors.
    JSON round-trips floats exactly, so the gathered accuracies are bit-identical.
    """
    from torch.distributed.distributed_c10d import _get_default_store
    store = _get_default_store()
    store.set(f"{key}/{rank}", json.dumps(rows))
    return [json.loads(store.get(f"{key}/{r}")) for r in range(world)]


def eval_lr(lr, syn) -> float:
    """The evaluation lr: ``lr`` if given, else the learned ``syn_lr`` stored in the set
    (trajectory-matching methods evaluate with it, REFERENCE.md 5.7), else 0.01."""
    if lr is not None:
        return float(lr)
    if "syn_lr" in syn.extras:
        return float(syn.extras["syn_lr"].reshape(-1)[0])
    return 0.01


def _eval_one(args, syn, ds, model, rank, world, device):
    from pydistill_ext.evaluation import EvalConfig, EvalResult, evaluate_synset
    config = EvalConfig(model=model, epochs=args.epochs, lr=eval_lr(args.lr, syn),
                        batch_size=args.batch_size, augment=args.augment, device=device,
                        compile=args.compile, chunk=args.chunk)
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
        rows = sorted(r for part in _gather_rows(rows, rank, world, f"eval/{model}")
                      for r in part)
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
             "dc_step": "benchmarks.bench_dc_step",
             "bn_moments": "benchmarks.bench_bn_moments",
             "trajectory": "benchmarks.bench_trajectory",
             "dsa_augment": "benchmarks.bench_dsa_augment"}
    for op in args.ops or list(known):
        if op not in known:
            raise SystemExit(f"unknown benchmark {op!r}; known: {', '.join(known)}")
        mod = importlib.import_module(known[op])
        mod.main(["--smoke"] if args.smoke else [])
    return 0


def cmd_relabel(args) -> int:
    """SRe2L / FKD relabel of a set with a squeeze teacher, soft labels stored as top-k fp16
    logits (pydistill_ext.relabel); --repeats R also trains R students on it (SRe2L validate)."""
    from pydistill_ext.augment import default_strategy
    from pydistill_ext.methods.squeeze import load_teacher
    from pydistill_ext.relabel import relabel, save_relabel, train_on_relabel
    dset = art.load_distilled(args.path)
    teacher = load_teacher(args.teacher, device=args.device)
    flip = args.flip if args.flip is not None else "flip" in default_strategy(args.dataset)
    rs = relabel(dset.images, teacher, epochs=args.epochs, batch_size=args.batch_size, k=args.k,
                 seed=args.seed, crop_scale=tuple(args.crop_scale), flip=flip, mix=args.mix,
                 value_dtype=args.value_dtype, device=args.device, progress=not args.quiet)
    path = save_relabel(args.out, rs)
    sb = rs.storage_bytes()
    result = {"relabel": str(path), "storage": sb, "file_bytes": os.path.getsize(path)}
    print(f"wrote {path}: {sb['crops']} crops, soft labels {sb['soft_labels']} B "
          f"({sb['soft_labels_per_crop']:g} B/crop, {100 * sb['ratio_vs_dense_fp32']:.1f} % of "
          f"dense fp32), augmentation record {sb['augmentation']} B")
    if args.repeats:
        ds = _load_dataset(args)
        accs = []
        for r in range(args.repeats):
            out = train_on_relabel(rs, dset.images, args.model, ds, temperature=args.temperature,
                                   seed=args.seed + r, device=args.device)
            accs.append(out["test_accuracy"])
            print(f"student {args.model} seed {args.seed + r}: {100 * accs[-1]:.2f} %")
        result.update({"model": args.model, "temperature": args.temperature, "accuracies": accs})
    art.write_json(Path(path).parent / "relabel.json", result)
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
    e.add_argument("--lr", type=float, default=None,
                   help="training lr (default: the set's learned step size syn_lr if it has "
                        "one, as MTT/TESLA/DATM/FTD evaluate, else 0.01)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--augment", default="dsa", choices=["dsa", "none"])
    e.add_argument("--compile", action="store_true",
                   help="train through torch.compile(model): faster per epoch once compiled "
                        "(~20 s); results differ from eager only by rounding order")
    e.add_argument("--chunk", type=int, default=None,
                   help="compute each minibatch's gradient in pieces of this many rows (the "
                        "same gradient; faster on a CPU; models without BatchNorm)")
    e.add_argument("--out", default=None, help="where eval_<model>.json goes (default: beside path)")
    e.add_argument("--resume", action="store_true", help="skip repeats an interrupted eval finished")
    _common(e)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("experts", help="train (or continue) an expert-trajectory buffer for "
                                        "mtt / tesla / ftd / datm (torchrun: one slice per rank)")
    x.add_argument("--dataset", required=True)
    x.add_argument("--model", default="convnet")
    x.add_argument("--num-experts", type=int, required=True)
    x.add_argument("--epochs", type=int, required=True)
    x.add_argument("--lr", type=float, default=0.01, help="SGD lr (MTT's buffer: 0.01)")
    x.add_argument("--batch-size", type=int, default=256)
    x.add_argument("--momentum", type=float, default=0.0)
    x.add_argument("--weight-decay", type=float, default=0.0)
    x.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    x.add_argument("--sam", choices=["sam", "gsam"], default=None,
                   help="flat experts (FTD uses gsam)")
    x.add_argument("--rho", type=float, default=0.01)
    x.add_argument("--train-subset", type=int, default=None,
                   help="every expert trains on the same seeded subset of N training images "
                        "(reduced buffers for CPU runs)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--zca", action="store_true")
    x.add_argument("--group", type=int, default=None, help="experts per vmapped group")
    x.add_argument("--batched", dest="batched", action="store_true", default=None,
                   help="vmapped ensemble (default on CUDA)")
    x.add_argument("--sequential", dest="batched", action="store_false",
                   help="one expert after another (default on CPU, measured faster there)")
    x.add_argument("--stop-after-epochs", type=int, default=None,
                   help="train at most this many epochs now (time slices); rerun to continue")
    x.add_argument("--out", required=True)
    _common(x)
    x.set_defaults(fn=cmd_experts)

    q = sub.add_parser("squeeze", help="train a BatchNorm teacher for data-free synthesis")
    q.add_argument("--dataset", required=True)
    q.add_argument("--model", default="convnet-bn")
    q.add_argument("--epochs", type=int, default=10)
    q.add_argument("--lr", type=float, default=0.05)
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--train-subset", type=int, default=None)
    q.add_argument("--zca", action="store_true")
    q.add_argument("--out", required=True)
    q.add_argument("--resume", action="store_true")
    _common(q)
    q.set_defaults(fn=cmd_squeeze)

    rl = sub.add_parser("relabel", help="SRe2L/FKD relabel: top-k fp16 soft labels of every "
                                        "replayed crop (and optionally train students on them)")
    rl.add_argument("path", help="DIR/distilled.safetensors (or DIR)")
    rl.add_argument("--teacher", required=True, help="DIR from `pydistill squeeze`")
    rl.add_argument("--dataset", required=True)
    rl.add_argument("--epochs", type=int, required=True, help="relabelled epochs (= student epochs)")
    rl.add_argument("--batch-size", type=int, default=100)
    rl.add_argument("--k", type=int, required=True, help="logits kept per crop (classes = dense)")
    rl.add_argument("--seed", type=int, default=0)
    rl.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0])
    rl.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                    help="default: no flip for digit datasets")
    rl.add_argument("--mix", default=None, choices=["cutmix", "mixup"])
    rl.add_argument("--value-dtype", default="float16", choices=["float16", "float32"])
    rl.add_argument("--repeats", type=int, default=0, help="students to train on it (0: none)")
    rl.add_argument("--model", default="convnet")
    rl.add_argument("--temperature", type=float, default=1.0)
    rl.add_argument("--out", required=True)
    _common(rl)
    rl.set_defaults(fn=cmd_relabel)

    qz = sub.add_parser("quantize", help="post-training quantization of a teacher, calibrated on "
                                         "a distilled set (e.g. zeroq), real images or noise")
    qz.add_argument("--teacher", required=True, help="DIR from `pydistill squeeze`")
    qz.add_argument("--dataset", required=True)
    qz.add_argument("--calibration", required=True,
                    help="DIR/distilled.safetensors, or 'real' / 'noise' (--images of them)")
    qz.add_argument("--images", type=int, default=64)
    qz.add_argument("--seed", type=int, default=0)
    qz.add_argument("--weight-bits", type=int, default=8, help="0 = float weights")
    qz.add_argument("--act-bits", type=int, default=8, help="0 = float activations")
    qz.add_argument("--per-tensor", action="store_true", help="one weight scale per layer")
    qz.add_argument("--act-clip", default="minmax", choices=["minmax", "percentile", "mse"])
    qz.add_argument("--percentile", type=float, default=99.99)
    qz.add_argument("--no-fold-bn", action="store_true")
    qz.add_argument("--quantize-input", action="store_true")
    qz.add_argument("--out", default=None, help="write the result as JSON here")
    _common(qz)
    qz.set_defaults(fn=cmd_quantize)

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
