// Row-panel sizing for the blocked CPU kernels: every N × N quantity is processed B rows at a time, with
// B chosen so that the panel buffers stay within a byte budget (bounded memory at any N).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace structure_ops {

// Default budget 32 MiB; STRUCTURE_OPS_CPU_PANEL_MB overrides it (read on every call, so tests can use a
// tiny budget to force many panels and ragged last panels).
inline int64_t panel_rows(int64_t n, int64_t bytes_per_row) {
  double mb = 32.0;
  if (const char* env = std::getenv("STRUCTURE_OPS_CPU_PANEL_MB")) {
    const double v = std::atof(env);
    if (v > 0) mb = v;
  }
  const int64_t budget = static_cast<int64_t>(mb * double(1 << 20));
  int64_t rows = std::max<int64_t>(1, budget / std::max<int64_t>(1, bytes_per_row));
  if (rows >= 64) rows -= rows % 16;  // GEMM-friendly panel heights
  return std::min(rows, n);
}

}  // namespace structure_ops
