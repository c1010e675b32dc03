"""What a build of titans_ext runs on: libraries that link only torch's stable interfaces, the
import check of the build stamp titans_ext/_build_info.py against the installed torch (the stamp
is faked here) and the per-device check of the CUDA archs built (the device's compute capability
is faked here), which turn a mismatch into one readable error."""

import re
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import titans_ext
import titans_ext._emu
from titans_ext import _build_info
from titans_ext._compat import incompatibility
from titans_ext.ops import cuda_arch


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


# --- the build stamp against the installed torch ---

def stamp(target="2.11", built_with="2.14.1+cu130", cuda=None, archs=None):
    return types.SimpleNamespace(TORCH_TARGET=target, TORCH_BUILT_WITH=built_with, CUDA_VERSION=cuda,
                                 CUDA_ARCHS=archs)


CUDA_BUILD = stamp(cuda="13.0", archs="8.0;9.0a")


def test_the_build_stamp_describes_this_build():
    assert _build_info.TORCH_TARGET == "2.11"
    assert _build_info.TORCH_BUILT_WITH == torch.__version__
    assert (_build_info.CUDA_VERSION is None) == (_build_info.CUDA_ARCHS is None)
    assert incompatibility(_build_info, torch.__version__, torch.version.cuda) is None


@pytest.mark.parametrize("info, torch_version, torch_cuda", [
    (stamp(), "2.11.0+cpu", None),            # the target itself
    (stamp(), "2.14.1+cu130", "13.0"),         # a CPU-only build on a CUDA torch
    (stamp(), "3.0.0", None),                  # any newer torch
    (CUDA_BUILD, "2.11.0+cu130", "13.0"),
    (CUDA_BUILD, "2.16.0", "13.2"),            # same CUDA major
    (stamp(), "2.11.0a0+git1234", None),       # a pre-release of the target
])
def test_compatible_torch(info, torch_version, torch_cuda):
    assert incompatibility(info, torch_version, torch_cuda) is None


@pytest.mark.parametrize("info, torch_version, torch_cuda, expected", [
    (stamp(), "2.10.0+cpu", None, r"needs torch >= 2\.11"),
    (CUDA_BUILD, "2.9.1+cu128", "12.8", r"needs torch >= 2\.11"),
    (CUDA_BUILD, "2.14.1+cu128", "12.8", r"need a CUDA 13 torch.*wheel for CUDA 12"),
    (CUDA_BUILD, "2.14.1+cpu", None, r"need a CUDA 13 torch.*TITANS_EXT_CUDA=0"),
])
def test_incompatible_torch_says_what_was_built_and_what_is_installed(info, torch_version, torch_cuda, expected):
    message = incompatibility(info, torch_version, torch_cuda)
    assert message is not None
    assert f"compiled against torch {info.TORCH_BUILT_WITH}" in message
    assert f"torch >= {info.TORCH_TARGET}" in message
    assert f"installed torch {torch_version}" in message
    if info.CUDA_VERSION is not None:
        assert "CUDA 13.0 build (archs 8.0;9.0a)" in message
    assert re.search(expected, message), message


