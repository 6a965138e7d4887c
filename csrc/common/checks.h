// Input checks shared by every backend's host code. Messages name the argument and what it holds,
// because these errors reach users who called the op directly (torch.ops.structure_ops.*).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace structure_ops {

inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D (N, d) tensor, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.size(0) >= 2, name, " needs at least N = 2 rows, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) >= 1, name, " needs at least one feature column, got shape ", t.sizes());
}

inline void check_pair(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  check_matrix(a, an);
  check_matrix(b, bn);
  TORCH_CHECK(a.size(0) == b.size(0), an, " and ", bn, " must have the same number of rows N, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(),
              " and ", b.device());
}

// Option codes: the order of the string tuples in structure_ops/_options.py.
enum Weighting : int64_t { kWeightNone = 0, kWeightInverse = 1 };
enum Similarity : int64_t { kCosine = 0, kRbf = 1 };
enum Divergence : int64_t { kStructure = 0, kJS = 1 };

}  // namespace structure_ops
