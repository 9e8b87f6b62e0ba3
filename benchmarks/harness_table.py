"""The README's accuracy table, produced by the `pydistill` CLI itself.

For every (dataset, ipc, kind) it runs

    pydistill baseline --kind KIND --dataset DATASET --ipc IPC --seed 0 --out RUNS/DATASET/KIND_ipcIPC
    pydistill eval RUNS/.../distilled.safetensors --dataset DATASET --model MODEL \
        --epochs EPOCHS --repeats REPEATS

and collects the eval records into benchmarks/results/harness_table.{json,md}. A cell whose
eval record already exists is reused, so an interrupted run continues where it stopped.

    python -m benchmarks.harness_table --datasets mnist --ipcs 1 10 --kinds random herding
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER = {  # REFERENCE.md 6.1: the "Random" rows (ConvNet-3), where published
    ("cifar10", 1, "random"): 15.4, ("cifar10", 10, "random"): 31.0,
    ("cifar10", 50, "random"): 50.6,
}


def sh(cmd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist"])
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10])
    p.add_argument("--kinds", nargs="+", default=["random", "herding"])
    p.add_argument("--model", default="convnet")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", default=str(HERE / "runs"))
    p.add_argument("--name", default="harness_table")
    p.add_argument("--subset-seeds", nargs="+", type=int, default=[0],
                   help="--seed of `pydistill baseline` (which real subset is drawn)")
    args = p.parse_args(argv)

    exe = [sys.executable, "-m", "pydistill_ext.cli"]
    results_path = HERE / "results" / f"{args.name}.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    for ds in args.datasets:
        for ipc in args.ipcs:
            for kind, sseed in [(k, s) for k in args.kinds for s in args.subset_seeds]:
                key = dict(dataset=ds, ipc=ipc, method=kind, model=args.model,
                           epochs=args.epochs, subset_seed=sseed)
                if any(all(r.get(k, 0) == v for k, v in key.items()) for r in rows):
                    continue
                out = Path(args.runs) / ds / (f"{kind}_ipc{ipc}" + (f"_s{sseed}" if sseed else ""))
                if not (out / "distilled.safetensors").exists():
                    sh(exe + ["baseline", "--kind", kind, "--dataset", ds, "--ipc", str(ipc),
                              "--seed", str(sseed), "--out", str(out), "--quiet"])
                sh(exe + ["eval", str(out / "distilled.safetensors"), "--dataset", ds,
                          "--model", args.model, "--epochs", str(args.epochs),
                          "--repeats", str(args.repeats), "--quiet"])
                rec = json.loads((out / f"eval_{args.model}.json").read_text())
                rows.append({**key, "images": rec["images"], "mean": 100 * rec["mean"],
                             "std": 100 * rec["std"], "seeds": rec["seeds"],
                             "seconds_per_net": sum(rec["seconds"]) / len(rec["seconds"]),
                             "paper": PAPER.get((ds, ipc, kind))})
                results_path.parent.mkdir(exist_ok=True)
                results_path.write_text(json.dumps(rows, indent=2) + "\n")
                write_md(rows, HERE / "results" / f"{args.name}.md")


def write_md(rows, path):
    import platform
    import torch
    lines = ["| dataset | IPC | method (subset seed) | model | accuracy % (mean ± std) | "
             "nets (seeds) | epochs | paper | s / net |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "" if r.get("paper") is None else f"{r['paper']}"
        ipc = "all" if r["method"] == "full" else r["ipc"]
        method = r["method"] if r["method"] == "full" else f"{r['method']} ({r.get('subset_seed', 0)})"
        lines.append(f"| {r['dataset']} | {ipc} | {method} | {r['model']} | "
                     f"{r['mean']:.2f} ± {r['std']:.2f} | {len(r['seeds'])} ({r['seeds'][0]}–"
                     f"{r['seeds'][-1]}) | {r['epochs']} | {paper} | {r['seconds_per_net']:.0f} |")
    lines.append("")
    lines.append(f"Machine: {platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads, torch {torch.__version__}.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
