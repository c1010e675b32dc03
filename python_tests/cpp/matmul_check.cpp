// titans::cpu::matmul (csrc/cpu/matmul.h) against a plain triple loop in long double, for every
// instruction-set variant this build and machine support: all four transpose combinations,
// sizes around and between the register tiles of every variant, padded leading dimensions,
// alpha / beta (beta == 0 must not read C, which starts as NaN), the triangular structures,
// and no write outside C. Then the same cases for the register tile of every variant
// (cpu/isa_tiles.h) compiled for the baseline target: the blocking, packing and edges of a
// variant this machine cannot run (AVX-512 on an AVX2 machine) are checked too; only its
// instructions are not. Torch-free: built and run by python_tests/test_cpu_isa.py, natively
// and, where a cross compiler and qemu are installed, for aarch64.
//
//   c++ -O2 -std=c++20 -I csrc python_tests/cpp/matmul_check.cpp csrc/cpu/{matmul,cpu_isa,isa_*}.cpp
//
// Prints one line per variant and dtype; exits with 1 on the first mismatch.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/matmul.h"
#define TITANS_ISA_TARGET
#include "cpu/matmul_kernel.h"

using titans::cpu::index_t;
using titans::cpu::Triangular;

namespace {

// A matrix product with matmul's arguments.
template <typename T>
using Product = void (*)(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, index_t lda,
                         const T* B, index_t ldb, T beta, T* C, index_t ldc, Triangular tri);

// titans::cpu::matmul: the variant in use.
template <typename T>
void matmul_in_use(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, index_t lda, const T* B,
                   index_t ldb, T beta, T* C, index_t ldc, Triangular tri) {
  titans::cpu::matmul(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, tri);
}

std::mt19937 rng(0);

template <typename T>
struct Case {
  bool trans_a, trans_b;
  int M, N, K;
  T alpha, beta;
  Triangular tri;
};

// Zero where the triangular structure says op(A) is zero.
template <typename T>
void apply_structure(Triangular tri, bool trans_a, int M, int K, std::vector<T>& A, index_t lda) {
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) {
      const bool zero = (tri == Triangular::kLowerA && k > i) || (tri == Triangular::kUpperA && k < i);
      if (zero) A[trans_a ? k * lda + i : i * lda + k] = T(0);
    }
}

template <typename T>
bool check(Product<T> product, const Case<T>& c, const char* isa) {
  std::uniform_real_distribution<double> dist(-1, 1);
  const int a_rows = c.trans_a ? c.K : c.M, a_cols = c.trans_a ? c.M : c.K;
  const int b_rows = c.trans_b ? c.N : c.K, b_cols = c.trans_b ? c.K : c.N;
  const index_t lda = a_cols + 3, ldb = b_cols + 5, ldc = c.N + 2;
  std::vector<T> A(size_t(a_rows) * lda), B(size_t(b_rows) * ldb), C(size_t(c.M) * ldc);
  for (T& x : A) x = T(dist(rng));
  for (T& x : B) x = T(dist(rng));
  apply_structure(c.tri, c.trans_a, c.M, c.K, A, lda);
  const T sentinel = T(12345);
  for (int i = 0; i < c.M; ++i)
    for (int j = 0; j < ldc; ++j) C[i * ldc + j] = j < c.N ? (c.beta == T(0) ? std::numeric_limits<T>::quiet_NaN() : T(dist(rng))) : sentinel;
  const std::vector<T> C0 = C;
  product(c.trans_a, c.trans_b, c.M, c.N, c.K, c.alpha, A.data(), lda, B.data(), ldb, c.beta, C.data(), ldc, c.tri);
  for (int i = 0; i < c.M; ++i)
    for (int j = 0; j < ldc; ++j) {
      const T got = C[i * ldc + j];
      if (j >= c.N) {
        if (got != sentinel) {
          std::printf("FAIL [%s] wrote outside C at (%d, %d)\n", isa, i, j);
          return false;
        }
        continue;
      }
      if (c.tri == Triangular::kLowerC && j > i) continue;  // not wanted: may or may not be written
      long double want = 0, scale = 0;
      for (int k = 0; k < c.K; ++k) {
        const long double a = c.trans_a ? A[k * lda + i] : A[i * lda + k];
        const long double b = c.trans_b ? B[j * ldb + k] : B[k * ldb + j];
        want += a * b;
        scale += std::fabs(double(a * b));
      }
      want *= c.alpha;
      scale *= std::fabs(double(c.alpha));
      if (c.beta != T(0)) {
        want += c.beta * (long double)C0[i * ldc + j];
        scale += std::fabs(double(c.beta * C0[i * ldc + j]));
      }
      const double tol = 4.0 * (c.K + 2) * std::numeric_limits<T>::epsilon() * double(scale) + 1e-30;
      if (!(std::fabs(double(got - want)) <= tol)) {
        std::printf("FAIL [%s] %s trans_a=%d trans_b=%d M=%d N=%d K=%d alpha=%g beta=%g tri=%d at (%d, %d): %.17g, want %.17Lg\n",
                    isa, sizeof(T) == 4 ? "f32" : "f64", c.trans_a, c.trans_b, c.M, c.N, c.K, double(c.alpha),
                    double(c.beta), int(c.tri), i, j, double(got), want);
        return false;
      }
    }
  return true;
}

