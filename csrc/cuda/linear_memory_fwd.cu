// nvcc build of the CUDA linear_memory forward (for titans_ext._C).
#include "cuda/linear_memory_fwd.cuh"
