// SigLIP op contract shared by the CPU and CUDA backends: input checks and the row-shard convention.
//
// siglip_fwd(image (M, d), text (N, d), logit_scale s, logit_bias β, row_offset o, grad_image, grad_text):
//   z_ij = s · (A Bᵀ)_ij + β,  y_ij = +1 if j = o + i else −1,  loss = (1/N) Σ_{i<M, j<N} softplus(−y_ij z_ij)
// normalized by N = text rows. The single-process loss is M = N, o = 0 (open_clip's SigLipLoss); a row shard
// i ∈ [o, o + M) of a global batch of N rows gives that shard's part of the global loss (structure_ops.distributed).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace structure_ops {

inline void check_siglip(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
                         int64_t row_offset, const char* op) {
  TORCH_CHECK(a.dim() == 2, "image must be a 2-D (M, d) tensor, got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "text must be a 2-D (N, d) tensor, got shape ", b.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "image must be a floating-point tensor, got ", a.scalar_type());
  TORCH_CHECK(at::isFloatingType(b.scalar_type()), "text must be a floating-point tensor, got ", b.scalar_type());
  TORCH_CHECK(b.size(0) >= 1, "text needs at least one row, got shape ", b.sizes());
  TORCH_CHECK(a.size(1) >= 1, "image needs at least one feature column, got shape ", a.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "image and text must have the same embedding width, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "image and text must have the same dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "image and text must be on the same device, got ", a.device(), " and ",
              b.device());
  TORCH_CHECK(scale.numel() == 1, "logit_scale must hold exactly one value, got shape ", scale.sizes());
  TORCH_CHECK(bias.numel() == 1, "logit_bias must hold exactly one value, got shape ", bias.sizes());
  TORCH_CHECK(scale.is_floating_point(), "logit_scale must be a floating-point tensor, got ", scale.scalar_type());
  TORCH_CHECK(bias.is_floating_point(), "logit_bias must be a floating-point tensor, got ", bias.scalar_type());
  TORCH_CHECK(0 <= row_offset && row_offset + a.size(0) <= b.size(0), op,
              ": the image rows must be a row range of the text batch: need 0 <= row_offset and row_offset + M <= N,"
              " got row_offset=", row_offset, ", M=", a.size(0), ", N=", b.size(0));
}

}  // namespace structure_ops
