// Building blocks shared by the CUDA linear_memory kernels (forward, backward, gate backward),
// written only against the device layer, so the emulation runs them unchanged.
//
// - Operand policies: how a 16x8 output tile's k-step runs on the tensor cores for each input
//   dtype (docs/kernels.md §5.1, §6.1.8-9):
//     bf16 -> mma.m16n8k16 bf16, fp32 accumulate. q, k, v, dO are exact; fp32 operands (states,
//             errors, coefficient-weighted terms) are rounded to bf16 (what fla/FlashQLA do).
//     fp16 -> mma.m16n8k8 tf32, fp32 accumulate. Every fp16 value is exact in tf32 (same 10-bit
//             mantissa), and fp32 operands keep fp32's range, so cotangents and states cannot
//             overflow as they could in fp16 operands.
//     fp32 -> 3xTF32: x = hi + lo (both tf32), hi*hi + hi*lo + lo*hi on mma.m16n8k8: about fp32
//             accuracy (plain tf32 would cost ~3e-4 relative error) at 3 MMAs per k-step.
//     fp64 -> scalar fp64 FMAs with the same tile ownership (no fp64 tensor-core path).
// - Tile loops: an M x N product is cut into 16x8 tiles dealt round-robin to the block's warps;
//   an element's accumulator lives in exactly one lane, which lets epilogues update their output
//   in place. Operands are callables A(r, k), B(k, c) returning compute_t, so transposes, row
//   scalings and concatenations cost no copies; reads outside M x K / K x N give 0. With bf16
//   inputs the same products read their fragments with ldmatrix from bf16 tiles (tile_product):
//   the kernels keep bf16 copies of the fp32 operands, rounded where those are formed.
// - The gate tables of a chunk by column chains (docs/backward_linear.md §0), and the gate-rows kernel
//   that writes what the sequential kernels need of them.
// - A shared-memory carve-up that is identical on host (sizes) and device (pointers), cp.async
//   staging, and the double-buffered chunk loop of the sequential kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda/linear_memory_fwd.h"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

// ---------------------------------------------------------------------------------------------
// Operand policies