def test_import_with_an_incompatible_stamp_raises_one_import_error():
    """`import titans_ext` in a fresh interpreter whose build stamp targets a torch newer than the
    installed one: the ImportError comes before any library is loaded."""
    script = textwrap.dedent("""
        import sys, types
        import torch
        fake = types.ModuleType("titans_ext._build_info")
        fake.TORCH_TARGET, fake.TORCH_BUILT_WITH, fake.CUDA_VERSION, fake.CUDA_ARCHS = "99.0", "99.0.1", None, None
        sys.modules["titans_ext._build_info"] = fake
        try:
            import titans_ext
        except ImportError as error:
            assert "titans_ext._C" not in sys.modules, "a library was loaded before the check"
            print(error)
        else:
            raise SystemExit("no ImportError")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "needs torch >= 99.0" in result.stdout
    assert f"installed torch {torch.__version__}" in result.stdout


# --- the CUDA archs of a build against a device's compute capability ---

@pytest.mark.parametrize("archs, capability, runs", [
    ("8.0;9.0a", (8, 0), True),
    ("8.0;9.0a", (8, 6), True),     # sm_80 SASS runs on the later 8.x
    ("8.0;9.0a", (8, 9), True),
    ("8.0;9.0a", (9, 0), True),
    ("8.0;9.0a", (7, 5), False),
    ("8.0;9.0a", (10, 0), False),   # no Blackwell image, no PTX
    ("8.0;9.0a", (12, 0), False),
    ("9.0a", (9, 1), False),        # arch-specific: only sm_90
    ("8.0;9.0a;10.0;12.0+PTX", (10, 0), True),
    ("8.0;9.0a;10.0;12.0+PTX", (10, 3), True),
    ("8.0;9.0a;10.0;12.0+PTX", (12, 1), True),
    ("8.0;9.0a;10.0;12.0+PTX", (13, 0), True),  # compute_120 PTX, JIT-compiled by the driver
    ("8.0;9.0a;10.0;12.0+PTX", (11, 0), False),
    ("8.0;9.0a;10.0;12.0+PTX", (7, 5), False),
    ("9.0a+PTX", (10, 0), False),   # arch-specific PTX does not carry forward
])
def test_which_devices_an_arch_list_covers(archs, capability, runs):
    assert (cuda_arch.unsupported_reason(archs, capability, "cuda:0") is None) == runs


@pytest.fixture
def fake_device(monkeypatch):
    """Fakes this build's CUDA archs and the capability query of device 0; returns the list of
    devices queried."""

    def set_device(archs, capability, name="NVIDIA Fake GPU"):
        queries = []
        monkeypatch.setattr(_build_info, "CUDA_ARCHS", archs)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: queries.append(index) or capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: name)
        monkeypatch.setattr(cuda_arch, "_device_errors", {})
        return queries

    return set_device


def test_unsupported_device_error_names_capability_archs_and_how_to_build(fake_device):
    fake_device("8.0;9.0a", (10, 0), "NVIDIA B200")
    with pytest.raises(RuntimeError) as error:
        cuda_arch.check_cuda_device(torch.device("cuda", 0))
    message = str(error.value)
    assert "NVIDIA B200 (cuda:0), compute capability 10.0" in message
    assert "archs 8.0;9.0a" in message
    assert 'TITANS_EXT_CUDA_ARCHS="10.0" pip install --no-build-isolation --no-deps .' in message


def test_a_gpu_older_than_the_kernels_is_told_to_use_the_cpu(fake_device):
    fake_device("8.0;9.0a;10.0;12.0+PTX", (7, 5), "Tesla T4")
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5.*need compute capability 8\.0 or newer.*CPU"):
        cuda_arch.check_cuda_device(torch.device("cuda", 0))


def test_a_cpu_only_build_names_itself(fake_device):
    fake_device(None, (9, 0))
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels.*TITANS_EXT_CUDA=1"):
        cuda_arch.check_cuda_device(torch.device("cuda", 0))


def test_the_capability_is_queried_once_per_device(fake_device):
    queries = fake_device("8.0;9.0a", (9, 0))
    for _ in range(3):
        cuda_arch.check_cuda_device(torch.device("cuda", 0))
    assert queries == [0]
    queries = fake_device("8.0;9.0a", (7, 5))
    for _ in range(2):
        with pytest.raises(RuntimeError):
            cuda_arch.check_cuda_device(torch.device("cuda", 0))
    assert queries == [0]


@pytest.mark.parametrize("op", ["linear_memory", "mlp_memory"])
def test_the_ops_check_the_device_at_their_first_cuda_call(fake_device, op):
    """The public ops on (fake) CUDA tensors stop at the device check, before any kernel."""
    fake_device("8.0;9.0a", (7, 5), "Tesla T4")
    with FakeTensorMode():
        args = [torch.empty(1, 8, 1, 4, device="cuda") for _ in range(3)] + [torch.empty(1, 8, 1, device="cuda")] * 3
        if op == "mlp_memory":
            args.append((torch.empty(1, 1, 8, 4, device="cuda"), torch.empty(1, 1, 4, 8, device="cuda")))
        with pytest.raises(RuntimeError, match=r"Tesla T4 \(cuda:0\), compute capability 7\.5"):
            getattr(titans_ext, op)(*args, chunk_size=4)
