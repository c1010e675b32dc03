"""The device layer's own tests: its self-test kernels run under the CPU SIMT emulation
(``titans_ext._emu``), and nvcc compiles every CUDA kernel source for sm_80 and sm_90a.

Expected values are computed here independently, from CUDA's documented semantics and the PTX
ISA's fragment tables, not from the layer's own tables.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import titans_ext._emu  # noqa: F401  (registers the titans_emu:: operators)

from utils import EMULATION_MODES, set_emulation_modes

emu = torch.ops.titans_emu
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def orderly_emulation():
    set_emulation_modes(-1)
    yield
    set_emulation_modes(-1)


# --- barriers and shared memory ----------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 3])
@pytest.mark.parametrize("threads", [32, 256])
def test_block_reduction_through_shared_memory(threads, seed):
    emu.set_schedule(seed)
    x = torch.randint(-50, 50, (3 * threads - 5,)).float()  # integers: the sums are exact
    out = emu.block_reduce_sum(x, threads)
    expected = torch.nn.functional.pad(x, (0, 5)).view(3, threads).sum(1)
    assert torch.equal(out, expected)


def test_missing_barrier_is_caught_by_the_reordering_mode():
    x = torch.arange(256, dtype=torch.float32)
    expected = 2 * torch.cat([x[:1], x[:-1]])
    # In thread order every left neighbour has already written its slot: the bug stays hidden.
    assert torch.equal(emu.neighbour_exchange(x, False), expected)
    for seed in (0, 1, 2):
        emu.set_schedule(seed)
        wrong = (emu.neighbour_exchange(x, False) != expected).sum().item()
        assert wrong > 10, f"seed {seed}: the reordered schedule should expose the missing barrier"
        assert torch.equal(emu.neighbour_exchange(x, True), expected)


@pytest.mark.parametrize("shift, thread, index", [(3, 61, 64), (-1, 0, -1)])
def test_shared_memory_out_of_bounds_is_reported(shift, thread, index):
    message = (rf"kernel 'shared_read_shifted', block \(0, 0, 0\), thread \({thread}, 0, 0\): "
               rf"shared memory out of bounds: tile\[{index}\], valid indices 0..63")
    with pytest.raises(RuntimeError, match=message):
        emu.shared_read_shifted(shift)
    assert torch.equal(emu.shared_read_shifted(0), torch.arange(64, dtype=torch.float32))


def test_barrier_not_reached_by_every_thread_is_reported():
    with pytest.raises(RuntimeError, match=r"kernel 'partial_barrier', block \(0, 0, 0\), thread \(16, 0, 0\): "
                                           r"exited without reaching the __syncthreads\(\) at .*selftest_kernels.cuh"):
        emu.partial_barrier(16)
    emu.partial_barrier(64)


def test_atomics_on_shared_and_global_memory():
    values = torch.randint(0, 37, (1000,), dtype=torch.int32)
    histogram, total, maximum = emu.atomics(values, 37)
    assert torch.equal(histogram, torch.bincount(values, minlength=37).int())
    assert total.item() == values.sum().item()
    assert maximum.item() == values.max().item()


# --- warp operations ---------------------------------------------------------------------------

def _shuffle_source(lane, kind, arg, width):
    """The lane whose value `lane` receives (CUDA programming guide, warp shuffle functions)."""
    start = lane // width * width
    if kind == "idx":
        return start + arg % width
    if kind == "up":
        return lane - arg if lane - start >= arg else lane
    if kind == "down":
        return lane + arg if lane - start + arg < width else lane
    src = lane ^ arg
    return src if src < start + width else lane


@pytest.mark.parametrize("kind, arg, width", [
    ("idx", 5, 32), ("idx", 35, 32), ("idx", 3, 8),
    ("up", 1, 32), ("up", 3, 8),
    ("down", 1, 32), ("down", 5, 16),
    ("xor", 1, 32), ("xor", 16, 32), ("xor", 6, 4),
])
def test_warp_shuffle(kind, arg, width):
    x = torch.randn(64)
    out = emu.warp_shuffle(x, kind, arg, width)
    for lane in range(64):
        warp, lane_in_warp = divmod(lane, 32)
        src = warp * 32 + _shuffle_source(lane_in_warp, kind, arg, width)
        assert out[lane] == x[src], f"lane {lane}: expected lane {src}'s value"


def test_warp_reductions_and_ballot():
    x = torch.randint(-9, 10, (96,)).float()
    total, maximum, ballot = emu.warp_reduce(x)
    for w in range(3):
        lanes = slice(32 * w, 32 * (w + 1))
        assert (total[lanes] == x[lanes].sum()).all()
        assert (maximum[lanes] == x[lanes].max()).all()
        bits = sum(1 << i for i in range(32) if x[32 * w + i] > 0)
        assert ((ballot[lanes].long() & 0xFFFFFFFF) == bits).all()


# --- tensor-core MMA -----------------------------------------------------------------------------

def _ptx_fragment_table(kind, operand):
    """(row, col) per [lane][element], transcribed from the PTX ISA sections "Matrix Fragments for
    mma.m16n8k16 with floating point type" and "Matrix Fragments for mma.m16n8k8" (.tf32)."""
    table = []
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        if operand == "c":
            table.append([(group if i < 2 else group + 8, tig * 2 + (i & 1)) for i in range(4)])
        elif kind == "m16n8k8_tf32" and operand == "a":
            table.append([(group if i in (0, 2) else group + 8, tig if i in (0, 1) else tig + 4) for i in range(4)])
        elif kind == "m16n8k8_tf32":
            table.append([(tig if i == 0 else tig + 4, group) for i in range(2)])
        elif operand == "a":
            table.append([(group if i < 2 or 4 <= i < 6 else group + 8,
                           tig * 2 + (i & 1) if i < 4 else tig * 2 + (i & 1) + 8) for i in range(8)])
        else:
            table.append([(tig * 2 + (i & 1) if i < 2 else tig * 2 + (i & 1) + 8, group) for i in range(4)])
    return torch.tensor(table, dtype=torch.int32)