struct Bf16Operands {
  using acc_t = float;
  static constexpr int kK = 16;
  template <class A, class B>
  __device__ __forceinline__ static void step(float (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    uint32_t af[4], bf[2];
    for (int i = 0; i < 4; ++i) {  // elements 2i and 2i+1 are neighbours along k
      const device::FragmentCoord at = device::mma_m16n8k16_a_coord(lane, 2 * i);
      af[i] = device::pack_half2<device::bf16>(a(r0 + at.row, k0 + at.col), a(r0 + at.row, k0 + at.col + 1));
    }
    for (int i = 0; i < 2; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k16_b_coord(lane, 2 * i);
      bf[i] = device::pack_half2<device::bf16>(b(k0 + at.row, c0 + at.col), b(k0 + at.row + 1, c0 + at.col));
    }
    device::mma_m16n8k16_bf16(acc, af, bf, acc);
  }
};

template <bool kSplit>
struct Tf32Operands {
  using acc_t = float;
  static constexpr int kK = 8;
  template <class A, class B>
  __device__ __forceinline__ static void step(float (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    float av[4], bv[2];
    uint32_t ah[4], bh[2];
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_a_coord(lane, i);
      av[i] = a(r0 + at.row, k0 + at.col);
      ah[i] = device::float_to_tf32_rna(av[i]);
    }
    for (int i = 0; i < 2; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_b_coord(lane, i);
      bv[i] = b(k0 + at.row, c0 + at.col);
      bh[i] = device::float_to_tf32_rna(bv[i]);
    }
    if constexpr (kSplit) {
      // The small cross terms first, so the big product is added to an accumulator that already
      // holds them (the usual 3xTF32 order).
      uint32_t al[4], bl[2];
      for (int i = 0; i < 4; ++i) al[i] = device::float_to_tf32_rna(av[i] - device::tf32_to_float(ah[i]));
      for (int i = 0; i < 2; ++i) bl[i] = device::float_to_tf32_rna(bv[i] - device::tf32_to_float(bh[i]));
      device::mma_m16n8k8_tf32(acc, al, bh, acc);
      device::mma_m16n8k8_tf32(acc, ah, bl, acc);
    }
    device::mma_m16n8k8_tf32(acc, ah, bh, acc);
  }
};

struct Fp64Operands {
  using acc_t = double;
  static constexpr int kK = 8;
  template <class A, class B>
  __device__ __forceinline__ static void step(double (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
      for (int k = k0; k < k0 + kK; ++k) acc[i] += a(r0 + at.row, k) * b(k, c0 + at.col);
    }
  }
};

template <typename input_t>
struct OperandPolicy;
template <>
struct OperandPolicy<device::bf16> { using type = Bf16Operands; };
template <>
struct OperandPolicy<device::fp16> { using type = Tf32Operands<false>; };
template <>
struct OperandPolicy<float> { using type = Tf32Operands<true>; };
template <>
struct OperandPolicy<double> { using type = Fp64Operands; };

// Threads per block; the warps share each product's 16x8 tiles. A sequential kernel's chunk step
// is a short chain of small products separated by barriers, which four warps keep cheap; the
// parallel kernels are throughput work whose shared memory allows one or two blocks per SM, so
// they take eight warps to hide latency.
constexpr int kSequentialThreads = 128, kParallelThreads = 256;

// Compile-time configuration of a linear_memory kernel.
template <typename input_t_, int kTileV_, int kNThreads_>
struct Traits {
  using input_t = input_t_;
  // fp64 inputs are computed, and their gates and state kept, in fp64; all others in fp32.
  using compute_t = std::conditional_t<std::is_same<input_t, double>::value, double, float>;
  using Policy = typename OperandPolicy<input_t>::type;
  static constexpr int kNThreads = kNThreads_;
  static constexpr int kWarps = kNThreads / device::kWarpSize;
  // Blocks each SM should hold (__launch_bounds__): four sequential blocks (the state tile's rule),
  // two parallel ones. It caps registers at 128 per thread; without it ptxas caps them at 64 and
  // spills.
  static constexpr int kMinBlocksPerSm = kNThreads == kSequentialThreads ? 4 : 2;
  static constexpr int kTileV = kTileV_;  // rows of M and S (value features) per block
};

// Whether a kernel reads its MMA fragments with ldmatrix (mma_bf16_tiles): bf16 inputs whose key
// dimension and chunk are whole 16-element k-steps.
template <typename Ktraits>
__host__ __device__ constexpr bool uses_fragments(int dk, int chunk) {
  return std::is_same<typename Ktraits::Policy, Bf16Operands>::value && dk % 16 == 0 && chunk % 16 == 0;
}

// Leading dimension of a staged [rows, width] tile of T: one 16-byte piece wider than the row,
// so that consecutive rows start in different shared-memory banks.
template <typename T>
__host__ __device__ constexpr int padded(int width) {
  return width + 16 / int(sizeof(T));
}

// Host side: calls f(Traits<input_t, kTileV, kNThreads>{}) for the runtime input type and value
// tile (16 or 32), so each launch is written once for every instantiation.
template <int kNThreads, class F>
auto dispatch(InputType type, int tile_v, const F& f) {
  const auto with_tile = [&](auto tag) {
    using input_t = decltype(tag);
    return tile_v == 32 ? f(Traits<input_t, 32, kNThreads>{}) : f(Traits<input_t, 16, kNThreads>{});
  };
  switch (type) {
    case InputType::kFloat64: return with_tile(double{});
    case InputType::kBFloat16: return with_tile(device::bf16{});
    case InputType::kFloat16: return with_tile(device::fp16{});
    case InputType::kFloat32: break;
  }
  return with_tile(float{});
}

// Host side: the dynamic shared memory of a kernel's carve-up.
template <typename Ktraits, class Layout>
size_t smem_bytes(const Layout& layout) {
  return layout.carver.template bytes<typename Ktraits::compute_t, typename Ktraits::input_t>();
}

// Host side: blocks of Ktraits::kTileV value features covering Dv.
template <typename Ktraits>
int value_tiles(const LinearMemoryParams& p) {
  return (p.dv + Ktraits::kTileV - 1) / Ktraits::kTileV;
}

// ---------------------------------------------------------------------------------------------
// Tile loops

// Calls body(r0, c0) for every 16x8 tile of an M x N output; tiles go round-robin to the warps,
// so the loop is warp-uniform as mma.sync requires.
template <class Body>
__device__ __forceinline__ void for_each_tile(int M, int N, const Body& body) {
  const int tiles_n = (N + 7) / 8, tiles = (M + 15) / 16 * tiles_n;
  const int n_warps = static_cast<int>(blockDim.x) / device::kWarpSize;
  for (int tile = device::warp_id(); tile < tiles; tile += n_warps) body(tile / tiles_n * 16, tile % tiles_n * 8);
}

// acc += A[r0:r0+16, 0:K] B[0:K, c0:c0+8] for an M x K by K x N product.
template <class Policy, class A, class B>
__device__ __forceinline__ void mma_accumulate(typename Policy::acc_t (&acc)[4], int r0, int c0, int M, int N, int K,
                                               const A& a, const B& b) {
  using acc_t = typename Policy::acc_t;
  const auto a_in = [&](int r, int k) -> acc_t { return r < M && k < K ? acc_t(a(r, k)) : acc_t(0); };
  const auto b_in = [&](int k, int c) -> acc_t { return k < K && c < N ? acc_t(b(k, c)) : acc_t(0); };
  for (int k0 = 0; k0 < K; k0 += Policy::kK) Policy::step(acc, a_in, b_in, r0, c0, k0);
}

// bf16 products from ldmatrix fragments: the sequential kernels' path for bf16 inputs.
//
// Operands are bf16 tiles in shared memory, row-major with a leading dimension ld (a multiple of 8
// elements, so that every ldmatrix row is 16-byte aligned; ld = width + 8 keeps the 8 rows of a
// matrix in different banks): A [M, K] by its rows; B either by the rows of B^T ([N, K],
// "n-major", e.g. a state M0 read as M0^T) or by its own rows ([K, N], "k-major", loaded
// transposed). Nothing is bounds-checked: rows of A beyond M and of an n-major B beyond N only
// reach discarded outputs, but the contraction runs to K rounded up to 16, so entries beyond K
// must be zero in both operands (shared memory may hold NaN, and 0 * NaN is NaN).
template <class Ptr>
struct Bf16Tile {
  Ptr base;
  int ld;
};

// acc += A[r0:r0+16, 0:K] B[0:K, c0:c0+8] (fragment layouts: mma.h, ldmatrix.h).
template <bool kBKMajor, class Ptr>
__device__ __forceinline__ void mma_bf16_tiles(float (&acc)[4], int r0, int c0, int K, const Bf16Tile<Ptr>& a,
                                               const Bf16Tile<Ptr>& b) {
  const int lane = device::lane_id();
  const int matrix = lane / 8, row = lane % 8;
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t af[4], bf[2];
    // A's registers a0..a3: rows 0-7 | 8-15 of k 0-7, then of k 8-15.
    device::ldmatrix_x4(af, a.base + ((r0 + matrix % 2 * 8 + row) * a.ld + k0 + matrix / 2 * 8));
    // B's registers b0, b1: k 0-7, k 8-15 (lanes 16-31 repeat the addresses of lanes 0-15).
    if constexpr (kBKMajor)
      device::ldmatrix_x2_trans(bf, b.base + ((k0 + matrix % 2 * 8 + row) * b.ld + c0));
    else
      device::ldmatrix_x2(bf, b.base + ((c0 + row) * b.ld + k0 + matrix % 2 * 8));
    device::mma_m16n8k16_bf16(acc, af, bf, acc);
  }
}

