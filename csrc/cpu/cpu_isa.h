// The instruction-set variant the CPU kernels run (torch-free).
//
// The matrix products of the CPU kernels (matmul.h) are compiled once per variant, each with
// register tiles sized for its vector registers (matmul_kernel.h), and the variant in use can be
// switched at run time, so a developer on an AVX-512 machine can run and measure the AVX2 path:
//   default  the compiler's baseline for the target: SSE2 on x86-64, NEON on aarch64
//   avx2     AVX2 + FMA (x86-64-v3)
//   avx512   AVX-512F
// A variant is supported when it is compiled into this build (the x86 variants need GCC on
// x86-64) and the CPU (and OS) can run it. At load the best supported variant is in use.
#pragma once

#include <string_view>
#include <vector>

namespace titans::cpu {

enum class CpuIsa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
inline constexpr int kCpuIsaCount = 3;

// "default", "avx2", "avx512".
const char* cpu_isa_name(CpuIsa isa);

// The variant called name, with "native" naming the best supported one. False for any other name.
bool parse_cpu_isa(std::string_view name, CpuIsa& isa);

bool cpu_isa_supported(CpuIsa isa);
// The supported variants, from the baseline up (the last one is the native variant).
std::vector<CpuIsa> supported_cpu_isas();
CpuIsa native_cpu_isa();

// The variant in use, and the switch (isa must be supported). Calls already running keep the
// variant of each product they have started; the next product uses the new one.
CpuIsa cpu_isa();
void set_cpu_isa(CpuIsa isa);

}  // namespace titans::cpu
