"""The compiled libraries link only torch's stable interfaces: the LibTorch stable ABI (a C shim),
the stable Python ABI and torch's own thread pool."""

import re
import shutil
import subprocess
import sys

import pytest

import titans_ext
import titans_ext._emu


@pytest.mark.skipif(sys.platform != "linux" or not (shutil.which("nm") and shutil.which("readelf")),
                    reason="needs nm and readelf (binutils)")
@pytest.mark.parametrize("library", [titans_ext._C, titans_ext._emu], ids=["_C", "_emu"])
def test_the_libraries_link_only_stable_interfaces(library):
    """No ATen / c10 C++ symbol (the stable ABI is a C shim), no libtorch_python or libpython (abi3
    module init only) and no OpenMP runtime of their own (torch's thread pool runs the CPU ops)."""
    undefined = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", library.__file__], capture_output=True,
                               text=True, check=True).stdout
    assert not re.findall(r"\b(?:at|c10)::\S+", undefined)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]",
                        subprocess.run(["readelf", "-d", library.__file__], capture_output=True, text=True,
                                       check=True).stdout)
    assert "libtorch_cpu.so" in needed
    assert not [lib for lib in needed if lib.startswith(("libgomp", "libomp", "libtorch_python", "libpython"))]
