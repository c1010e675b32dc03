// Emulation build of the CUDA linear_memory backward (for titans_ext._emu): the same source as
// csrc/cuda/linear_memory_bwd.cu, compiled by the host compiler against the CPU SIMT emulation.
#include "cuda/linear_memory_bwd.cuh"
