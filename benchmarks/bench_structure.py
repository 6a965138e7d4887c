#!/usr/bin/env python
"""Benchmark structure_ops.structure_loss (STRUCTURE regularizer) on the CPU.

Providers: reference (eager structure_ops.reference.structure_loss), compile_reference
(torch.compile of it) and cpu (structure_ops.structure_loss(..., backend="cpu")).
Modes: fwd (no input requires grad) and fwd+bwd (grad w.r.t. z; x is the frozen side).
FLOP model (docs/kernels.md §2a, level 1): fwd 2N²(d_x+d_z), fwd+bwd 2N²(d_x+3d_z).

    python benchmarks/bench_structure.py                    # default sweep -> benchmarks/results/cpu/structure.json
    python benchmarks/bench_structure.py --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

DEFAULT_SIZES = "1024,2048,4096,8192,16384"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(p, DEFAULT_SIZES)
    p.add_argument("--dx", type=H.int_list, default=[768], help="d_x value(s), comma list (default 768)")
    p.add_argument("--dz", type=H.int_list, default=[512], help="d_z value(s), comma list (default 512)")
    p.add_argument("--levels", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.05)
    args = p.parse_args(argv)
    H.finish_args(args, DEFAULT_SIZES)
    dims_list = [{"d_x": dx, "d_z": dz} for dx in args.dx for dz in args.dz]
    params = {"levels": args.levels, "temperature": args.temperature}
    H.sweep(H.config_from_args(args, "structure", dims_list, params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