// acc += A B for the 16x8 tile at (r0, c0) of an M x N product: with `fragments` (bf16 inputs
// only) through ldmatrix fragments of the bf16 tiles, else through the policy's loads of the
// operand views a(r, k), b(k, c). Both read the same bf16 values.
template <class Policy, bool kBKMajor, class A, class B, class Tile>
__device__ __forceinline__ void tile_product(typename Policy::acc_t (&acc)[4], int r0, int c0, int M, int N, int K,
                                             const A& a, const B& b, bool fragments, const Tile& a_tile,
                                             const Tile& b_tile) {
  if constexpr (std::is_same<Policy, Bf16Operands>::value) {
    if (fragments) return mma_bf16_tiles<kBKMajor>(acc, r0, c0, K, a_tile, b_tile);
  }
  mma_accumulate<Policy>(acc, r0, c0, M, N, K, a, b);
}

// Calls out(r, c, i) for this lane's accumulator elements i of the tile at (r0, c0) inside M x N.
template <class Out>
__device__ __forceinline__ void for_each_element(int r0, int c0, int M, int N, const Out& out) {
  const int lane = device::lane_id();
  for (int i = 0; i < 4; ++i) {
    const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
    if (r0 + at.row < M && c0 + at.col < N) out(r0 + at.row, c0 + at.col, i);
  }
}

// ---------------------------------------------------------------------------------------------
// Gate tables

// One column of the chunk's gate recurrence (docs/backward_linear.md §0): columns 0..L-1 are c_i,
// column L is a, column L + 1 is g (its sigma is P(1..t)). Per row t:
//   sigma_t = eta_t sigma_{t-1} - theta_t [t == col],   mu_t = beta_t mu_{t-1} + sigma_t,
// and emit(t, mu_t, sigma_t) is called. The multiplicative form never divides, is exact for
// gates equal to 0 or 1, and cannot amplify rounding (every factor is in [0, 1]). Rows above the
// diagonal of a c column come out as exact zeros.
template <typename T, class Gate, class Emit>
__device__ __forceinline__ void gate_column(int col, int L, const Gate& theta, const Gate& eta, const Gate& beta,
                                            const Emit& emit) {
  T mu = col == L ? T(1) : T(0);
  T sigma = col == L + 1 ? T(1) : T(0);
  for (int t = 0; t < L; ++t) {
    sigma = eta[t] * sigma - (col == t ? theta[t] : T(0));
    mu = beta[t] * mu + sigma;
    emit(t, mu, sigma);
  }
}

// The tables the forward and the reverse pass use: c [t * C + i] (zeros above the diagonal), a, g,
// the chunk-end rows m = c[L-1], s = sig[L-1] and p = P(1..L) (p[0]). One thread per column.
template <typename T, class Ptr>
__device__ __forceinline__ void chunk_gate_tables(int L, int C, const Ptr& theta, const Ptr& eta, const Ptr& beta,
                                                  const Ptr& c, const Ptr& a, const Ptr& g, const Ptr& m_end,
                                                  const Ptr& s_end, const Ptr& p) {
  for (int col = threadIdx.x; col < L + 2; col += blockDim.x) {
    gate_column<T>(col, L, theta, eta, beta, [&](int t, T mu, T sigma) {
      if (col < L) {
        c[t * C + col] = mu;
        if (t == L - 1) m_end[col] = mu, s_end[col] = sigma;
      } else if (col == L) {
        a[t] = mu;
      } else {
        g[t] = mu;
        if (t == L - 1) p[0] = sigma;
      }
    });
  }
}

