"""``pydistill kd``: a teacher distilled into a small student on real data, beside the same
student trained without the teacher (alpha = 1), over several seeds."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from pydistill_ext import artifacts as art
from pydistill_ext.methods.kd import KDConfig, teacher_inputs, teacher_logits, train_student

TEACHERS = ("digit-recognizer",)


def load_teacher(name: str, device="cpu"):
    if name == "digit-recognizer":
        from pydistill_ext.models import load_digit_recognizer_teacher
        return load_digit_recognizer_teacher(device=device)
    raise ValueError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")


def balanced_subset(labels: torch.Tensor, n: int, num_classes: int, seed: int) -> torch.Tensor:
    if not 0 < n <= labels.numel():
        raise ValueError(f"train_subset must be in [1, {labels.numel()}], got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    per = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    take = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    idx = torch.cat([p[torch.randperm(len(p), generator=gen)[:k]] for p, k in zip(per, take)])
    return idx.sort().values


def _mean_std(xs):
    return (statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def run_kd_experiment(args) -> dict:
    from pydistill_ext.data import load_dataset
    from pydistill_ext.evaluation import test_accuracy
    from pydistill_ext.models import get_model
    from pydistill_ext.methods.runner import versions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.dataset, root=args.data_root)
    teacher = load_teacher(args.teacher, args.device)
    x_train, y_train = ds.train_images, ds.train_labels
    if args.train_subset:
        idx = balanced_subset(y_train, args.train_subset, ds.num_classes, 12345)
        x_train, y_train = x_train[idx], y_train[idx]
    t0 = time.perf_counter()
    t_logits = teacher_logits(teacher, teacher_inputs(ds, teacher, x_train), device=args.device)
    teacher_seconds = time.perf_counter() - t0
    teacher_acc = test_accuracy(teacher, teacher_inputs(ds, teacher, ds.test_images),
                                ds.test_labels, device=args.device)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    print(f"teacher {args.teacher}: {n_teacher} parameters, test accuracy {100 * teacher_acc:.2f} %")

    partial_path = out / "kd_runs.json"
    runs = {}
    if args.resume and partial_path.exists():
        import json
        runs = json.loads(partial_path.read_text())
    variants = {"kd": args.alpha, "no_kd": 1.0}
    histories = {}
    n_student = None
    for seed in args.seeds:
        for variant, alpha in variants.items():
            key = f"{variant}/seed{seed}"
            cfg = KDConfig(epochs=args.epochs, alpha=alpha, temperature=args.temperature,
                           divergence=args.divergence, lr=args.lr, batch_size=args.batch_size,
                           device=args.device)
            if key in runs:
                continue
            student = get_model(args.student, ds.channels, ds.num_classes, ds.im_size, seed=seed)
            n_student = sum(p.numel() for p in student.parameters())
            ckpt = out / f"checkpoint_{variant}_seed{seed}.pt"
            if not args.resume and ckpt.exists():
                ckpt.unlink()
            hist = train_student(student, x_train, y_train, cfg, seed,
                                 soft_targets=None if alpha == 1.0 else t_logits,
                                 test=(ds.test_images, ds.test_labels), checkpoint_path=ckpt,
                                 progress=not args.quiet)
            runs[key] = {"accuracy": hist["test_acc"][-1], "history": hist,
                         "config": cfg.to_dict(), "seed": seed}
            art.write_json(partial_path, runs)
            ckpt.unlink()
            print(f"  {variant:6s} seed {seed}: {100 * hist['test_acc'][-1]:.2f} %  "
                  f"({sum(hist['seconds']):.0f} s)")
    for key, r in runs.items():
        histories[key] = r["history"]
    summary = {}
    for variant in variants:
        accs = [runs[f"{variant}/seed{s}"]["accuracy"] for s in args.seeds]
        m, s = _mean_std(accs)
        summary[variant] = {"mean": m, "std": s, "accuracies": accs}
    if n_student is None:
        n_student = sum(p.numel() for p in get_model(args.student, ds.channels, ds.num_classes,
                                                     ds.im_size, seed=0).parameters())
    metrics = {"teacher": args.teacher, "teacher_parameters": n_teacher,
               "teacher_test_accuracy": teacher_acc, "teacher_logit_seconds": teacher_seconds,
               "student": args.student, "student_parameters": n_student,
               "dataset": ds.describe(), "train_images": int(x_train.shape[0]),
               "seeds": list(args.seeds), "epochs": args.epochs, "alpha": args.alpha,
               "temperature": args.temperature, "divergence": args.divergence,
               "summary": summary, "runs": runs, "versions": versions()}
    art.write_json(out / art.METRICS_FILE, metrics)
    curves = {"epoch": list(range(1, args.epochs + 1))}
    for key, h in sorted(histories.items()):
        curves[f"test_acc {key}"] = h["test_acc"]
    art.save_curves(out / art.CURVES_FILE, curves, x_key="epoch", overlay=True)
    for variant, s in summary.items():
        print(f"{args.student} {variant:6s}: {100 * s['mean']:.2f} ± {100 * s['std']:.2f} % "
              f"over seeds {list(args.seeds)}")
    return metrics
