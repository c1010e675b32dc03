// nvcc build of the CUDA mlp_memory forward (for titans_ext._C).
#include "cuda/mlp_memory_fwd.cuh"
