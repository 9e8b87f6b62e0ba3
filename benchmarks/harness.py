"""Shared benchmark harness: side-by-side medians in one process, peak memory in a fresh
subprocess per variant, results written as JSON + a Markdown table.

Benchmarks are measurements, never timed tests: CI runs them only as a smoke (--smoke).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))  # the oracles/baselines in python/reference


def machine() -> Dict[str, str]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            # torch's CPU allocator asks for transparent huge pages for every tensor when set
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_parser(doc: str, name: str, reps: int):
    """The options every CPU-side benchmark script shares: --smoke (tiny shapes, one rep,
    nothing written), --reps, --out, --name, --threads (applied by :func:`parse_bench_args`)."""
    import argparse
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep, nothing written")
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=name)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (1 on the shared 2-core machine)")
    return p


def parse_bench_args(parser, argv=None):
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    return a


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1, sync=None) -> float:
    """Median wall time in seconds of fn() over reps runs after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak_extra(run: Callable[[], object]) -> int:
    """In a fresh process: run() once as warm-up (and compilation), then the resident-memory
    high-water mark of a second run() above the memory held before it, in bytes."""
    import gc
    run()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark (VmHWM)
    base = current_rss_bytes()
    out = run()
    del out
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return max(hwm - base, 0)


def peak_memory_subprocess(module: str, args: List[str]) -> int:
    """Run `python -m <module> --measure-memory ...` in a fresh process; it prints the peak
    RSS above its baseline (inputs already allocated and touched) in bytes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    # a fixed glibc mmap threshold: every block >= 64 KiB is mapped on allocation and
    # unmapped on free, so memory freed during the warm-up is not silently reused from the
    # heap (which would hide it from the high-water mark)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-m", module, "--measure-memory", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def write_results(name: str, rows: List[dict], table: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f}"
