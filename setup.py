"""Build pydistill_ext: C++ CPU kernels always, CUDA kernels when torch has CUDA.

Knobs (environment variables):
  PYDISTILL_NO_CUDA=1          never build the CUDA kernels
  PYDISTILL_FORCE_CUDA=1       build them even when torch cannot see a GPU (compile check)
  PYDISTILL_CPU_CAPABILITY     avx512 | avx2 | default (auto-detected from /proc/cpuinfo)
  MAX_JOBS                     parallel compile jobs
Build with `pip install --no-build-isolation -e .` so the installed torch is used.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # the nvcc on PATH may be a wrapper; point torch at the real toolkit
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# at::vec::Vectorized is only vectorized when compiled with the capability defines.
CAPABILITY_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f",
               "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def detect_cpu_capability():
    forced = os.environ.get("PYDISTILL_CPU_CAPABILITY", "").strip().lower()
    if forced:
        if forced not in CAPABILITY_FLAGS:
            sys.exit(f"PYDISTILL_CPU_CAPABILITY must be one of {sorted(CAPABILITY_FLAGS)}, got {forced!r}")
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def want_cuda():
    if os.environ.get("PYDISTILL_NO_CUDA") == "1":
        return False, "PYDISTILL_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if os.environ.get("PYDISTILL_FORCE_CUDA") == "1" or torch.cuda.is_available():
        return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
    return False, "no GPU visible (set PYDISTILL_FORCE_CUDA=1 to build anyway)"


def extensions():
    cap = detect_cpu_capability()
    cxx = ["-O3", "-fopenmp"] + CAPABILITY_FLAGS[cap]  # the C++ standard is torch's choice
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    use_cuda, why = want_cuda()
    print(f"pydistill_ext build: CPU kernels (capability {cap.upper()}); "
          f"CUDA kernels: {'yes' if use_cuda else 'no'} ({why})", flush=True)
    if not use_cuda:
        return [CppExtension("pydistill_ext._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # cuBLAS / cuSPARSE headers of CUDA 13 torch wheels come from the nvidia wheels
    for base in sys.path:
        inc = os.path.join(base, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            include_dirs.append(inc)
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DPYDISTILL_WITH_CUDA"]
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return [CUDAExtension("pydistill_ext._C", sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx + ["-DPYDISTILL_WITH_CUDA"], "nvcc": nvcc},
                          extra_link_args=["-fopenmp"])]


setup(
    packages=find_packages(include=["pydistill_ext", "pydistill_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
