// nvcc build of the device layer's self-test kernels: CI compiles it for sm_80 and sm_90a to check
// that the layer's CUDA side (shuffles, ballot, atomics, MMA, ldmatrix and cp.async PTX,
// conversions) builds. Not linked into titans_ext._C; the emulation runs the same source
// (csrc/emu/selftest_emu.cpp).
#include "device/selftest/selftest_kernels.cuh"
