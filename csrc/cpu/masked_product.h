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

// W = G .* c on the lower triangle and 0 above it (L x L): only G's lower triangle is read, so G
// may come from a matmul with Triangular::kLowerC, and W may enter one as a Triangular A.
template <typename T>
void causal_mask(int L, const T* G, const T* c, T* W) {
  for (int t = 0; t < L; ++t) {
    const int row = t * L;
    for (int i = 0; i <= t; ++i) W[row + i] = G[row + i] * c[row + i];
    for (int i = t + 1; i < L; ++i) W[row + i] = T(0);
  }
}

// Operands are row-major matrices given as rows (TokenRows: pointer and row stride).
// Given dOut (L x m), G = A B^T and W = causal_mask(G, c) (L x L; only the lower triangle of G is
// read), accumulates d_c += scale tril(dM .* G), dE += scale W^T dOut, dA += dG B and
// dB += dG^T A, where dM = dOut E^T and dG = scale dM .* c, and returns the cotangent of scale,
// <dM, W>. dG_scratch: L x L.
template <typename T>
T masked_product_backward(int L, int n, int m, T scale, const T* c, const T* G, const T* W, TokenRows<const T> d_out,
                          TokenRows<const T> E, TokenRows<const T> A, TokenRows<const T> B, T* d_c,
                          TokenRows<T> dE, TokenRows<T> dA, TokenRows<T> dB, T* dG_scratch) {
  // The read-out is causal (c's upper triangle is zero): only the lower triangle of dM is
  // computed, dG is zero above it, and the products with W^T, dG and dG^T skip the zero part.
  T* dG = dG_scratch;
  matmul(false, true, L, L, m, T(1), d_out.ptr, d_out.stride, E.ptr, E.stride, T(0), dG, L, Triangular::kLowerC);
  T d_scale = 0;
  for (int t = 0; t < L; ++t) {
    const int row = t * L;
    for (int i = 0; i <= t; ++i) {
      d_scale += dG[row + i] * W[row + i];
      d_c[row + i] += scale * dG[row + i] * G[row + i];
      dG[row + i] *= scale * c[row + i];
    }
    for (int i = t + 1; i < L; ++i) dG[row + i] = T(0);
  }
  matmul(true, false, L, m, L, scale, W, L, d_out.ptr, d_out.stride, T(1), dE.ptr, dE.stride, Triangular::kUpperA);
  matmul(false, false, L, n, L, T(1), dG, L, B.ptr, B.stride, T(1), dA.ptr, dA.stride, Triangular::kLowerA);
  matmul(true, false, L, n, L, T(1), dG, L, A.ptr, A.stride, T(1), dB.ptr, dB.stride, Triangular::kUpperA);
  return d_scale;
}

}  // namespace titans::cpu
