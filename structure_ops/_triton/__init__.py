"""The Triton backend: fused, memory-bounded kernels for structure_loss, clip_loss and knn.

Modules (each kernel states its math at the top):
  _common.py        precision policy (docs/kernels.md §6), block-size helpers, interpreter detection
  structure.py      structure_loss host entry: level 1 by row panels (pass a) or flash tiles (pass b),
                    levels > 1 by materialized powers with a fused divergence epilogue
  structure_flash.py  level 1, pass (b): fully fused tiles, online log-sum-exp, O(N) saved state
  clip.py           clip_loss forward (row + column lse in one pass) and backward
  knn.py            streamed top-k neighbour lists
  siglip.py         siglip_loss: fused tiles (GEMM + stable log-sigmoid epilogue + gradient), deterministic
  ops.py            registration behind the torch.library op boundary (structure_ops::triton_*)
  aot.py            ahead-of-time compilation of every kernel for sm_80 / sm_90 (CI, no GPU needed)

Importing this package imports triton; structure_ops itself never does so at import time.
"""
