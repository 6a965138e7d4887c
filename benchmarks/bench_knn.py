#!/usr/bin/env python
"""Benchmark structure_ops.knn (one side's top-k lists) and structure_ops.mutual_knn on the CPU.

Providers: reference (structure_ops.reference.knn on L2-normalized rows, which structure_ops.knn is
documented to equal, and structure_ops.reference.mutual_knn), compile_reference (torch.compile of those)
and cpu (backend="cpu"). Mode: fwd only. FLOP model: 2N²d per side (knn 2N²d, mutual_knn 4N²d); the
top-k selection is not counted. k defaults to "rice" = ceil(2 N^(1/3)).

    python benchmarks/bench_knn.py                  # -> benchmarks/results/cpu/knn.json, mutual_knn.json
    python benchmarks/bench_knn.py --quick --out /tmp/bench
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
    H.add_common_args(p, DEFAULT_SIZES, modes=("fwd",))
    p.add_argument("--d", type=H.int_list, default=[768], help="feature width(s), comma list (default 768)")
    p.add_argument("--k", default="rice", help='neighbours: an int or "rice" | "sqrt" | "sturges" (default rice)')
    p.add_argument("--ops", type=H.str_list, default=["knn", "mutual_knn"], help="comma list of knn, mutual_knn")
    args = p.parse_args(argv)
    H.finish_args(args, DEFAULT_SIZES, modes=("fwd",))
    k = int(args.k) if args.k.isdigit() else args.k
    for op in args.ops:
        if op not in ("knn", "mutual_knn"):
            raise SystemExit(f"unknown op {op!r}; choose from knn, mutual_knn")
        H.sweep(H.config_from_args(args, op, [{"d": d} for d in args.d], {"k": k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
