// nvcc side of the device layer: every name maps straight to CUDA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

// Shared memory is declared through the layer so that the emulation can bounds-check it. Arrays
// start on 16 bytes, as in the emulation, so ldmatrix rows and 16-byte cp.async copies can be
// aligned (alignof(T) alone gives a bf16 array 2 bytes).
#define TITANS_SHARED_ARRAY(T, name, n) __shared__ __align__(16) T name[n]
#define TITANS_DYNAMIC_SHARED(T, name)                                         \
  extern __shared__ __align__(16) unsigned char titans_dynamic_shared_bytes[]; \
  T* name = reinterpret_cast<T*>(titans_dynamic_shared_bytes)

namespace titans {
namespace device {

using Stream = cudaStream_t;
using Error = cudaError_t;
constexpr Error kSuccess = cudaSuccess;

// A pointer into shared memory (a checked view in the emulation).
template <typename T>
using SharedPtr = T*;

using bf16 = __nv_bfloat16;
using fp16 = __half;

__device__ __forceinline__ bf16 float_to_bf16_rn(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ fp16 float_to_fp16_rn(float x) { return __float2half_rn(x); }
__device__ __forceinline__ float bf16_to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float fp16_to_float(fp16 x) { return __half2float(x); }
__device__ __forceinline__ uint16_t bits_of(bf16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint16_t bits_of(fp16 x) { return __half_as_ushort(x); }

// The 32-bit .shared address of a generic pointer into shared memory, as the PTX shared-memory
// instructions (ldmatrix, cp.async) take it.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// fp32 -> tf32 (round to nearest, ties away from zero), kept in a 32-bit register for the MMA.
__device__ __forceinline__ uint32_t float_to_tf32_rna(float x) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(x));
  return out;
}

// Lets `kernel` take up to the device's shared memory per block (the opt-in above 48 KiB). Set
// once per kernel and device: later calls find the pair recorded and cost a lookup. Always to the
// device's maximum, so a kernel launched with several sizes never needs it again.
inline Error opt_in_shared_memory(const void* kernel) {
  int device = 0;
  Error err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, device})) return cudaSuccess;
  int max_bytes = 0;
  err = cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_bytes);
  if (err == cudaSuccess) done.insert({kernel, device});
  return err;
}

// The one launch helper: kernel<<<grid, block, smem_bytes, stream>>>(args...). The name is for
// the emulation's error messages.
template <typename... KernelArgs, typename... Args>
inline Error launch(const char* /*kernel_name*/, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                    size_t smem_bytes, Stream stream, Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    const Error err = opt_in_shared_memory(reinterpret_cast<const void*>(kernel));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace device
}  // namespace titans
