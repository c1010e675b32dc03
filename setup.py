"""Build titans_ext against the installed torch.

    pip install --no-build-isolation --no-deps -e .

Environment switches:
    TITANS_EXT_CUDA        auto (default) | 0 | 1. auto builds the CUDA kernels when the installed
                           torch is a CUDA build and nvcc is found; 1 fails if that is not so.
    TITANS_EXT_CUDA_ARCHS  CUDA architectures, ";"-separated (default "8.0;9.0a"), or "release"
                           for the wheel's list "8.0;9.0a;10.0;12.0+PTX".
    MAX_JOBS               parallel compile jobs (ninja).
    DEBUG                  1: -O0 -g instead of -O3 -g0.

The compiled libraries use only the LibTorch stable ABI of torch TORCH_TARGET (below), so one
build runs on every torch from that version on (with the CUDA major of the build). The build
writes titans_ext/_build_info.py, which `import titans_ext` checks against the installed torch.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

# The oldest torch whose stable ABI the libraries target (TORCH_TARGET_VERSION).
TORCH_TARGET = (2, 11)
DEVELOPER_ARCHS = "8.0;9.0a"
# sm_80 SASS also runs on sm_86/87/89, sm_100 on sm_103, sm_120 on sm_121; the compute_120 PTX
# lets the driver compile the kernels for newer GPUs. 9.0a code runs only on sm_90 itself.
RELEASE_ARCHS = "8.0;9.0a;10.0;12.0+PTX"
ARCH_PATTERN = re.compile(r"\d+\.\d+[af]?(\+PTX)?")


def _find_cuda_home():
    """The real toolkit folder: an nvcc on PATH may be a wrapper outside it (docs/build.md §3)."""
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


def _torch_version(version):
    """(major, minor) of a torch version string such as "2.14.1+cu130"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _cuda_archs():
    archs = os.environ.get("TITANS_EXT_CUDA_ARCHS", DEVELOPER_ARCHS)
    if archs == "release":
        return RELEASE_ARCHS
    bad = [a for a in archs.split(";") if not ARCH_PATTERN.fullmatch(a)]
    if bad:
        sys.exit(f"titans_ext: TITANS_EXT_CUDA_ARCHS must be \"release\" or \";\"-separated compute capabilities "
                 f"such as 8.0, 9.0a or 12.0+PTX, got {archs!r}")
    return archs


