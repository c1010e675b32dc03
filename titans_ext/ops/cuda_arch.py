"""Whether this build's CUDA kernels run on a device, checked at the first CUDA call per device.

A kernel image runs on a GPU when the build holds SASS for the GPU's architecture or PTX the driver
can compile for it. Without this check a GPU the build does not cover (sm_75, or Blackwell with
a developer build) fails inside the first launch with "no kernel image is available"; here it
gets an error naming its compute capability, the archs built and how to build for it.
The capability comes from torch's cached device properties: no host synchronization.
"""

import re

import torch

from .. import _build_info
from .._compat import INSTALL_HINT

# The kernels use bf16 tensor-core MMA, ldmatrix and cp.async: sm_80 and newer.
MIN_CAPABILITY = (8, 0)
_ARCH = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?")

# device index -> the error for that device (None: supported); filled at its first CUDA call.
_device_errors = {}


def parse_archs(archs):
    """``"8.0;9.0a;12.0+PTX"`` -> ``[((8, 0), "", False), ((9, 0), "a", False), ((12, 0), "", False),
    ((12, 0), "", True)]``: (capability, suffix, is_ptx) of every code image built."""
    images = []
    for arch in archs.split(";"):
        major, minor, suffix, ptx = _ARCH.fullmatch(arch).groups()
        images.append(((int(major), int(minor)), suffix, False))
        if ptx:
            images.append(((int(major), int(minor)), suffix, True))
    return images


def image_runs_on(image, capability):
    """Whether one code image runs on a device of ``capability``: SASS on the same major with an
    equal or higher minor, PTX (JIT-compiled) on any capability at or above its own; an
    arch-specific "a" image only on its exact capability, a family "f" image only in its major."""
    built, suffix, ptx = image
    if suffix == "a":
        return capability == built
    if ptx and not suffix:
        return capability >= built
    return capability[0] == built[0] and capability[1] >= built[1]


def unsupported_reason(archs, capability, device):
    """Why a build with CUDA ``archs`` (None: a CPU-only build) cannot run on ``device`` (a
    description such as "NVIDIA H100 (cuda:0)") of ``capability``, or None when it can."""
    if archs is None:
        return (f"titans_ext was built without CUDA kernels (a CPU-only build), so it cannot run on {device}. "
                f"Build it against a CUDA torch with nvcc present: TITANS_EXT_CUDA=1 {INSTALL_HINT}")
    if any(image_runs_on(image, capability) for image in parse_archs(archs)):
        return None
    cc = f"{capability[0]}.{capability[1]}"
    why = (f"titans_ext's CUDA kernels cannot run on {device}, compute capability {cc}: this build has kernels "
           f"for the archs {archs} only.")
    if capability < MIN_CAPABILITY:
        return (f"{why} The kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                "(bf16 tensor-core MMA, cp.async); on this GPU, run titans_ext on CPU tensors.")
    return f"{why} Build titans_ext for this GPU: TITANS_EXT_CUDA_ARCHS=\"{cc}\" {INSTALL_HINT}"


def _device_reason(index):
    capability = torch.cuda.get_device_capability(index)
    device = f"{torch.cuda.get_device_name(index)} (cuda:{index})"
    return unsupported_reason(_build_info.CUDA_ARCHS, capability, device)


def check_cuda_device(device):
    """Raises a RuntimeError when this build's kernels cannot run on the CUDA ``device``; the
    answer is kept per device, so later calls cost a dict lookup."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_errors:
        _device_errors[index] = _device_reason(index)
    if _device_errors[index] is not None:
        raise RuntimeError(_device_errors[index])


def check_op_device(q):
    """The ops' first check, before any kernel runs. Skipped while torch.compile traces the op's
    Python: the forward's fake kernel checks then (check_fake_device)."""
    if isinstance(q, torch.Tensor) and q.is_cuda and not torch.compiler.is_compiling():
        check_cuda_device(q.device)


def check_fake_device(q):
    """The fake kernels' check, which torch.compile runs when it traces an op. Fake CUDA tensors
    traced on a machine without a GPU (exporting for one) have no device to ask."""
    if q.is_cuda and torch.cuda.is_available():
        check_cuda_device(q.device)
