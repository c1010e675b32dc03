// The instruction-set variant of the CPU kernels (csrc/cpu/cpu_isa.h) as operators of the
// titans_ext library: cpu_isa, set_cpu_isa and supported_cpu_isas. Written against the LibTorch
// stable ABI only (torch/csrc/stable), like every binding file.
#include <string>
#include <string_view>
#include <vector>

#include <torch/csrc/stable/library.h>

#include "cpu/cpu_isa.h"

namespace titans {
namespace {

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (cpu::CpuIsa isa : cpu::supported_cpu_isas()) names.emplace_back(cpu::cpu_isa_name(isa));
  return names;
}

std::string cpu_isa() { return cpu::cpu_isa_name(cpu::cpu_isa()); }

void set_cpu_isa(std::string_view name) {
  cpu::CpuIsa isa;
  const bool known = cpu::parse_cpu_isa(name, isa);
  if (!known || !cpu::cpu_isa_supported(isa)) {
    std::string supported;
    for (const std::string& s : supported_cpu_isas()) supported += (supported.empty() ? "" : ", ") + s;
    STD_TORCH_CHECK(false, "set_cpu_isa: ", known ? "this machine cannot run " : "no CPU kernel variant named ", "\"",
                    std::string(name), "\"; it supports ", supported, " (and \"native\", the last of them)");
  }
  cpu::set_cpu_isa(isa);
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(titans_ext, m) {
  m.def("cpu_isa() -> str");
  m.def("set_cpu_isa(str name) -> ()");
  m.def("supported_cpu_isas() -> str[]");
}

// CompositeExplicitAutograd: the ops take no tensor to dispatch on.
STABLE_TORCH_LIBRARY_IMPL(titans_ext, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&cpu_isa));
  m.impl("set_cpu_isa", TORCH_BOX(&set_cpu_isa));
  m.impl("supported_cpu_isas", TORCH_BOX(&supported_cpu_isas));
}

}  // namespace titans
