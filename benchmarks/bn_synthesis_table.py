"""Issue-5 evidence: BN-statistic synthesis (SRe2L, CDA, CV-DD, DeepInversion) with SRe2L's
relabel, beside random real images and Gaussian noise relabelled the same way.

For every SET it runs (pydistill CLI; seed 0)

    pydistill distill --method M --dataset D --ipc IPC --iterations IT --option teacher=T ...
        (random real: pydistill baseline --kind random; noise: --method sre2l --iterations 0,
         whose initialisation is N(0, 1) images in the normalised space)
    pydistill relabel RUN/distilled.safetensors --teacher T --dataset D --epochs E \
        --batch-size B --k K --repeats R --out RUN/relabel_kK

and collects the students' accuracies into benchmarks/results/bn_synthesis_table.{json,md}.
Finished cells are skipped (resumable).

    OMP_NUM_THREADS=1 python -m benchmarks.bn_synthesis_table --dataset mnist --ipc 10 \
        --teacher benchmarks/runs/teachers/mnist_convnet-bn \
        --teachers benchmarks/runs/teachers/mnist_convnet-bn,benchmarks/runs/teachers/mnist_convnet-bn_s1
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
SETS = ("noise", "random", "sre2l", "cda", "deepinversion", "cvdd")


def sh(cmd):
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--sets", nargs="+", default=list(SETS))
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--teacher", required=True)
    p.add_argument("--teachers", default=None, help="comma-separated, for cvdd")
    p.add_argument("--epochs", type=int, default=200, help="relabel / student epochs")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", default=str(HERE / "runs" / "bn_synthesis"))
    p.add_argument("--name", default="bn_synthesis_table")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option for every synthesised set (recorded in the row, "
                        "hashed into the run folder's name)")
    args = p.parse_args(argv)
    opts = dict(kv.split("=", 1) for kv in args.option)
    tag = ("_" + hashlib.sha1(",".join(f"{k}={opts[k]}" for k in sorted(opts)).encode())
           .hexdigest()[:8]) if opts else ""
    exe = [sys.executable, "-m", "pydistill_ext.cli"]
    results = HERE / "results" / f"{args.name}.json"
    for s in args.sets:
        rows = json.loads(results.read_text()) if results.exists() else []
        synth = s not in ("noise", "random")
        key = dict(dataset=args.dataset, ipc=args.ipc, set=s, k=args.k, epochs=args.epochs,
                   iterations=args.iterations if synth else 0)
        if synth and opts:
            key["options"] = opts
        if any(all(r.get(a) == b for a, b in key.items()) and (key.get("options")
               or not r.get("options")) for r in rows):
            continue
        run = (Path(args.runs) / args.dataset
               / f"{s}_ipc{args.ipc}_it{key['iterations']}{tag if synth else ''}")
        if not (run / "distilled.safetensors").exists():
            if s == "random":
                sh(exe + ["baseline", "--kind", "random", "--dataset", args.dataset, "--ipc",
                          args.ipc, "--seed", 0, "--out", run, "--quiet"])
            else:
                method = "sre2l" if s == "noise" else s
                opt = (f"teachers={args.teachers}" if s == "cvdd" and args.teachers
                       else f"teacher={args.teacher}")
                resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
                sh(exe + ["distill", "--method", method, "--dataset", args.dataset, "--ipc",
                          args.ipc, "--iterations", key["iterations"], "--seed", 0,
                          "--option", opt, "--out", run, "--checkpoint-seconds", 120,
                          "--quiet"] + resume
                   + [a for k in sorted(opts) for a in ("--option", f"{k}={opts[k]}")])
        out = run / f"relabel_k{args.k}_e{args.epochs}"
        if not (out / "relabel.json").exists():
            sh(exe + ["relabel", run / "distilled.safetensors", "--teacher", args.teacher,
                      "--dataset", args.dataset, "--epochs", args.epochs, "--batch-size",
                      args.batch_size, "--k", args.k, "--repeats", args.repeats,
                      "--out", out, "--quiet"])
        rec = json.loads((out / "relabel.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        rows = json.loads(results.read_text()) if results.exists() else []
        rows.append({**key, "record": rec,
                     "seconds_per_iteration": metrics.get("seconds_per_iteration")})
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps(rows, indent=2) + "\n")
        write_md(rows, HERE / "results" / f"{args.name}.md")


def _acc(rec):
    import statistics
    accs = rec.get("accuracies") or []
    if not accs:
        return None, None, 0
    return (100 * statistics.fmean(accs), 100 * (statistics.pstdev(accs) if len(accs) > 1 else 0.0),
            len(accs))


NOTES = "## Notes"


def write_md(rows, path):
    """The table; everything from a ``## Notes`` heading on in an existing file is kept."""
    import torch
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES in old:
            notes = "\n" + old[old.index(NOTES):]
    lines = ["| dataset | IPC | set | recover iterations | soft labels (k, epochs) | "
             "student accuracy % (mean ± std) | label storage |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, s, n = _acc(r["record"])
        acc = "" if m is None else f"{m:.2f} ± {s:.2f} ({n} students)"
        st = r["record"].get("storage", {})
        sb = st.get("soft_labels")
        shown = ", ".join(f"{k}={v}" for k, v in sorted((r.get("options") or {}).items()))
        name = r["set"] + (f" ({shown})" if shown else "")
        lines.append(f"| {r['dataset']} | {r['ipc']} | {name} | {r['iterations']} | "
                     f"top-{r['k']}, {r['epochs']} | {acc} | {'' if sb is None else f'{sb / 1e3:.0f} kB'} |")
    lines.append("")
    lines.append(f"Machine: {platform.processor() or platform.machine()}, one thread per process, "
                 f"torch {torch.__version__}. Students: ConvNet-3 trained on the replayed crops "
                 "(SRe2L validate: AdamW 1e-3, cosine), evaluated on the real test set.")
    path.write_text("\n".join(lines) + "\n" + notes)


if __name__ == "__main__":
    main()
