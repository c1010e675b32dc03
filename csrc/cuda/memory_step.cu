// nvcc build of the CUDA decode-step kernels (for titans_ext._C).
#include "cuda/memory_step.cuh"
