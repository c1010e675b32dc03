// Emulation build of the CUDA mlp_memory forward (for titans_ext._emu): the same source as
// csrc/cuda/mlp_memory_fwd.cu, compiled by the host compiler against the CPU SIMT emulation.
#include "cuda/mlp_memory_fwd.cuh"
