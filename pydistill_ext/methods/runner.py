"""Run a registered method with checkpoints, resume, and the standard output files.

``run_distill`` writes into ``out_dir``: ``distilled.safetensors``, ``metrics.json``,
``grid.png`` and (for iterative methods) ``curves.png``; while running it keeps
``checkpoint.pt`` (written atomically every ``checkpoint_seconds``, and after the current
step on Ctrl-C). With
``resume=True`` it continues from that checkpoint; because a method's randomness lives in the
generators of its ``state_dict``, the result equals the uninterrupted run's bit for bit.
"""
from __future__ import annotations

import contextlib
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from pydistill_ext import artifacts as art
from pydistill_ext.methods.base import get_method


def versions() -> Dict[str, str]:
    import numpy
    import pydistill_ext
    return {"pydistill_ext": pydistill_ext.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "platform": platform.platform()}


@contextlib.contextmanager
def _deferred_interrupt():
    """While inside, a first Ctrl-C only sets a flag (the loop checkpoints after the current
    step, so a checkpoint never holds a half-done step); a second one interrupts at once."""
    flag = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_config(method_name, dataset, ipc, seed, iterations, options) -> Dict[str, Any]:
    return {"method": method_name, "dataset": dataset.name, "ipc": ipc, "seed": int(seed),
            "iterations": int(iterations), "options": dict(options)}


def run_distill(method_name: str, dataset, *, ipc: int, seed: int = 0,
                iterations: Optional[int] = None, out_dir, resume: bool = False,
                device: str = "cpu", progress: bool = True, checkpoint_seconds: float = 300.0,
                stop_after: Optional[int] = None, options: Optional[Dict[str, Any]] = None
                ) -> Dict[str, Any]:
    """Run ``method_name`` on ``dataset``; returns the metrics dict (also in metrics.json).

    ``stop_after``: run at most this many iterations in this call, then checkpoint and return
    (time-sliced jobs; the next call with ``resume=True`` continues).
    """
    options = dict(options or {})
    cls = get_method(method_name)
    iterations = cls.default_iterations if iterations is None else int(iterations)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / art.CHECKPOINT_FILE
    config = _run_config(method_name, dataset, ipc, seed, iterations, options)

    torch_threads = torch.get_num_threads()
    method = cls(dataset, ipc, seed, device, **options)
    if hasattr(method, "set_total_iterations"):  # methods with a schedule over the run
        method.set_total_iterations(iterations)
    start, history, elapsed = 0, {"iteration": []}, 0.0
    if resume and ckpt_path.exists():
        ck = art.load_checkpoint(ckpt_path)
        if ck["config"] != config:
            raise ValueError(f"--resume: checkpoint {ckpt_path} was made with {ck['config']}, "
                             f"this run asks for {config}")
        method.load_state_dict(ck["method"])
        start, history, elapsed = ck["iteration"], ck["history"], ck["elapsed"]
    elif resume:
        print(f"--resume: no checkpoint in {out}, starting from iteration 0")

    def checkpoint(it):
        art.save_checkpoint(ckpt_path, {"config": config, "iteration": it, "history": history,
                                        "elapsed": elapsed + (time.perf_counter() - t0),
                                        "method": method.state_dict()})

    t0 = time.perf_counter()
    last_ckpt = t0
    end = iterations if stop_after is None else min(iterations, start + int(stop_after))
    bar = range(start, end)
    if progress and end > start:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"distill {method_name}", initial=start, total=iterations)
    it = start
    with _deferred_interrupt() as interrupted:
        for it in bar:
            metrics = method.step(it)
            history["iteration"].append(it)
            for k, v in metrics.items():
                history.setdefault(k, []).append(float(v))
            if progress and hasattr(bar, "set_postfix") and metrics:
                bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()})
            now = time.perf_counter()
            if interrupted():
                checkpoint(it + 1)
                print(f"\ninterrupted: checkpoint at iteration {it + 1} in {ckpt_path}; "
                      f"continue with --resume")
                raise KeyboardInterrupt
            if now - last_ckpt >= checkpoint_seconds and it + 1 < end:
                checkpoint(it + 1)
                last_ckpt = now
    if end < iterations:
        checkpoint(end)
        return {"config": config, "finished": False, "iteration": end}

    seconds = elapsed + (time.perf_counter() - t0)
    syn = method.synthetic_set()
    syn.meta = {**syn.meta, **config, "dataset": dataset.describe()}
    art.save_distilled(out / art.DISTILLED_FILE, syn)
    pixels = dataset.to_pixels(syn.images)
    art.save_grid(out / art.GRID_FILE, pixels, syn.labels, dataset.num_classes,
                  dataset.class_names)
    if len(history["iteration"]) > 0:
        art.save_curves(out / art.CURVES_FILE, history)
    metrics = {"config": config, "finished": True, "dataset": dataset.describe(),
               "images": len(syn), "soft_labels": syn.soft, "versions": versions(),
               "threads": torch_threads, "seconds": seconds,
               "seconds_per_iteration": seconds / iterations if iterations else 0.0,
               "history": history}
    art.write_json(out / art.METRICS_FILE, metrics)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return metrics
