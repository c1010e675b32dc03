// Emulation build of the CUDA decode-step kernels (for titans_ext._emu): the same source as
// csrc/cuda/memory_step.cu, compiled by the host compiler against the CPU SIMT emulation.
#include "cuda/memory_step.cuh"