template <typename T>
int run_all(Product<T> product, const char* isa) {
  const T alphas[] = {T(1), T(1), T(0.5)}, betas[] = {T(0), T(1), T(-2)};
  int count = 0, which = 0;
  for (int M : {1, 6, 7, 13, 17, 33, 70})
    for (int N : {1, 4, 9, 16, 17, 33, 70})
      for (int K : {1, 5, 17, 64})
        for (int t = 0; t < 4; ++t, ++which) {
          const Case<T> c{bool(t & 1), bool(t & 2), M, N, K, alphas[which % 3], betas[which % 3], Triangular::kNone};
          if (!check(product, c, isa)) return -1;
          ++count;
        }
  for (int L : {1, 5, 16, 37, 64})
    for (Triangular tri : {Triangular::kLowerC, Triangular::kLowerA, Triangular::kUpperA})
      for (int t = 0; t < 4; ++t, ++which) {
        const Case<T> c{bool(t & 1), bool(t & 2), L, L + (tri == Triangular::kLowerC ? 0 : 3), L, alphas[which % 3],
                        betas[which % 3], tri};
        if (!check(product, c, isa)) return -1;
        ++count;
      }
  return count;
}

// Prints "<label>: N float and M double products match"; false on the first mismatch.
bool run_both(Product<float> f32_product, Product<double> f64_product, const char* label) {
  const int f32 = run_all<float>(f32_product, label), f64 = f32 < 0 ? -1 : run_all<double>(f64_product, label);
  if (f32 < 0 || f64 < 0) return false;
  std::printf("%s: %d float and %d double products match\n", label, f32, f64);
  return true;
}

template <titans::cpu::TileGeometry G>
bool run_geometry(const char* label) {
  using Tile = titans::cpu::GeometryTile<G>;
  return run_both(&titans::cpu::matmul_tiled<Tile, float>, &titans::cpu::matmul_tiled<Tile, double>, label);
}

}  // namespace

int main() {
  for (titans::cpu::CpuIsa isa : titans::cpu::supported_cpu_isas()) {
    titans::cpu::set_cpu_isa(isa);
    if (!run_both(&matmul_in_use<float>, &matmul_in_use<double>, titans::cpu::cpu_isa_name(isa))) return 1;
  }
  const bool tiles = run_geometry<titans::cpu::kDefaultTile>("default tile, baseline target") &&
                     run_geometry<titans::cpu::kAvx2Tile>("avx2 tile, baseline target") &&
                     run_geometry<titans::cpu::kAvx512Tile>("avx512 tile, baseline target");
  return tiles ? 0 : 1;
}
