"""Build titans_ext against the installed torch.

    pip install --no-build-isolation --no-deps -e .

Environment switches:
    TITANS_EXT_CUDA        auto (default) | 0 | 1. auto builds the CUDA kernels when the installed
                           torch is a CUDA build and nvcc is found; 1 fails if that is not so.
    TITANS_EXT_CUDA_ARCHS  CUDA architectures, ";"-separated (default "8.0;9.0a").
    MAX_JOBS               parallel compile jobs (ninja).
    DEBUG                  1: -O0 -g instead of -O3 -g0.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _find_cuda_home():
    """The real toolkit folder: an nvcc on PATH may be a wrapper outside it (build.md §3)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime_api.h").exists():
            return str(home)
    return None


def _cuda_wanted():
    import torch

    mode = os.environ.get("TITANS_EXT_CUDA", "auto").lower()
    if mode in ("0", "false", "no"):
        return False, "TITANS_EXT_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        reasons.append("no CUDA toolkit (nvcc + headers) found")
    if reasons:
        if mode in ("1", "true", "yes"):
            sys.exit("titans_ext: TITANS_EXT_CUDA=1 but " + "; ".join(reasons))
        return False, "; ".join(reasons)
    # Must be set before torch.utils.cpp_extension computes CUDA_HOME.
    os.environ["CUDA_HOME"] = cuda_home
    return True, ""


def _extensions():
    use_cuda, why_not = _cuda_wanted()
    # Imported after _cuda_wanted() has fixed CUDA_HOME.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    # Python's sysconfig flags carry -g; -g0 makes the torch-including units ~2x faster to build.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fno-trapping-math: lets loops with clamped float -> int conversions (the MLP kernel's exp)
    # vectorize; results are unchanged, only floating-point traps are assumed off, as in torch.
    cxx_flags = opt + ["-fvisibility=hidden", "-fno-trapping-math"]
    macros = [("Py_LIMITED_API", "0x030A0000")]
    include_dirs = [str(CSRC)]

    def glob(pattern):
        return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))

    sources = glob("cpu/*.cpp") + ["csrc/binding/ops.cpp", "csrc/binding/cpu_isa.cpp"]
    cuda_sources = glob("cuda/*.cu") + glob("binding/*_cuda.cpp")
    if use_cuda and not cuda_sources:
        use_cuda, why_not = False, "no CUDA sources in csrc/cuda"
    # at::parallel_for, which splits the CPU kernels over (batch, head), is an OpenMP region
    # inlined from ATen's headers: compiled without -fopenmp it silently runs on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    common = dict(include_dirs=include_dirs, py_limited_api=True)
    if use_cuda:
        archs = os.environ.get("TITANS_EXT_CUDA_ARCHS", "8.0;9.0a")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        print(f"titans_ext: building CPU + CUDA kernels for archs {archs}")
        # nvcc compiles only csrc/cuda/*.cu, which never include a torch header (build.md §3).
        nvcc_flags = opt[:1] + ["-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
        ext = CUDAExtension(
            "titans_ext._C",
            sources + cuda_sources,
            define_macros=macros + [("TITANS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags + openmp, "nvcc": nvcc_flags},
            extra_link_args=openmp,
            **common,
        )
    else:
        print(f"titans_ext: building CPU-only ({why_not})")
        ext = CppExtension(
            "titans_ext._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags + openmp},
            extra_link_args=openmp,
            **common,
        )
    # The CUDA kernels' sources compiled by the host compiler against the device layer's CPU
    # emulation (csrc/device/emu/): built in every build, so CI without a GPU runs them.
    emulation = CppExtension(
        "titans_ext._emu",
        glob("device/emu/*.cpp") + glob("emu/*.cpp") + ["csrc/binding/ops_emu.cpp"],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags},
        **common,
    )
    return [ext, emulation]


def main():
    # _extensions() first: importing torch.utils.cpp_extension fixes its CUDA_HOME, which
    # _cuda_wanted() must have set before.
    ext_modules = _extensions()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
