// nvcc build of the CUDA mlp_memory backward (for titans_ext._C).
#include "cuda/mlp_memory_bwd.cuh"
