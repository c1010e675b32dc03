"""Whether the installed torch can load this build of titans_ext.

The compiled libraries use only the LibTorch stable ABI of torch ``TORCH_TARGET``, so they load on
every torch from that version on; a CUDA build also needs a torch with the same CUDA major (the
libraries link that major's CUDA runtime). setup.py records what it built in the build stamp
``titans_ext/_build_info.py``; ``import titans_ext`` checks it here, before loading a library,
so a mismatch gives one readable ImportError instead of an undefined symbol or a missing
``libcudart.so``.
"""

import re

INSTALL_HINT = "pip install --no-build-isolation --no-deps ."


def version_tuple(version):
    """``(major, minor)`` of a version string such as ``"2.14.1+cu130"`` or ``"13.0"``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a version: {version!r}")
    return int(found.group(1)), int(found.group(2))


def describe_build(info):
    """What a build stamp says, in words: "a CUDA 13.0 build (archs 8.0;9.0a) for torch >= 2.11, ..."."""
    kind = "a CPU-only build" if info.CUDA_VERSION is None else (
        f"a CUDA {info.CUDA_VERSION} build (archs {info.CUDA_ARCHS})")
    return f"{kind} for torch >= {info.TORCH_TARGET}, compiled against torch {info.TORCH_BUILT_WITH}"


def incompatibility(info, torch_version, torch_cuda):
    """Why the build stamp ``info`` cannot load on torch ``torch_version`` with CUDA ``torch_cuda``
    (None for a CPU torch), or None when it can."""
    installed = f"torch {torch_version}" + (" (CPU only)" if torch_cuda is None else f" (CUDA {torch_cuda})")
    problem = None
    if version_tuple(torch_version) < version_tuple(info.TORCH_TARGET):
        problem = f"it needs torch >= {info.TORCH_TARGET}. Upgrade torch, or install a titans_ext built for it"
    elif info.CUDA_VERSION is not None:
        built_major = version_tuple(info.CUDA_VERSION)[0]
        if torch_cuda is None:
            problem = (f"its CUDA kernels need a CUDA {built_major} torch. Install one, or build titans_ext "
                       f"without CUDA for this torch: TITANS_EXT_CUDA=0 {INSTALL_HINT}")
        elif version_tuple(torch_cuda)[0] != built_major:
            problem = (f"its CUDA kernels need a CUDA {built_major} torch. Install the titans_ext wheel for CUDA "
                       f"{version_tuple(torch_cuda)[0]}, or build it for this torch: {INSTALL_HINT}")
    if problem is None:
        return None
    return (f"titans_ext cannot load: this is {describe_build(info)}, and the installed {installed} does not "
            f"fit: {problem}")


def check_installed_torch(info, torch_module):
    """Raises the ImportError of :func:`incompatibility` for the installed torch."""
    problem = incompatibility(info, torch_module.__version__, torch_module.version.cuda)
    if problem is not None:
        raise ImportError(problem)