// The gate gradients of a chunk of L tokens from the cotangents of its gate tables
// (docs/backward_linear.md §2): d_c [L, L] (row stride C) of c, d_a and d_g [L] of a and g, d_s [L] of
// the last row of sig and d_p of P(1..L). Builds the tables c, sig [C, C], a, g, P [C] from the
// gates theta, eta, beta [L] (the adjoint overwrites c and sig with its products); prod_a, prod_gb,
// prod_ge [C] are scratch. Calls dtheta(t, value) and deta_dalpha(t, deta, dalpha) for t < L.
// Contains barriers: every thread of the block calls it.
template <typename T, class Ptr, class DTheta, class DEtaAlpha>
__device__ __forceinline__ void chunk_gate_adjoint(int L, int C, const Ptr& theta, const Ptr& eta, const Ptr& beta,
                                                   const Ptr& c, const Ptr& sig, const Ptr& a, const Ptr& g,
                                                   const Ptr& P, const Ptr& d_a, const Ptr& d_g, const Ptr& d_c,
                                                   const Ptr& d_s, T d_p, const Ptr& prod_a, const Ptr& prod_gb,
                                                   const Ptr& prod_ge, const DTheta& dtheta,
                                                   const DEtaAlpha& deta_dalpha) {
  const int tid = threadIdx.x;
  // 1. The forward rows of every column.
  for (int col = tid; col < L + 2; col += blockDim.x) {
    gate_column<T>(col, L, theta, eta, beta, [&](int t, T mu, T sigma) {
      if (col < L) {
        c[t * C + col] = mu;
        sig[t * C + col] = sigma;
      } else if (col == L) {
        a[t] = mu;
      } else {
        g[t] = mu;
        P[t] = sigma;
      }
    });
  }
  __syncthreads();

  // 2. The adjoint recurrence, one thread per column, rows L-1 down to the column's first row:
  //      mubar_t = dmu_t + beta_{t+1} mubar_{t+1},   sigbar_t = mubar_t + eta_{t+1} sigbar_{t+1},
  //    and the products mubar_t mu_{t-1}, sigbar_t sigma_{t-1} whose row sums are dbeta_t, deta_t.
  //    Row t of a c column is overwritten with its products once row t + 1 has read it.
  for (int col = tid; col < L + 2; col += blockDim.x) {
    const auto dmu = [&](int t) { return col < L ? d_c[t * C + col] : col == L ? d_a[t] : d_g[t]; };
    T mubar = dmu(L - 1);
    T sigbar = mubar + (col < L ? d_s[col] : col == L ? T(0) : d_p);
    const int first = col < L ? col : 0;
    for (int t = L - 1; t >= first; --t) {
      if (t < L - 1) {
        mubar = dmu(t) + beta[t + 1] * mubar;
        sigbar = mubar + eta[t + 1] * sigbar;
      }
      // mu_{-1} = (a: 1, g: 0, c: 0), sigma_{-1} = (a: 0, g: 1, c: 0).
      T mu_prev, sigma_prev;
      if (t == 0) {
        mu_prev = col == L ? T(1) : T(0);
        sigma_prev = col == L + 1 ? T(1) : T(0);
      } else if (col < L) {
        mu_prev = c[(t - 1) * C + col];
        sigma_prev = sig[(t - 1) * C + col];
      } else {
        mu_prev = col == L ? a[t - 1] : g[t - 1];
        sigma_prev = col == L ? T(0) : P[t - 1];
      }
      if (col < L) {
        c[t * C + col] = mubar * mu_prev;
        sig[t * C + col] = sigbar * sigma_prev;
      } else if (col == L) {
        prod_a[t] = mubar * mu_prev;
      } else {
        prod_gb[t] = mubar * mu_prev;
        prod_ge[t] = sigbar * sigma_prev;
      }
    }
    if (col < L) dtheta(col, -sigbar);  // the loop ended at t = col
  }
  __syncthreads();

  // 3. dbeta_t and deta_t: row sums of the products (c columns past the row are exact zeros).
  for (int t = tid; t < L; t += blockDim.x) {
    T d_beta = prod_a[t] + prod_gb[t], d_eta = prod_ge[t];
    for (int col = 0; col < L; ++col) {
      d_beta += c[t * C + col];
      d_eta += sig[t * C + col];
    }
    deta_dalpha(t, d_eta, -d_beta);
  }
}

// ---------------------------------------------------------------------------------------------
// Chunk products shared by the kernels (each call is one tile loop, no barrier)

// E = 2 (K M0^T - V) for the block's value tile: calls emit(t, j, E[t, j]) for t < L, j < rows.
// With fragments, through ldmatrix from k_tile and m_tile (the keys and a bf16 copy of M0).
template <class Policy, typename T, class KOp, class VOp, class Ptr, class Tile, class Emit>
__device__ __forceinline__ void chunk_errors(int L, int rows, int dk, const KOp& K, const VOp& V, const Ptr& m0,
                                             bool fragments, const Tile& k_tile, const Tile& m_tile,
                                             const Emit& emit) {
  for_each_tile(L, rows, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, rows, dk, K, [&](int d, int j) { return m0[j * dk + d]; }, fragments,
                                k_tile, m_tile);
    for_each_element(r0, c0, L, rows, [&](int t, int j, int i) { emit(t, j, T(2) * (T(acc[i]) - V(t, j))); });
  });
}

