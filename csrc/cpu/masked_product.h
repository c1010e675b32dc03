// Backward of the causal masked product every token read-out uses (torch-free).
//
// A read-out inside a chunk of L tokens has the form Out += scale W E with W = (A B^T) .* c, where
// A, B are L x n, E is L x m, c is the chunk's lower-triangular coefficient table
// (chunk_gates.h) and scale a scalar (the "lq" retention's rho, 1 otherwise: chunk_loop.h): the
// linear memory's (Q K^T .* c) E, the MLP memory's (Q K^T .* c) DZ and (Hq H^T .* c) E. This is
// its backward for every operand at once.
#pragma once

#include "cpu/kernel_utils.h"
#include "cpu/matmul.h"

namespace titans::cpu {

// Operands are row-major matrices given as rows (TokenRows: pointer and row stride).
// Given dOut (L x m), G = A B^T and W = G .* c (L x L; only the lower triangle of G is read),
// accumulates d_c += scale tril(dM .* G), dE += scale W^T dOut, dA += dG B and dB += dG^T A,
// where dM = dOut E^T and dG = scale dM .* c, and returns the cotangent of scale, <dM, W>.
// dG_scratch: L x L.
template <typename T>
T masked_product_backward(int L, int n, int m, T scale, const T* c, const T* G, const T* W, TokenRows<const T> d_out,
                          TokenRows<const T> E, TokenRows<const T> A, TokenRows<const T> B, T* d_c,
                          TokenRows<T> dE, TokenRows<T> dA, TokenRows<T> dB, T* dG_scratch) {
  T* dG = dG_scratch;
  matmul(false, true, L, L, m, T(1), d_out.ptr, d_out.stride, E.ptr, E.stride, T(0), dG, L);
  T d_scale = 0;
  for (int t = 0; t < L; ++t)
    for (int i = 0; i < L; ++i) {
      const int ti = t * L + i;
      if (i <= t) {
        d_scale += dG[ti] * W[ti];
        d_c[ti] += scale * dG[ti] * G[ti];
      }
      dG[ti] *= scale * c[ti];  // c's upper triangle is zero: the read-out is causal
    }
  matmul(true, false, L, m, L, scale, W, L, d_out.ptr, d_out.stride, T(1), dE.ptr, dE.stride);
  matmul(false, false, L, n, L, T(1), dG, L, B.ptr, B.stride, T(1), dA.ptr, dA.stride);
  matmul(true, false, L, n, L, T(1), dG, L, A.ptr, A.stride, T(1), dB.ptr, dB.stride);
  return d_scale;
}

}  // namespace titans::cpu
