#!/usr/bin/env python
"""Benchmark structure_ops.clip_loss (symmetric InfoNCE, both directions in one op) on the CPU.

Providers: reference (eager structure_ops.reference.clip_loss), compile_reference (torch.compile of it)
and cpu (structure_ops.clip_loss(..., backend="cpu")). Modes: fwd and fwd+bwd (grad w.r.t. image, text
and logit_scale). FLOP model (docs/kernels.md §4): fwd 2N²d, fwd+bwd 8N²d.

    python benchmarks/bench_clip.py                 # default sweep -> benchmarks/results/cpu/clip.json
    python benchmarks/bench_clip.py --quick --out /tmp/bench
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
    p.add_argument("--d", type=H.int_list, default=[512], help="embedding width(s), comma list (default 512)")
    args = p.parse_args(argv)
    H.finish_args(args, DEFAULT_SIZES)
    H.sweep(H.config_from_args(args, "clip", [{"d": d} for d in args.d], {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
