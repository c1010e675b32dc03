// nvcc build of the CUDA linear_memory backward (for titans_ext._C).
#include "cuda/linear_memory_bwd.cuh"