// G = Q K^T with the entries above the diagonal set to zero, into g [L, C]; with fragments,
// through ldmatrix from q_tile and k_tile.
template <class Policy, typename T, class QOp, class KOp, class Ptr, class Tile>
__device__ __forceinline__ void causal_scores(int L, int C, int dk, const QOp& Q, const KOp& K, const Ptr& g,
                                              bool fragments, const Tile& q_tile, const Tile& k_tile) {
  for_each_tile(L, L, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, L, dk, Q, [&](int d, int i) { return K(i, d); }, fragments, q_tile,
                                k_tile);
    for_each_element(r0, c0, L, L, [&](int t, int i, int e) { g[t * C + i] = i <= t ? T(acc[e]) : T(0); });
  });
}

// X [L, 2 tile_v] = A [Z0; Z1]^T for two [rows, Dk] states stacked along the value index: X's
// column j holds A Z0[j]^T and column tile_v + j holds A Z1[j]^T (the columns of a partial
// tile's missing rows are not meaningful). With fragments, through ldmatrix from a_tile (A's rows)
// and z_tile (the bf16 stack [Z0; Z1] in rows 0.. and tile_v..).
template <class Policy, typename T, class AOp, class Ptr, class Tile>
__device__ __forceinline__ void stacked_state_product(int L, int rows, int dk, int tile_v, const AOp& A,
                                                      const Ptr& z0, const Ptr& z1, const Ptr& x, bool fragments,
                                                      const Tile& a_tile, const Tile& z_tile) {
  const auto stacked_t = [&](int d, int col) {
    const int j = col % tile_v;
    return j >= rows ? T(0) : col < tile_v ? z0[j * dk + d] : z1[j * dk + d];
  };
  for_each_tile(L, 2 * tile_v, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, 2 * tile_v, dk, A, stacked_t, fragments, a_tile, z_tile);
    for_each_element(r0, c0, L, 2 * tile_v, [&](int t, int col, int i) { x[t * 2 * tile_v + col] = T(acc[i]); });
  });
}

// Deterministic block-wide sums of N values per thread: warp butterflies, then the warps' partial
// sums added in warp order by every thread. scratch holds N * warps values. Contains barriers.
template <int N, typename T, class Scratch>
__device__ __forceinline__ void block_sum(T (&values)[N], const Scratch& scratch) {
  const int n_warps = static_cast<int>(blockDim.x) / device::kWarpSize;
  for (int i = 0; i < N; ++i) values[i] = device::warp_reduce_sum(values[i]);
  if (device::lane_id() == 0)
    for (int i = 0; i < N; ++i) scratch[i * n_warps + device::warp_id()] = values[i];
  __syncthreads();
  for (int i = 0; i < N; ++i) {
    values[i] = T(0);
    for (int w = 0; w < n_warps; ++w) values[i] += scratch[i * n_warps + w];
  }
  __syncthreads();  // scratch may be reused at once
}

// ---------------------------------------------------------------------------------------------
// Shared memory

// Carves the dynamic shared memory into arrays of compute_t followed by arrays of input_t (the
// staged q, k, v, dO tiles keep their own, often narrower, dtype). Offsets are in elements of
// each type; the same code runs on the host (to size the launch) and on the device. Every array
// starts 16-byte aligned (compute_t has at least 4 bytes, input_t at least 2), as 16-byte
// vector accesses and cp.async need.
struct SmemCarver {
  static constexpr int kComputeAlign = 4, kInputAlign = 8;  // elements
  int compute_elems = 0, input_elems = 0;
  __host__ __device__ int compute(int n) {
    const int at = compute_elems;
    compute_elems += (n + kComputeAlign - 1) / kComputeAlign * kComputeAlign;
    return at;
  }
  __host__ __device__ int input(int n) {
    const int at = input_elems;
    input_elems += (n + kInputAlign - 1) / kInputAlign * kInputAlign;
    return at;
  }
  template <typename compute_t, typename input_t>
  __host__ __device__ size_t bytes() const {
    return size_t(compute_elems) * sizeof(compute_t) + size_t(input_elems) * sizeof(input_t);
  }
};

// The launch's dynamic shared memory as an array of T (a function of its own, so that each type's
// extern declaration sits in its own scope).
template <typename T>
__device__ __forceinline__ device::SharedPtr<T> dynamic_shared() {
  TITANS_DYNAMIC_SHARED(T, base);
  return base;
}

// Pointers for a carve-up: compute_t arrays at the start, input_t arrays after them. compute_t is
// a multiple of input_t in size for every dtype pair used.
template <typename compute_t, typename input_t>
struct SmemBase {
  static_assert(sizeof(compute_t) % sizeof(input_t) == 0, "input arrays must stay aligned");
  device::SharedPtr<compute_t> compute_base;
  device::SharedPtr<input_t> input_base;
  int input_start;  // in input_t elements
  __device__ explicit SmemBase(const SmemCarver& carver)
      : compute_base(dynamic_shared<compute_t>()), input_base(dynamic_shared<input_t>()),
        input_start(carver.compute_elems * int(sizeof(compute_t) / sizeof(input_t))) {}
  __device__ device::SharedPtr<compute_t> compute(int offset) const { return compute_base + offset; }
  __device__ device::SharedPtr<input_t> input(int offset) const { return input_base + (input_start + offset); }
};

