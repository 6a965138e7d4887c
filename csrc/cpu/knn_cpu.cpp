// k nearest neighbours by inner product on the CPU, diagonal excluded, ties to the lower index.
//
//   idx_i = the k columns j ≠ i with the largest (A Aᵀ)_ij, best first
//
// Row panels of the Gram matrix (B × N from a byte budget) and a per-row selection
// (nth_element + sort of the k winners, O(N + k log k) per row): never an N × N matrix, never a full
// sort. NaN similarities rank below every number so the ordering stays a strict weak order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/checks.h"
#include "../common/panel.h"

namespace structure_ops {
namespace {

template <typename T>
void knn_panels(const at::Tensor& a, int64_t k, at::Tensor& out) {
  const int64_t n = a.size(0);
  const int64_t rows = panel_rows(n, n * int64_t(sizeof(T)));
  at::Tensor buf = at::empty({rows, n}, a.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t b = std::min(rows, n - r0);
    auto panel = buf.narrow(0, 0, b);
    at::mm_out(panel, a.narrow(0, r0, b), a.t());
    const T* p = panel.const_data_ptr<T>();
    at::parallel_for(0, b, 1, [&](int64_t ib, int64_t ie) {
      std::vector<int64_t> cand(n - 1);
      for (int64_t i = ib; i < ie; ++i) {
        const T* row = p + i * n;
        const int64_t gi = r0 + i;
        for (int64_t j = 0, c = 0; j < n; ++j)
          if (j != gi) cand[c++] = j;
        auto key = [&](int64_t j) {
          const T v = row[j];
          return std::isnan(v) ? -std::numeric_limits<T>::infinity() : v;
        };
        auto better = [&](int64_t x, int64_t y) {
          const T vx = key(x), vy = key(y);
          return vx > vy || (vx == vy && x < y);
        };
        if (k < n - 1) std::nth_element(cand.begin(), cand.begin() + k, cand.end(), better);
        std::sort(cand.begin(), cand.begin() + k, better);
        std::copy(cand.begin(), cand.begin() + k, o + gi * k);
      }
    });
  }
}

at::Tensor knn_cpu(const at::Tensor& a_in, int64_t k) {
  check_matrix(a_in, "a");
  TORCH_CHECK(a_in.device().is_cpu(), "knn (cpu): a must be a CPU tensor, got ", a_in.device());
  const int64_t n = a_in.size(0);
  TORCH_CHECK(k >= 1 && k <= n - 1, "k must satisfy 1 <= k <= N - 1 = ", n - 1, " (diagonal excluded), got ", k);
  const auto cdt = a_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = a_in.to(cdt).contiguous();
  at::Tensor out = at::empty({n, k}, a.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(cdt, "knn_cpu", [&] { knn_panels<scalar_t>(a, k, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(structure_ops, CPU, m) { m.impl("knn", &knn_cpu); }

}  // namespace structure_ops