MMA_KINDS = ["m16n8k16_bf16", "m16n8k16_fp16", "m16n8k8_tf32"]


@pytest.mark.parametrize("operand", ["a", "b", "c"])
@pytest.mark.parametrize("kind", MMA_KINDS)
def test_mma_fragment_layouts_match_the_ptx_isa(kind, operand):
    table = emu.mma_fragment_layout(kind, operand)
    assert torch.equal(table, _ptx_fragment_table(kind, operand))
    k = 8 if kind == "m16n8k8_tf32" else 16
    rows, cols = {"a": (16, k), "b": (k, 8), "c": (16, 8)}[operand]
    cells = table.view(-1, 2).tolist()
    assert sorted(map(tuple, cells)) == [(r, c) for r in range(rows) for c in range(cols)]  # each element once


def _round_tf32(x):
    """fp32 -> tf32, round to nearest with ties away from zero (cvt.rna.tf32.f32), as float32."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = ((bits + 0x1000) & 0xFFFFE000)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("kind", MMA_KINDS)
def test_mma_matches_a_plain_matmul(kind):
    g = torch.Generator().manual_seed(0)
    k = 8 if kind == "m16n8k8_tf32" else 16
    a, b, c = torch.randn(16, k, generator=g), torch.randn(k, 8, generator=g), torch.randn(16, 8, generator=g)
    d = emu.mma(kind, a, b, c)
    if kind == "m16n8k8_tf32":
        a_in, b_in = _round_tf32(a), _round_tf32(b)
    else:
        dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float16
        a_in, b_in = a.to(dtype).float(), b.to(dtype).float()
    expected = a_in.double() @ b_in.double() + c.double()
    assert (d.double() - expected).abs().max() < 1e-5 * (1 + expected.abs().max())
    # Inputs are rounded to the MMA's type: fp32 inputs would give a visibly different product.
    assert (d.double() - (a.double() @ b.double() + c.double())).abs().max() > 1e-4


# --- ldmatrix -------------------------------------------------------------------------------------

LDMATRIX_TILE = 512  # 16-bit elements of the self-test's shared tile


def _ldmatrix_expected(tile, row_offsets, matrices, trans):
    """Lane l's registers, from the PTX ISA section on ldmatrix: lanes 8i..8i+7 address rows
    0..7 of matrix i; register i of lane l holds (row l // 4, columns 2 (l % 4) + 0, 1) of
    matrix i, or with .trans (rows 2 (l % 4) + 0, 1, column l // 4); lower element in the low half."""
    bits = tile.long() & 0xFFFF
    out = torch.empty(32, matrices, dtype=torch.int64)
    for lane in range(32):
        for i in range(matrices):
            pair = [2 * (lane % 4), 2 * (lane % 4) + 1]
            cells = [(r, lane // 4) for r in pair] if trans else [(lane // 4, c) for c in pair]
            lo, hi = (bits[row_offsets[8 * i + row] + col] for row, col in cells)
            out[lane, i] = lo | hi << 16
    return out


def _ldmatrix_inputs(matrices):
    g = torch.Generator().manual_seed(matrices)
    tile = (torch.randperm(1 << 16, generator=g)[:LDMATRIX_TILE] - (1 << 15)).to(torch.int16)  # distinct
    # Distinct 16-byte aligned rows in a scrambled order; the lanes that supply no row (x1: 8-31,
    # x2: 16-31) pass the end of the tile, which holds no row: their addresses must be ignored.
    row_offsets = torch.full((32,), LDMATRIX_TILE, dtype=torch.int32)
    row_offsets[:8 * matrices] = 8 * torch.randperm(LDMATRIX_TILE // 8, generator=g)[:8 * matrices]
    return tile, row_offsets


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_ldmatrix_matches_the_ptx_layout(matrices, trans):
    tile, row_offsets = _ldmatrix_inputs(matrices)
    registers = emu.ldmatrix(tile, row_offsets, matrices, trans)
    assert torch.equal(registers.long() & 0xFFFFFFFF, _ldmatrix_expected(tile, row_offsets, matrices, trans))


@pytest.mark.parametrize("lane, offset, message", [
    (3, 4, r"thread \(3, 0, 0\): ldmatrix row address tile\[4\] is not 16-byte aligned"),
    (9, LDMATRIX_TILE, r"thread \(9, 0, 0\): shared memory out of bounds: tile\[519\], valid indices 0..511"),
])
def test_ldmatrix_bad_row_address_is_reported(lane, offset, message):
    tile, row_offsets = _ldmatrix_inputs(2)
    row_offsets[lane] = offset
    with pytest.raises(RuntimeError, match=r"kernel 'ldmatrix_x2', block \(0, 0, 0\), " + message):
        emu.ldmatrix(tile, row_offsets, 2, False)


def test_ldmatrix_fragments_feed_the_mma():
    # A [16, 16] row-major through ldmatrix_x4 and B [16, 8] row-major through ldmatrix_x2_trans
    # must give mma.m16n8k16 exactly the fragments of test_mma_matches_a_plain_matmul.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 8, generator=g)
    d = emu.ldmatrix_mma_bf16(a, b)
    expected = a.bfloat16().double() @ b.bfloat16().double()
    assert (d.double() - expected).abs().max() < 1e-5 * (1 + expected.abs().max())


# --- cp.async --------------------------------------------------------------------------------------

CP_ASYNC_CHUNK = 256


@pytest.mark.parametrize("seed", [-1, 3])
@pytest.mark.parametrize("bytes_per_copy", [4, 8, 16])
def test_cp_async_double_buffered_pipeline(bytes_per_copy, seed):
    set_emulation_modes(seed)
    x = torch.randn(3 * CP_ASYNC_CHUNK)
    out = emu.cp_async_pipeline(x, bytes_per_copy, True)
    assert torch.equal(out, x.view(3, CP_ASYNC_CHUNK).flip(1).flatten())


def test_missing_cp_async_wait_reads_shared_memory_before_the_copies_land():
    x = torch.randn(3 * CP_ASYNC_CHUNK)
    # The copies are performed only by the drain after the loop, so every read in the loop sees
    # the fresh block's shared memory (0xff bytes: NaN) instead of x.
    assert torch.isnan(emu.cp_async_pipeline(x, 16, False)).all()
    # Landing at random before their wait, some copies still come too late.
    emu.set_copy_landing(0)
    assert torch.isnan(emu.cp_async_pipeline(x, 16, False)).any()


@pytest.mark.parametrize("src_offset, dst_offset", [(0, 0), (4, 4)])
def test_cp_async_lands_at_the_wait(src_offset, dst_offset):
    x = torch.randn(128 + src_offset)
    assert torch.equal(emu.cp_async_one_group(x, src_offset, dst_offset, True, True), x[src_offset:])


@pytest.mark.parametrize("src_offset, dst_offset, message", [
    (1, 0, r"cp.async source \(global memory\) is not 16-byte aligned"),
    (0, 2, r"cp.async destination stage\[2\] is not 16-byte aligned"),
])
def test_cp_async_misaligned_address_is_reported(src_offset, dst_offset, message):
    x = torch.randn(128 + src_offset)
    with pytest.raises(RuntimeError, match=r"kernel 'cp_async_one_group', block \(0, 0, 0\), thread \(0, 0, 0\): "
                                           + message):
        emu.cp_async_one_group(x, src_offset, dst_offset, True, True)


# Without the wait the copy is never performed; without the commit cp.async.wait_group does not
# cover it (it waits for committed groups only).
@pytest.mark.parametrize("commit, wait", [(True, False), (False, True)], ids=["no-wait", "no-commit"])
def test_cp_async_not_waited_for_at_exit_is_reported(commit, wait):
    with pytest.raises(RuntimeError, match=r"thread \(0, 0, 0\): exited with cp.async copies not waited for \(1;"):
        emu.cp_async_one_group(torch.randn(128), 0, 0, commit, wait)


# --- hazard modes: each catches a kernel with its bug, which the orderly default hides ----------

def _wrong(out, expected):
    return (out != expected).sum().item()


@pytest.mark.parametrize("bytes_per_copy", [4, 16])
def test_refilling_a_buffer_still_being_read_is_caught_by_copy_landing(bytes_per_copy):
    x = torch.randn(4 * CP_ASYNC_CHUNK)
    expected = x.view(4, CP_ASYNC_CHUNK).flip(1).flatten()
    # Without the barrier after reading a buffer, a thread issues the copies that refill it while
    # other threads may still read it. Landing at their wait (a barrier later), the copies never
    # overtake those reads, in any thread order.
    for seed in (-1, 0, 1):
        emu.set_schedule(seed)
        assert torch.equal(emu.cp_async_pipeline(x, bytes_per_copy, True, False), expected)
    for seed in (0, 1, 2):
        set_emulation_modes(seed, ["copy_landing"])
        assert _wrong(emu.cp_async_pipeline(x, bytes_per_copy, True, False), expected) > 0, f"seed {seed}"
        assert torch.equal(emu.cp_async_pipeline(x, bytes_per_copy, True, True), expected)


@pytest.mark.parametrize("ordering", ["shuffle", "ballot"])
def test_collective_used_as_a_fence_is_caught_by_write_visibility(ordering):
    x = torch.randn(32)
    expected = torch.roll(x, -1)
    # Every lane reaches the collective before any passes it, so in the orderly emulation the
    # stores before it look visible after it; on the GPU only __syncwarp orders them.
    assert torch.equal(emu.warp_shared_exchange(x, ordering), expected)
    for seed in (0, 1, 2):
        set_emulation_modes(seed, ["write_visibility"])
        assert _wrong(emu.warp_shared_exchange(x, ordering), expected) > 0, f"seed {seed}"
        assert torch.equal(emu.warp_shared_exchange(x, "syncwarp"), expected)


def test_blocks_reading_each_other_within_a_launch_is_caught_by_block_interleaving():
    x = torch.randint(-20, 20, (16 * 32,)).float()  # integers: the sums are exact
    sums = x.view(16, 32).sum(1)
    expected = sums + torch.cat([sums.new_zeros(1), sums[:-1]])
    # Blocks one after another in grid order: block b - 1 is always done when block b reads.
    assert torch.equal(emu.block_chain(x, True), expected)
    for seed in (0, 1, 2):
        set_emulation_modes(seed, ["block_interleaving"])
        assert _wrong(emu.block_chain(x, True), expected) > 0, f"seed {seed}"
        assert torch.equal(emu.block_chain(x, False), expected)


@pytest.mark.parametrize("mode", EMULATION_MODES)
def test_each_mode_is_reproducible_from_its_seed(mode):
    x = torch.randn(4 * CP_ASYNC_CHUNK)
    runs = {"schedule": lambda: emu.neighbour_exchange(x[:256], False),
            "copy_landing": lambda: emu.cp_async_pipeline(x, 16, True, False),
            "write_visibility": lambda: emu.warp_shared_exchange(x[:32], "shuffle"),
            "block_interleaving": lambda: emu.block_chain(x, True)}
    outputs = []
    for seed in (5, 5, 6):
        set_emulation_modes(seed, [mode])
        outputs.append(runs[mode]())
    same = lambda a, b: torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))  # noqa: E731
    assert same(outputs[0], outputs[1])
    assert not same(outputs[0], outputs[2])


# write_visibility: an atomic acts on shared memory itself, not on the thread's pending copy.
# block_interleaving: each block has its own static __shared__ histogram, also while another
# block runs (one zeroing a histogram that another counts into would lose counts).
@pytest.mark.parametrize("mode", ["write_visibility", "block_interleaving"])
def test_shared_memory_atomics_under_hazard_modes(mode):
    set_emulation_modes(4, [mode])
    values = torch.randint(0, 37, (1000,), dtype=torch.int32)
    histogram, _, _ = emu.atomics(values, 37)
    assert torch.equal(histogram, torch.bincount(values, minlength=37).int())


# --- bf16 / fp16 conversions --------------------------------------------------------------------

def _conversion_inputs():
    specials = torch.tensor([
        0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"),
        3.4e38, -3.4e38, 65504.0, 65519.0, 65520.0, 70000.0,  # fp16 max, last finite, first inf
        1e-40, -1e-40, 1.4e-45, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-8,  # subnormals, fp16 underflow
        1.00390625, 1.01171875, 1.0009765625, 1.0029296875,  # ties (bf16 and fp16) to even
    ], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2000, generator=g) * torch.exp2(torch.randint(-30, 30, (2000,), generator=g).float())
    # Random bit patterns cover every exponent, subnormals and NaNs included.
    bits = torch.randint(-2**31, 2**31 - 1, (2000,), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.cat([specials, wide, bits.view(torch.float32)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_round_trip_matches_torch_rounding(dtype):
    x = _conversion_inputs()
    narrow, back = emu.half_round_trip(x, dtype)
    expected = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.isnan(narrow[nan].float()).all() and torch.isnan(back[nan]).all()
    assert torch.equal(narrow[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert torch.equal(back[~nan], expected[~nan].float())


# --- nvcc -----------------------------------------------------------------------------------------

CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "device").rglob("*.cu"))


def _nvcc_command(source, *mode):
    # Only csrc/ on the include path: this also proves the kernel sources include no torch header.
    # The __CUDA_NO_* macros are the ones torch's CUDAExtension builds with.
    no_implicit_halves = [f"-D__CUDA_NO_{what}__" for what in
                          ("HALF_OPERATORS", "HALF_CONVERSIONS", "BFLOAT16_CONVERSIONS", "HALF2_OPERATORS")]
    return ["nvcc", "-std=c++17", "--expt-relaxed-constexpr", *no_implicit_halves, "-I", str(ROOT / "csrc"),
            *mode, str(source)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernel_sources_include_no_torch_header(source):
    # Preprocessing only (seconds): the build (scripts/setup.sh) already compiles every kernel, with
    # torch's include paths; this shows that the kernels need none of them.
    result = subprocess.run(_nvcc_command(source, "-arch=sm_90a", "-E", "-o", os.devnull), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # minutes per kernel on 2 cores, and the build compiles the same sources
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nvcc_compiles_every_kernel_for_sm80_and_sm90a(source, tmp_path):
    cmd = _nvcc_command(source, "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                        "-c", "-o", str(tmp_path / (source.stem + ".o")))
    # The limit catches a hung compiler, not a slow one: linear_memory_bwd.cu takes about 1.5 minutes
    # of CPU for both architectures, and on a loaded shared machine (load ~12) it and each MLP
    # kernel's compile ran past 5 minutes of wall time.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"warning", result.stderr), result.stderr
