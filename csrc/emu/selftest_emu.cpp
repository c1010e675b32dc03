// Emulation build of the device layer's self-test kernels (for titans_ext._emu).
#include "device/selftest/selftest_kernels.cuh"