// ---------------------------------------------------------------------------------------------
// Per-token indexing

__device__ __forceinline__ index_t token_offset(const TokenTensor& x, int b, int t, int h) {
  return index_t(b) * x.batch_stride + index_t(t) * x.seq_stride + index_t(h) * x.head_stride;
}

// Offset of (b, t, h, feature 0) in a contiguous [B, T, H, D] tensor.
__device__ __forceinline__ index_t contiguous_token_offset(int b, int t, int h, int seqlen, int heads, int d) {
  return ((index_t(b) * seqlen + t) * heads + h) * d;
}

// Offset of chunk n's start state in a contiguous [B, H, n_chunks, 2, Dv, Dk] buffer (M, then S
// at + Dv * Dk): the forward's chunk states and the backward's chunk cotangents.
__device__ __forceinline__ index_t chunk_state_offset(const LinearMemoryParams& p, index_t bh, int n) {
  return (bh * p.n_chunks + n) * 2 * index_t(p.dv) * p.dk;
}

// Tokens in chunk n (the last chunk may be short).
__device__ __forceinline__ int chunk_length(const SequenceParams& p, int n) {
  const int left = p.seqlen - n * p.chunk_size;
  return left < p.chunk_size ? left : p.chunk_size;
}

// Value features in the tile starting at v0 (the last tile may be partial).
__device__ __forceinline__ int tile_rows(const LinearMemoryParams& p, int v0, int tile_v) {
  return p.dv - v0 < tile_v ? p.dv - v0 : tile_v;
}

// Where a block of a parallel kernel works: grid.x enumerates (chunk, value tile) with the tiles
// of one chunk adjacent (they read the same Q, K and gates), grid.y the head and grid.z the batch.
struct ChunkTileBlock {
  int n, tile, v0, rows;  // chunk, value tile, its first feature and its feature count
  int t0, L;              // the chunk's first token and its length
  __device__ ChunkTileBlock(const LinearMemoryParams& p, int tile_v)
      : n(blockIdx.x / ((p.dv + tile_v - 1) / tile_v)), tile(blockIdx.x % ((p.dv + tile_v - 1) / tile_v)),
        v0(tile * tile_v), rows(tile_rows(p, v0, tile_v)), t0(n * p.chunk_size), L(chunk_length(p, n)) {}
};

// Staging. Tiles go from global to shared memory through cp.async, so that the sequential
// kernels can load chunk n + 1 while they compute on chunk n. A staging call only issues the
// copies: the caller commits them (device::cp_async_commit), waits for them
// (device::cp_async_wait) and then passes a __syncthreads before any thread reads the tile.
// Rows whose starts are not all 16-byte aligned (odd feature counts, strided views) are copied
// element by element instead, which is complete at once.

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Copies rows r < count of `width` elements, row r from src + row_offset(r), into
// dst + r * dst_stride: in 16-byte pieces when `vectors` (the caller has checked that every row
// start, in global and in shared memory, is 16-byte aligned and that width fills whole pieces).
template <typename T, class RowOffset, class Dst>
__device__ __forceinline__ void stage_rows_async(const T* src, const RowOffset& row_offset, int count, int width,
                                                 int dst_stride, bool vectors, const Dst& dst) {
  constexpr int kPiece = 16 / sizeof(T);
  if (vectors) {
    const int pieces = width / kPiece;
    for (int idx = threadIdx.x; idx < count * pieces; idx += blockDim.x) {
      const int r = idx / pieces, at = idx % pieces * kPiece;
      device::cp_async_16(dst + (r * dst_stride + at), src + (row_offset(r) + at));
    }
  } else {
    for (int idx = threadIdx.x; idx < count * width; idx += blockDim.x) {
      const int r = idx / width, col = idx % width;
      dst[r * dst_stride + col] = src[row_offset(r) + col];
    }
  }
}

// dst[0 .. n) = src[0 .. n) (dst 16-byte aligned, as every carved array is).
template <typename T, class Dst>
__device__ __forceinline__ void stage_span(const T* src, int n, const Dst& dst) {
  const bool vectors = aligned16(src) && n % (16 / sizeof(T)) == 0;
  stage_rows_async(src, [](int) { return index_t(0); }, 1, n, n, vectors, dst);
}

// Tokens t0..t0+L-1 of a token tensor, features [col0, col0 + width), into a [L, dst_stride]
// array of its own dtype.
template <typename T, class Dst>
__device__ __forceinline__ void stage_token_rows(const TokenTensor& x, int b, int h, int t0, int L, int col0,
                                                 int width, int dst_stride, const Dst& dst) {
  constexpr int kPiece = 16 / sizeof(T);
  const bool vectors = aligned16(x.ptr) && x.batch_stride % kPiece == 0 && x.seq_stride % kPiece == 0 &&
                       x.head_stride % kPiece == 0 && col0 % kPiece == 0 && width % kPiece == 0 &&
                       dst_stride % kPiece == 0;
  stage_rows_async(static_cast<const T*>(x.ptr), [&](int t) { return token_offset(x, b, t0 + t, h) + col0; }, L,
                   width, dst_stride, vectors, dst);
}

