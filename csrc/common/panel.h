// Row-panel sizing for the blocked CPU and CUDA kernels: every N × N quantity is processed B rows at a time, with
// B chosen so that the panel buffers stay within a byte budget (bounded memory at any N).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace structure_ops {

// Rows per panel so that panel buffers of bytes_per_row each stay within a byte budget: default_mb and at
// least min_rows rows (below that the panel GEMMs, whose inner dimension is the panel height in the backward
// products, lose efficiency; memory stays linear in N). The environment variable `env` (read on every call)
// sets an exact budget in MiB instead, down to 1 row, so tests can force many panels and ragged last panels.
// Heights of at least 4·multiple are rounded down to a multiple of it (GEMM-friendly).
inline int64_t panel_rows_budget(int64_t n, int64_t bytes_per_row, const char* env, double default_mb,
                                 int64_t min_rows, int64_t multiple) {
  double mb = default_mb;
  if (const char* value = std::getenv(env)) {
    const double v = std::atof(value);
    if (v > 0) {
      mb = v;
      min_rows = 1;
    }
  }
  const int64_t budget = static_cast<int64_t>(mb * double(1 << 20));
  int64_t rows = std::max<int64_t>(min_rows, budget / std::max<int64_t>(1, bytes_per_row));
  if (rows >= 4 * multiple) rows -= rows % multiple;
  return std::min(rows, n);
}

// The CPU kernels: 32 MiB or 512 rows, whichever is larger; STRUCTURE_OPS_CPU_PANEL_MB overrides.
inline int64_t panel_rows(int64_t n, int64_t bytes_per_row) {
  return panel_rows_budget(n, bytes_per_row, "STRUCTURE_OPS_CPU_PANEL_MB", 32.0, 512, 16);
}

}  // namespace structure_ops
