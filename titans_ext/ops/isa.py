"""The instruction-set variant the CPU kernels run: which one is in use, and the switch.

The matrix products of the CPU kernels are compiled once per variant (csrc/cpu/cpu_isa.h), each
with register tiles sized for its vector registers:

- ``"default"``: the compiler's baseline for the architecture (SSE2 on x86-64, NEON on aarch64);
- ``"avx2"``: AVX2 and FMA (x86-64-v3);
- ``"avx512"``: AVX-512F.

At import the best variant the machine supports is in use, unless the environment variable
``TITANS_EXT_CPU_ISA`` names another (any name :func:`set_cpu_isa` takes). Switching lets a
developer on an AVX-512 machine run and measure the AVX2 path.
"""

import torch

CPU_ISAS = ("default", "avx2", "avx512")


def supported_cpu_isas():
    """The variants this build and this machine can run, from the baseline up (the last is the native one)."""
    return list(torch.ops.titans_ext.supported_cpu_isas())


def cpu_isa():
    """The variant in use: ``"default"``, ``"avx2"`` or ``"avx512"``."""
    return torch.ops.titans_ext.cpu_isa()


def set_cpu_isa(name):
    """Switches the CPU kernels to the variant ``name`` (one of :data:`CPU_ISAS`, or ``"native"``
    for the best supported one). Raises ValueError for a variant this machine cannot run."""
    supported = supported_cpu_isas()
    if name != "native" and name not in supported:
        listed = ", ".join(repr(s) for s in supported)
        if name in CPU_ISAS:
            raise ValueError(f"set_cpu_isa: this machine cannot run the {name!r} variant of the CPU kernels; "
                             f"it supports {listed} (\"native\" = {supported[-1]!r})")
        raise ValueError(f"set_cpu_isa: name must be one of {', '.join(repr(s) for s in CPU_ISAS + ('native',))}, "
                         f"got {name!r} (this machine supports {listed})")
    torch.ops.titans_ext.set_cpu_isa(name)