// The same for a contiguous [B, T, H, D] tensor (the backward's workspaces).
template <typename T, class Dst>
__device__ __forceinline__ void stage_contiguous_token_rows(const T* src, const LinearMemoryParams& p, int d, int b,
                                                            int h, int t0, int L, int col0, int width, int dst_stride,
                                                            const Dst& dst) {
  constexpr int kPiece = 16 / sizeof(T);
  const bool vectors = aligned16(src) && d % kPiece == 0 && col0 % kPiece == 0 && width % kPiece == 0 &&
                       dst_stride % kPiece == 0;
  stage_rows_async(src, [&](int t) { return contiguous_token_offset(b, t0 + t, h, p.seqlen, p.heads, d) + col0; }, L,
                   width, dst_stride, vectors, dst);
}

// The chunk loop of a sequential kernel, software-pipelined over two buffers: chunk i + 1 (in walk
// order; reverse: from the last chunk down) is staged by stage(n, buffer) while body(n, buffer)
// computes on chunk i. body runs after a barrier that follows the wait for its chunk's copies, and
// a barrier follows it, so the next stage may overwrite the buffer it read.
template <class Stage, class Body>
__device__ __forceinline__ void pipelined_chunk_loop(int n_chunks, bool reverse, const Stage& stage, const Body& body) {
  const auto chunk = [&](int i) { return reverse ? n_chunks - 1 - i : i; };
  if (n_chunks > 0) stage(chunk(0), 0);
  device::cp_async_commit();
  for (int i = 0; i < n_chunks; ++i) {
    const int buffer = i & 1;
    if (i + 1 < n_chunks) stage(chunk(i + 1), buffer ^ 1);
    device::cp_async_commit();  // possibly an empty group, so that wait<1> always means "chunk i"
    device::cp_async_wait<1>();
    __syncthreads();
    body(chunk(i), buffer);
    __syncthreads();
  }
  device::cp_async_wait<0>();
}

// Completes this thread's staging at once (the parallel kernels, which stage once); a
// __syncthreads must still follow before other threads read the tiles.
__device__ __forceinline__ void finish_staging() {
  device::cp_async_commit();
  device::cp_async_wait<0>();
}

// Stages the gates of tokens t0..t0+L-1 into shared memory (beta = 1 - alpha).
template <typename compute_t, class Ptr>
__device__ __forceinline__ void stage_gates(const SequenceParams& params, int b, int h, int t0, int L,
                                            const Ptr& theta, const Ptr& eta, const Ptr& beta) {
  const auto* theta_in = static_cast<const compute_t*>(params.theta.ptr);
  const auto* eta_in = static_cast<const compute_t*>(params.eta.ptr);
  const auto* alpha_in = static_cast<const compute_t*>(params.alpha.ptr);
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    theta[t] = theta_in[token_offset(params.theta, b, t0 + t, h)];
    eta[t] = eta_in[token_offset(params.eta, b, t0 + t, h)];
    beta[t] = compute_t(1) - alpha_in[token_offset(params.alpha, b, t0 + t, h)];
  }
}

// The full gate tables of a chunk in shared memory (the parallel kernels): the chunk's gates and,
// built from them, c [C, C], a, g, m_end, s_end, p (chunk_gate_tables).
struct GateTablesSmem {
  int c, a, g, m_end, s_end, theta, eta, beta, p;
  __host__ __device__ GateTablesSmem(SmemCarver& carver, int chunk)
      : c(carver.compute(chunk * chunk)), a(carver.compute(chunk)), g(carver.compute(chunk)),
        m_end(carver.compute(chunk)), s_end(carver.compute(chunk)), theta(carver.compute(chunk)),
        eta(carver.compute(chunk)), beta(carver.compute(chunk)), p(carver.compute(1)) {}
};

template <typename T>
struct GateTables {
  device::SharedPtr<T> c, a, g, m_end, s_end, theta, eta, beta, p;
  template <class Base>
  __device__ GateTables(const Base& smem, const GateTablesSmem& at)
      : c(smem.compute(at.c)), a(smem.compute(at.a)), g(smem.compute(at.g)), m_end(smem.compute(at.m_end)),
        s_end(smem.compute(at.s_end)), theta(smem.compute(at.theta)), eta(smem.compute(at.eta)),
        beta(smem.compute(at.beta)), p(smem.compute(at.p)) {}
  // The gates of tokens t0..t0+L-1 (plain loads, complete at once).
  __device__ void stage(const LinearMemoryParams& params, int b, int h, int t0, int L) const {
    stage_gates<T>(params, b, h, t0, L, theta, eta, beta);
  }
  // The tables, from the staged gates (after a barrier).
  __device__ void build(int L, int C) const { chunk_gate_tables<T>(L, C, theta, eta, beta, c, a, g, m_end, s_end, p); }
};

// dst0[i], dst1[i] = src0[offset + i], src1[offset + i] for i < n; a null source gives zeros.
template <typename T, class Ptr>
__device__ __forceinline__ void load_state_pair(const T* src0, const T* src1, index_t offset, int n, const Ptr& dst0,
                                                const Ptr& dst1) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    dst0[i] = src0 ? src0[offset + i] : T(0);
    dst1[i] = src1 ? src1[offset + i] : T(0);
  }
}

