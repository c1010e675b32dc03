// Packed variable-length sequences (cu_seqlens, titans_params.h, docs/design.md §6) in the
// bindings: the checks of the offsets tensor that every binding runs, the check of their values
// (where reading them is free), and the offsets as the device kernels read them. Stable ABI only.
#pragma once

#include <optional>

#include "binding/tensor_params.h"

namespace titans {

// cu_seqlens' own shape, dtype and device (the device of q).
inline void check_cu_seqlens_tensor(const Tensor& cu, const Tensor& q) {
  STD_TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, "cu_seqlens must be a 1-d tensor of N + 1 offsets, N >= 1, got ",
                  shape_str(cu));
  STD_TORCH_CHECK(cu.scalar_type() == ScalarType::Int || cu.scalar_type() == ScalarType::Long,
                  "cu_seqlens must be int32 or int64");
  STD_TORCH_CHECK(cu.device() == q.device(), "cu_seqlens must be on ", device_str(q), " (the device of q), got ",
                  device_str(cu));
}

// The values of n + 1 offsets on the host: from 0 to T, non-decreasing.
inline void check_cu_seqlens_values(const int64_t* offsets, int64_t n, int64_t T) {
  STD_TORCH_CHECK(offsets[0] == 0 && offsets[n] == T, "cu_seqlens must run from 0 to T = ", T, ", got ", offsets[0],
                  " .. ", offsets[n]);
  for (int64_t i = 0; i < n; ++i)
    STD_TORCH_CHECK(offsets[i + 1] >= offsets[i], "cu_seqlens must be non-decreasing, got ", offsets[i], " then ",
                    offsets[i + 1]);
}

// The offsets for the device kernels (csrc/cuda/common/sequences.h), contiguous int64 on q's
// device. Their values are read only when check_values (the emulation, whose tensors are on the
// CPU): on a GPU reading them would sync the host with the device, so there the Python op checks
// them under value_checks_enabled and the kernels clamp offsets it would refuse (sequences.cuh).
class DeviceSequences {
 public:
  DeviceSequences(const std::optional<Tensor>& cu_seqlens, const Tensor& q, bool check_values) {
    if (!cu_seqlens) return;
    check_cu_seqlens_tensor(*cu_seqlens, q);
    STD_TORCH_CHECK(q.dim() == 4 && q.size(0) == 1,
                    "cu_seqlens needs B == 1 (the sequences packed along T), got q of shape ", shape_str(q));
    offsets_ = torch::stable::contiguous(to_dtype(*cu_seqlens, ScalarType::Long));
    if (check_values)
      check_cu_seqlens_values(static_cast<const int64_t*>(offsets_->data_ptr()), n_seqs(), q.size(1));
  }

  // The rows of the initial and final states: N with cu_seqlens, -1 (the batch) without.
  int64_t n_seqs() const { return offsets_ ? offsets_->size(0) - 1 : -1; }
  bool packed() const { return offsets_.has_value(); }

  // Points params at the sequences (after params' sizes are set). n_chunks stays ceil(T / C), the
  // chunks of the longest sequence there may be.
  void apply(SequenceParams& params) const {
    if (!offsets_) return;
    params.cu_seqlens = static_cast<const int64_t*>(offsets_->data_ptr());
    params.n_seqs = int(n_seqs());
  }

 private:
  std::optional<Tensor> offsets_;
};

}  // namespace titans
