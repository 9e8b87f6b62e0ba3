"""The dataset-distillation accuracy table (issue 4 evidence), produced by the `pydistill` CLI.

Each cell is METHOD:DATASET:IPC:ITERATIONS and runs

    pydistill distill --method METHOD --dataset DATASET --ipc IPC --iterations ITERATIONS \
        --seed 0 --out RUNS/DATASET/METHOD_ipcIPC_itITERATIONS
    pydistill eval RUNS/.../distilled.safetensors --dataset DATASET --model convnet \
        --epochs EPOCHS --repeats REPEATS

(ITERATIONS 0 with METHOD random runs `pydistill baseline --kind random` instead). A cell may
carry method options after an ``@``: ``mtt:mnist:10:200@experts=DIR,syn_steps=10`` passes each
``key=value`` as ``--option`` (except ``zca=1``, which distils in ZCA space: ``--zca``) and
names the run folder with a short hash of them. The eval
records are collected into benchmarks/results/methods_table.{json,md} beside the papers'
numbers (REFERENCE.md 6.1). A cell whose record exists is skipped, so an interrupted queue
continues where it stopped; a distillation interrupted mid-run resumes from its checkpoint.

    OMP_NUM_THREADS=1 python -m benchmarks.methods_table [--compile --chunk 32] dm:mnist:1:120 datadam:cifar10:1:100
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# REFERENCE.md 6.1 (ConvNet-3; DC/DSA/DM MNIST and Fashion-MNIST from the
# DatasetCondensation readme, CIFAR-10 from the DATM comparison table)
PAPER = {
    ("mnist", "dc"): {1: 91.7, 10: 97.4, 50: 98.8},
    ("mnist", "dsa"): {1: 88.7, 10: 97.8, 50: 99.2},
    ("mnist", "dm"): {1: 89.7, 10: 97.5, 50: 98.6},
    ("fashion_mnist", "dc"): {1: 70.5, 10: 82.3, 50: 83.6},
    ("fashion_mnist", "dsa"): {1: 70.6, 10: 84.6, 50: 88.7},
    ("fashion_mnist", "dm"): {1: 70.7, 10: 83.5, 50: 88.1},
    ("cifar10", "random"): {1: 15.4, 10: 31.0, 50: 50.6},
    ("cifar10", "dc"): {1: 28.3, 10: 44.9, 50: 53.9},
    ("cifar10", "dsa"): {1: 28.8, 10: 52.1, 50: 60.6},
    ("cifar10", "dm"): {1: 26.0, 10: 48.9, 50: 63.0},
    ("cifar10", "datadam"): {1: 32.0, 10: 54.2, 50: 67.0},
    ("cifar10", "mtt"): {1: 46.3, 10: 65.3, 50: 71.6},
    ("cifar10", "datm"): {1: 46.9, 10: 66.8, 50: 76.1},
}
# the papers' iteration counts (DC/DSA: outer iterations; DM 20k; DataDAM 8k)
PAPER_ITERATIONS = {"dc": 1000, "dsa": 1000, "dm": 20000, "datadam": 8000, "random": 0,
                    "mtt": 5000, "datm": 10000}


def sh(cmd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def parse_cell(text):
    head, _, tail = text.partition("@")
    try:
        method, ds, ipc, its = head.split(":")
        opts = dict(kv.split("=", 1) for kv in tail.split(",")) if tail else {}
        return method, ds, int(ipc), int(its), opts
    except ValueError:
        raise SystemExit(f"cell {text!r}: expected METHOD:DATASET:IPC:ITERATIONS"
                         "[@key=value,...]") from None


def options_tag(opts):
    if not opts:
        return ""
    text = ",".join(f"{k}={opts[k]}" for k in sorted(opts))
    return "_" + hashlib.sha1(text.encode()).hexdigest()[:8]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cells", nargs="*", help="METHOD:DATASET:IPC:ITERATIONS")
    p.add_argument("--rewrite-md", action="store_true",
                   help="rewrite the .md from the recorded .json (no cell needed)")
    p.add_argument("--model", default="convnet")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", default=str(HERE / "runs"))
    p.add_argument("--name", default="methods_table")
    p.add_argument("--compile", action="store_true",
                   help="evaluate with `pydistill eval --compile` (1.6x faster per epoch on CPU)")
    p.add_argument("--chunk", type=int, default=None,
                   help="evaluate with `pydistill eval --chunk N` (gradient in N-row pieces)")
    args = p.parse_args(argv)

    exe = [sys.executable, "-m", "pydistill_ext.cli"]
    results_path = HERE / "results" / f"{args.name}.json"
    for method, ds, ipc, its, opts in map(parse_cell, args.cells):
        rows = json.loads(results_path.read_text()) if results_path.exists() else []
        key = dict(dataset=ds, ipc=ipc, method=method, iterations=its, model=args.model,
                   epochs=args.epochs)
        if opts:
            key["options"] = opts
        if any(all(r.get(k) == v for k, v in key.items()) and (opts or not r.get("options"))
               for r in rows):
            continue
        if method == "random":
            out = Path(args.runs) / ds / f"random_ipc{ipc}"
            if not (out / "distilled.safetensors").exists():
                sh(exe + ["baseline", "--kind", "random", "--dataset", ds, "--ipc", str(ipc),
                          "--seed", "0", "--out", str(out), "--quiet"])
        else:
            out = Path(args.runs) / ds / f"{method}_ipc{ipc}_it{its}{options_tag(opts)}"
            if not (out / "distilled.safetensors").exists():
                resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
                extra = [a for k in sorted(opts) if k != "zca"
                         for a in ("--option", f"{k}={opts[k]}")]
                if opts.get("zca", "0") not in ("0", "false", "False"):
                    extra.append("--zca")
                sh(exe + ["distill", "--method", method, "--dataset", ds, "--ipc", str(ipc),
                          "--iterations", str(its), "--seed", "0", "--out", str(out),
                          "--checkpoint-seconds", "120", "--quiet"] + resume + extra)
        rec_path = out / f"eval_{args.model}.json"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else None
        if rec is None or not (rec["config"]["epochs"] == args.epochs and len(rec["seeds"]) == args.repeats):
            sh(exe + ["eval", str(out / "distilled.safetensors"), "--dataset", ds,
                      "--model", args.model, "--epochs", str(args.epochs),
                      "--repeats", str(args.repeats), "--resume", "--quiet"]
               + (["--compile"] if args.compile else [])
               + (["--chunk", str(args.chunk)] if args.chunk else []))
            rec = json.loads(rec_path.read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        rows = json.loads(results_path.read_text()) if results_path.exists() else []
        rows.append({**key, "mean": 100 * rec["mean"], "std": 100 * rec["std"],
                     "seeds": rec["seeds"],
                     "seconds_per_iteration": metrics.get("seconds_per_iteration"),
                     "seconds_per_net": sum(rec["seconds"]) / len(rec["seconds"]),
                     "eval_compiled": bool(rec["config"].get("compile", False)),
                     "eval_chunk": rec["config"].get("chunk"),
                     "paper": PAPER.get((ds, method), {}).get(ipc),
                     "paper_iterations": PAPER_ITERATIONS.get(method)})
        results_path.parent.mkdir(exist_ok=True)
        results_path.write_text(json.dumps(rows, indent=2) + "\n")
        write_md(rows, HERE / "results" / f"{args.name}.md")
    if args.rewrite_md and results_path.exists():
        write_md(json.loads(results_path.read_text()), HERE / "results" / f"{args.name}.md")


MATRIX_METHODS = ("random", "dc", "dsa", "dm", "datadam", "mtt", "datm")


def matrix_lines(rows, order):
    """One line per (dataset, IPC): each method's longest run (most iterations; iterations in
    parentheses) and, in bold, whether it beats that IPC's random-real row by more than the
    two stds together."""
    cells = {}
    for r in rows:
        k = (r["dataset"], r["ipc"], r["method"])
        if k not in cells or r["iterations"] > cells[k]["iterations"]:
            cells[k] = r
    keys = sorted({(d, i) for d, i, _ in cells}, key=lambda k: (order.get(k[0], 9), k[1]))
    out = ["| dataset | IPC | " + " | ".join(MATRIX_METHODS) + " |",
           "|---|---|" + "---|" * len(MATRIX_METHODS)]
    for d, i in keys:
        base = cells.get((d, i, "random"))
        row = []
        for m in MATRIX_METHODS:
            r = cells.get((d, i, m))
            if r is None:
                row.append("–")
                continue
            text = f"{r['mean']:.2f} ± {r['std']:.2f}"
            if m != "random":
                text += f" ({r['iterations']})"
                if base is not None and r["mean"] - r["std"] > base["mean"] + base["std"]:
                    text = f"**{text}**"
            row.append(text)
        out.append(f"| {d} | {i} | " + " | ".join(row) + " |")
    return out


def _speed_tag(r):
    """How a row was evaluated: " (c)" compiled, " (c32)" compiled with 32-row chunks,
    " (chunk 32)" chunks alone, "" the plain protocol."""
    if r.get("eval_compiled"):
        return f" (c{r.get('eval_chunk') or ''})"
    return f" (chunk {r['eval_chunk']})" if r.get("eval_chunk") else ""


def write_md(rows, path):
    import torch
    order = {"mnist": 0, "fashion_mnist": 1, "cifar10": 2}
    rows = sorted(rows, key=lambda r: (order.get(r["dataset"], 9), r["ipc"], r["method"], r["iterations"]))
    lines = ["Summary: each method's longest run per dataset and IPC, accuracy % (iterations); "
             "**bold**: above random real by more than the two standard deviations together.", ""]
    lines += matrix_lines(rows, order)
    lines += ["", "All runs:", ""]
    lines += ["| dataset | IPC | method | iterations (paper) | accuracy % (mean ± std) | nets | "
              "paper | s / iteration | s / eval net |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "" if r.get("paper") is None else f"{r['paper']}"
        spi = r.get("seconds_per_iteration")
        shown = {k: v for k, v in (r.get("options") or {}).items() if k != "experts"}
        name = r["method"] + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
                              + ")" if shown else "")
        lines.append(f"| {r['dataset']} | {r['ipc']} | {name} | {r['iterations']} "
                     f"({r.get('paper_iterations')}) | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{len(r['seeds'])} | {paper} | {'' if not spi else f'{spi:.1f}'} | "
                     f"{r['seconds_per_net']:.0f}{_speed_tag(r)} |")
    lines.append("")
    lines.append(f"ConvNet-3 evaluation, {rows[0]['epochs'] if rows else ''} epochs (papers: 1000), "
                 f"distillation seed 0. Machine: {platform.processor() or platform.machine()}, "
                 f"one thread per process (OMP_NUM_THREADS=1), torch {torch.__version__}. "
                 "(c): evaluated with `--compile` (torch.compile of the training forward), (cN): "
                 "and `--chunk N` (each minibatch's gradient summed over N-row pieces); the same "
                 "protocol, only the rounding order differs.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