// dst0[offset + i], dst1[offset + i] = src0[i], src1[i] for i < n.
template <typename T, class Ptr>
__device__ __forceinline__ void store_state_pair(const Ptr& src0, const Ptr& src1, index_t offset, int n, T* dst0,
                                                 T* dst1) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    dst0[offset + i] = src0[i];
    dst1[offset + i] = src1[i];
  }
}

// The gate rows of a chunk (layout at linear_memory_gate_rows_size) as views into one array.
template <class Ptr>
struct GateRows {
  Ptr m_end, s_end, a, g, ends;  // ends: a_L, g_L, p
  __device__ GateRows(const Ptr& rows, int C) : m_end(rows), s_end(rows + C), a(rows + 2 * C), g(rows + 3 * C),
                                                ends(rows + 4 * C) {}
};

// Stages chunk n's gate rows into dst[0 .. gate_rows_size) (see "Staging" above).
template <typename T, class Ptr>
__device__ __forceinline__ void stage_gate_rows(const void* gate_rows, const LinearMemoryParams& p, index_t bh, int n,
                                                const Ptr& dst) {
  const int size = linear_memory_gate_rows_size(p.chunk_size);
  stage_span(static_cast<const T*>(gate_rows) + (bh * p.n_chunks + n) * size, size, dst);
}

// Host side: the value tiles of ValueTiles' rule, given smem(tile), the largest dynamic shared
// memory of the sequential (state_smem) and of the parallel (parallel_smem) kernels for a tile.
template <class StateSmem, class ParallelSmem>
ValueTiles choose_tiles(const LinearMemoryParams& params, InputType type, const DeviceLimits& device,
                        const StateSmem& state_smem, const ParallelSmem& parallel_smem) {
  constexpr size_t kReservedPerBlock = 1024;  // shared memory the runtime keeps per resident block
  const bool narrow_only = params.dk > 64 || type == InputType::kFloat64;
  const int64_t per_sm = device.shared_bytes_per_sm / (state_smem(16) + kReservedPerBlock);
  const int64_t resident = device.sm_count * (per_sm < 4 ? per_sm : 4);
  const int64_t blocks = int64_t(params.batch) * params.heads * ((params.dv + 15) / 16);
  const bool wide_state = !narrow_only && blocks > resident && state_smem(32) <= device.max_shared_bytes;
  const bool wide_parallel = !narrow_only && parallel_smem(32) <= device.max_shared_bytes;
  return {wide_state ? 32 : 16, wide_parallel ? 32 : 16};
}

// ---------------------------------------------------------------------------------------------
// The gate-rows kernel (parallel over chunks; it runs before both sequential passes)

// Shared memory: the chunk's theta, eta, beta.
struct GateRowsSmem {
  SmemCarver carver;
  int theta, eta, beta;  // [C]
  __host__ __device__ explicit GateRowsSmem(int chunk) {
    theta = carver.compute(chunk), eta = carver.compute(chunk), beta = carver.compute(chunk);
  }
};

// One block per (chunk, head, batch), one thread per column of the chunk's gate recurrence.
template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    gate_rows_kernel(LinearMemoryParams params, void* gate_rows) {
  using compute_t = typename Ktraits::compute_t;
  const int n = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = params.chunk_size, t0 = n * C;
  const int L = chunk_length(params, n);
  const GateRowsSmem layout(C);
  const SmemBase<compute_t, typename Ktraits::input_t> smem(layout.carver);
  const auto theta = smem.compute(layout.theta);
  const auto eta = smem.compute(layout.eta);
  const auto beta = smem.compute(layout.beta);
  stage_gates<compute_t>(params, b, h, t0, L, theta, eta, beta);
  __syncthreads();

  const index_t bh = index_t(b) * params.heads + h;
  compute_t* out = static_cast<compute_t*>(gate_rows) + (bh * params.n_chunks + n) * linear_memory_gate_rows_size(C);
  const GateRows<compute_t*> rows(out, C);
  for (int col = threadIdx.x; col < L + 2; col += blockDim.x) {
    gate_column<compute_t>(col, L, theta, eta, beta, [&](int t, compute_t mu, compute_t sigma) {
      if (col < L) {
        if (t == L - 1) rows.m_end[col] = mu, rows.s_end[col] = sigma;
      } else if (col == L) {
        rows.a[t] = mu;
        if (t == L - 1) rows.ends[0] = mu;
      } else {
        rows.g[t] = mu;
        if (t == L - 1) rows.ends[1] = mu, rows.ends[2] = sigma;
      }
    });
  }
}

template <typename Ktraits>
device::Error launch_gate_rows(const LinearMemoryParams& params, void* gate_rows, CUstream_st* stream) {
  return device::launch("linear_memory_gate_rows", gate_rows_kernel<Ktraits>,
                        dim3(params.n_chunks, params.heads, params.batch), dim3(Ktraits::kNThreads),
                        smem_bytes<Ktraits>(GateRowsSmem(params.chunk_size)), stream, params, gate_rows);
}

}  // namespace lm
}  // namespace titans
