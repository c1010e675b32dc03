// Launch configuration of the linear_memory kernels: their compile-time types and the cost model
// that the launch rules (value tile, chunk group) minimize.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda/common/launch.cuh"
#include "cuda/common/operands.cuh"
#include "cuda/common/smem.cuh"
#include "cuda/linear_memory_fwd.h"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

// The types of a kernel for input dtype input_t_ (operands.cuh): inputs and outputs of the input's
// role in input_t, gates, states, accumulators in compute_t, MMA operand tiles in operand_t.
// Checkpoints (chunk-start states) and the stored cotangents are kept in the input dtype: bf16
// inputs read their states as bf16 operands anyway, so bf16 checkpoints are the values the forward
// used; fp32 and fp64 keep full precision.
template <typename input_t_>
struct Types {
  using input_t = input_t_;
  using compute_t = kernel::compute_type<input_t>;
  using operand_t = kernel::operand_type<input_t>;
  using checkpoint_t = input_t;
  using Policy = typename kernel::OperandPolicy<input_t>::type;
  // bf16 operand tiles round the state, so the state itself is kept beside them in compute_t; the
  // other dtypes' operand tiles are the state.
  static constexpr bool kSeparateMaster = !std::is_same<operand_t, compute_t>::value;
  // 16-bit inputs may checkpoint every other chunk start only, which the backward recomputes.
  static constexpr bool kMayRecompute = sizeof(input_t) == 2;
  // The forward checkpoints every stride-th chunk start (linear_memory_checkpoint_stride).
  __host__ __device__ static int checkpoint_stride(const MirasParams& m) {
    return linear_memory_checkpoint_stride(int(sizeof(input_t)), m);
  }
};

// The cost model of the launch rules: estimated cycles of one chunk step of a block. Constants are
// estimates for an H100 (mma.sync reaches about two thirds of the tensor peak, docs/kernels.md §5.1),
// to be calibrated against bench/gpu_profile.py:
// - one m16n8k16 bf16 MMA every kCyclesPerMma cycles per SM when enough warps issue;
// - a dependent MMA (the next k-step into the same accumulator) after kMmaLatency cycles;
// - a block barrier kBarrierCycles.
constexpr double kCyclesPerMma = 1.5, kMmaLatency = 32, kBarrierCycles = 100;

// m16n8k16 MMAs of an M x N x K product at the padded sizes, weighted by what one costs for the
// dtype (tf32 k-steps are half as deep; 3xTF32 takes three; fp64 runs on the FMA units).
inline double mma_work(InputType type, int M, int N, int K) {
  const double weight = type == InputType::kBFloat16  ? 1.0
                        : type == InputType::kFloat16 ? 2.0
                        : type == InputType::kFloat32 ? 6.0
                                                      : 64.0;
  const auto r = [](int x) { return double(kernel::round_up(x, kernel::kTileGranule)); };
  return weight * r(M) * r(N) * r(K) / (16.0 * 8.0 * 16.0);
}

// Cycles of a step whose phases run `work` MMAs in total (over `resident` blocks sharing the SM)
// and whose carried chain is `dependent` MMAs deep, across `barriers` barriers: the larger of the
// SM's MMA throughput and the chain's latency.
inline double step_cycles(double work, int64_t resident, double dependent, int barriers) {
  const double throughput = double(resident) * work * kCyclesPerMma;
  const double latency = dependent * kMmaLatency + barriers * kBarrierCycles;
  return throughput > latency ? throughput : latency;
}

}  // namespace lm
}  // namespace titans
