// Emulation build of the CUDA mlp_memory backward (for titans_ext._emu): the same source as
// csrc/cuda/mlp_memory_bwd.cu, compiled by the host compiler against the CPU SIMT emulation.
#include "cuda/mlp_memory_bwd.cuh"
