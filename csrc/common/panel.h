// Row-panel sizing for the blocked CPU kernels: every N × N quantity is processed B rows at a time, with
// B chosen so that the panel buffers stay within a byte budget (bounded memory at any N).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace structure_ops {

// Default: 32 MiB or 512 rows, whichever is larger (below ~512 rows the panel GEMMs, whose inner
// dimension is the panel height in the backward products, lose efficiency; memory stays linear in N).
// STRUCTURE_OPS_CPU_PANEL_MB sets an exact budget instead (read on every call, so tests can use a tiny
// one to force many panels and ragged last panels).
inline int64_t panel_rows(int64_t n, int64_t bytes_per_row) {
  double mb = 32.0;
  int64_t min_rows = 512;
  if (const char* env = std::getenv("STRUCTURE_OPS_CPU_PANEL_MB")) {
    const double v = std::atof(env);
    if (v > 0) {
      mb = v;
      min_rows = 1;
    }
  }
  const int64_t budget = static_cast<int64_t>(mb * double(1 << 20));
  int64_t rows = std::max<int64_t>(min_rows, budget / std::max<int64_t>(1, bytes_per_row));
  if (rows >= 64) rows -= rows % 16;  // GEMM-friendly panel heights
  return std::min(rows, n);
}

}  // namespace structure_ops
