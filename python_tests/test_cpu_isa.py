"""The instruction-set variants of the CPU kernels: the switch, the environment variable, the
matrix product of every variant against a plain loop (a torch-free C++ check, also cross-built
for aarch64 when the tools are there), and both ops at tile-sized shapes under every variant."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import titans_ext
from titans_ext.reference import linear_memory_chunked, mlp_memory_chunked

from mlp_inputs import GRAD_NAMES as MLP_GRAD_NAMES
from mlp_inputs import OUT_NAMES as MLP_OUT_NAMES
from mlp_inputs import mlp_inputs, mlp_outputs_and_grads
from utils import GRAD_NAMES, TOLERANCE, assert_close, import_with_environment, memory_inputs, outputs_and_grads

ROOT = Path(__file__).resolve().parent.parent


def test_supported_variants_run_from_the_baseline_up_to_the_one_in_use():
    supported = titans_ext.supported_cpu_isas()
    assert supported[0] == "default"
    assert supported == [name for name in titans_ext.CPU_ISAS if name in supported]
    assert titans_ext.cpu_isa() in supported


def test_set_cpu_isa_switches_every_supported_variant_and_native_is_the_last():
    previous = titans_ext.cpu_isa()
    try:
        for name in titans_ext.supported_cpu_isas():
            titans_ext.set_cpu_isa(name)
            assert titans_ext.cpu_isa() == name
        titans_ext.set_cpu_isa("default")
        titans_ext.set_cpu_isa("native")
        assert titans_ext.cpu_isa() == titans_ext.supported_cpu_isas()[-1]
    finally:
        titans_ext.set_cpu_isa(previous)


def test_unknown_variant_is_a_value_error():
    with pytest.raises(ValueError, match="name must be one of 'default', 'avx2', 'avx512', 'native', got 'sse4'"):
        titans_ext.set_cpu_isa("sse4")


def test_variant_the_machine_cannot_run_is_a_value_error_naming_the_supported_ones():
    missing = [name for name in titans_ext.CPU_ISAS if name not in titans_ext.supported_cpu_isas()]
    if not missing:
        pytest.skip("this machine runs every variant")
    previous = titans_ext.cpu_isa()
    supported = ", ".join(repr(s) for s in titans_ext.supported_cpu_isas())
    with pytest.raises(ValueError, match=f"cannot run the '{missing[-1]}' variant.*it supports {supported}"):
        titans_ext.set_cpu_isa(missing[-1])
    assert titans_ext.cpu_isa() == previous
    with pytest.raises(RuntimeError, match="cannot run"):  # the operator itself refuses too
        torch.ops.titans_ext.set_cpu_isa(missing[-1])


def _import_with_environment(value):
    return import_with_environment("TITANS_EXT_CPU_ISA", value, "titans_ext.cpu_isa()")


def test_environment_variable_sets_the_variant_at_import():
    result = _import_with_environment("default")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "default"


def test_bad_environment_variable_fails_the_import_naming_it():
    result = _import_with_environment("sse4")
    assert result.returncode != 0
    assert "TITANS_EXT_CPU_ISA" in result.stderr and "got 'sse4'" in result.stderr


# Shapes whose products cover whole register tiles of every variant and ragged edges around them
# (the op tests elsewhere use small heads): chunk 48 with a short last chunk, Dk != Dv.
LINEAR_SHAPE = (1, 110, 2, 40, 72, 48)   # B, T, H, Dk, Dv, chunk
MLP_SHAPE = (1, 80, 1, 24, 3, 32)        # B, T, H, D, E, chunk


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_linear_memory_at_tile_sized_shapes_matches_reference(read):
    B, T, H, Dk, Dv, C = LINEAR_SHAPE
    inputs, init = memory_inputs(B, T, H, Dk, Dv, torch.float64)
    ref = outputs_and_grads(linear_memory_chunked, inputs, init, chunk_size=C, read=read)
    out = outputs_and_grads(titans_ext.linear_memory, inputs, init, chunk_size=C, read=read)
    for name, r, o in zip(["o", "M_T", "S_T"] + GRAD_NAMES, ref, out):
        assert_close(name, r, o, TOLERANCE[torch.float64])


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_mlp_memory_at_tile_sized_shapes_matches_reference(read):
    B, T, H, D, E, C = MLP_SHAPE
    inputs, weights, momentum = mlp_inputs(B, T, H, D, E, torch.float64, seed=5)
    kwargs = dict(chunk_size=C, read=read, activation="gelu")
    ref = mlp_outputs_and_grads(mlp_memory_chunked, inputs, weights, momentum, **kwargs)
    out = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, momentum, **kwargs)
    for name, r, o in zip(MLP_OUT_NAMES + MLP_GRAD_NAMES, ref, out):
        assert_close(name, r, o, TOLERANCE[torch.float64])


def _build_and_run_check(check, compiler, tmp_path, run_prefix=(), extra_flags=()):
    """Builds python_tests/cpp/<check>.cpp with the per-variant kernels and runs it."""
    sources = [ROOT / f"python_tests/cpp/{check}.cpp", ROOT / "csrc/cpu/matmul.cpp", ROOT / "csrc/cpu/cpu_isa.cpp",
               *sorted((ROOT / "csrc/cpu").glob("isa_*.cpp"))]
    exe = tmp_path / check
    subprocess.run([compiler, "-O2", "-std=c++20", *extra_flags, f"-I{ROOT / 'csrc'}", *map(str, sources), "-o",
                    str(exe)], check=True, timeout=600)
    result = subprocess.run([*run_prefix, str(exe)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("check", ["matmul_check", "activation_check"])
def test_kernels_of_every_variant_match_a_plain_loop(check, tmp_path):
    """The matrix product against a triple loop, the activations against libm (python_tests/cpp/).
    The product also runs the register tile of every variant for the baseline target, so the
    AVX-512 variant's blocking and edges are checked on machines without AVX-512."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    out = _build_and_run_check(check, compiler, tmp_path)
    for name in titans_ext.supported_cpu_isas():
        assert f"{name}: " in out, out
    if check == "matmul_check":
        for name in titans_ext.CPU_ISAS:
            assert f"{name} tile, baseline target: " in out, out


def test_matmul_on_aarch64_under_qemu(tmp_path):
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt: g++-aarch64-linux-gnu qemu-user)")
    out = _build_and_run_check("matmul_check", compiler, tmp_path, run_prefix=(qemu,), extra_flags=("-static",))
    assert out.startswith("default: "), out
