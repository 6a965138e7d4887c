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

// Options of structure_fwd / structure_rows_fwd (the row-range op has levels = 1, no weighting, no margin).
struct StructureOptions {
  int64_t levels;
  double temperature;
  int64_t weighting;
  double margin;
  int64_t similarity;
  double gamma;
  int64_t divergence;
  double eps;
};

// The same checks, in the same order, for every backend.
inline void check_structure_options(const StructureOptions& o) {
  TORCH_CHECK(o.levels >= 1, "levels must be >= 1, got ", o.levels);
  TORCH_CHECK(o.similarity == kRbf || o.temperature > 0, "temperature must be > 0, got ", o.temperature);
  TORCH_CHECK(o.divergence == kJS || o.eps > 0, "eps must be > 0 for divergence='structure', got ", o.eps);
  TORCH_CHECK(o.weighting == kWeightNone || o.weighting == kWeightInverse, "unknown weighting code ", o.weighting);
  TORCH_CHECK(o.similarity == kCosine || o.similarity == kRbf, "unknown similarity code ", o.similarity);
  TORCH_CHECK(o.divergence == kStructure || o.divergence == kJS, "unknown divergence code ", o.divergence);
}

inline void check_row_range(int64_t row_begin, int64_t row_end, int64_t n) {
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= n,
              "structure_rows_fwd: need 0 <= row_begin <= row_end <= N = ", n, ", got row_begin=", row_begin,
              ", row_end=", row_end);
}

}  // namespace structure_ops