def _nvcc_version(cuda_home):
    """The toolkit's "major.minor": what the kernels were compiled with and libcudart's major."""
    out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    if not found:
        sys.exit(f"titans_ext: cannot read the CUDA version from {cuda_home}/bin/nvcc --version")
    return found.group(1)


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
    """The extension modules and the build stamp (the contents of titans_ext/_build_info.py)."""
    import torch

    target = ".".join(map(str, TORCH_TARGET))
    if _torch_version(torch.__version__) < TORCH_TARGET:
        sys.exit(f"titans_ext: the libraries target the LibTorch stable ABI of torch {target}; build them against "
                 f"torch >= {target}, not {torch.__version__}")
    use_cuda, why_not = _cuda_wanted()
    # Imported after _cuda_wanted() has fixed CUDA_HOME.
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    # Python's sysconfig flags carry -g; -g0 makes the torch-including units ~2x faster to build.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fno-trapping-math: lets loops with clamped float -> int conversions (the MLP kernel's exp)
    # vectorize; results are unchanged, only floating-point traps are assumed off, as in torch.
    # -fno-wrapv undoes the -fwrapv of Python's sysconfig flags: with wrapping int arithmetic
    # defined, an index like W[t * L + i] may wrap, so GCC can neither turn it into a pointer
    # increment nor vectorize the loop (the linear kernels: 190 loops vectorized with -fwrapv, 321
    # without). No code here relies on signed overflow.
    # The bindings see only torch/csrc/stable and torch/headeronly: TORCH_STABLE_ONLY makes an ATen
    # or c10 header an #error, and TORCH_TARGET_VERSION hides what is newer than the target.
    target_version = (TORCH_TARGET[0] << 56) | (TORCH_TARGET[1] << 48)  # as torch/csrc/stable/version.h
    stable_abi = ["-DTORCH_STABLE_ONLY", f"-DTORCH_TARGET_VERSION={target_version:#018x}"]
    cxx_flags = opt + ["-fvisibility=hidden", "-fno-trapping-math", "-fno-wrapv"] + stable_abi
    macros = [("Py_LIMITED_API", "0x030A0000")]
    include_dirs = [str(CSRC)]

    def glob(pattern):
        return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))

    sources = glob("cpu/*.cpp") + ["csrc/binding/ops.cpp", "csrc/binding/ops_step.cpp", "csrc/binding/cpu_isa.cpp",
                                  "csrc/binding/cpu_state_cache.cpp"]
    cuda_sources = glob("cuda/*.cu") + glob("binding/*_cuda.cpp")
    if use_cuda and not cuda_sources:
        use_cuda, why_not = False, "no CUDA sources in csrc/cuda"
    # No -fopenmp: the CPU ops split their work with torch::stable::parallel_for, which runs on
    # torch's own thread pool inside libtorch.
    common = dict(include_dirs=include_dirs, py_limited_api=True, extra_compile_args={"cxx": cxx_flags})
    build_info = dict(TORCH_TARGET=target, TORCH_BUILT_WITH=torch.__version__, CUDA_VERSION=None, CUDA_ARCHS=None)
    if use_cuda:
        archs = _cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        build_info.update(CUDA_VERSION=_nvcc_version(CUDA_HOME), CUDA_ARCHS=archs)
        print(f"titans_ext: building CPU + CUDA kernels for archs {archs}")
        # nvcc compiles only csrc/cuda/*.cu, which never include a torch header (docs/build.md §3).
        nvcc_flags = opt[:1] + ["-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
        # USE_CUDA declares the CUDA entries of torch's C shim (the current stream) to ops_cuda.cpp.
        ext = CUDAExtension("titans_ext._C", sources + cuda_sources, define_macros=macros,
                            **{**common, "extra_compile_args": {"cxx": cxx_flags + ["-DUSE_CUDA"], "nvcc": nvcc_flags}})
    else:
        print(f"titans_ext: building CPU-only ({why_not})")
        ext = CppExtension("titans_ext._C", sources, define_macros=macros, **common)
    # The CUDA kernels' sources compiled by the host compiler against the device layer's CPU
    # emulation (csrc/device/emu/): built in every build, so CI without a GPU runs them. Its binding
    # shares linear_memory_device.h with the CUDA one, so it is a stable-ABI library too.
    emulation = CppExtension("titans_ext._emu",
                             glob("device/emu/*.cpp") + glob("emu/*.cpp")
                             + ["csrc/binding/ops_emu.cpp", "csrc/binding/ops_step_emu.cpp"],
                             define_macros=macros, **common)
    return [ext, emulation], build_info


def _build_ext_with_stamp(build_info):
    """torch's build_ext (ninja), which also writes titans_ext/_build_info.py beside the libraries:
    into the source tree for in-place and editable builds, into the build folder for wheels."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            package = ROOT / "titans_ext" if self.inplace else Path(self.build_lib) / "titans_ext"
            lines = [f"{name} = {value!r}\n" for name, value in build_info.items()]
            stamp = package / "_build_info.py"
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text('"""What this build of titans_ext was compiled for (written by setup.py; checked by '
                             'import titans_ext)."""\n\n' + "".join(lines))

    return BuildExt


def main():
    # _extensions() first: importing torch.utils.cpp_extension fixes its CUDA_HOME, which
    # _cuda_wanted() must have set before.
    ext_modules, build_info = _extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": _build_ext_with_stamp(build_info)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
