#!/usr/bin/env python
"""Benchmark structure_ops.siglip_loss (pairwise sigmoid loss, value and gradient in one pass) on the CPU.

Providers: reference (eager structure_ops.reference.siglip_loss, which materializes the N × N logits),
compile_reference (torch.compile of it) and cpu (structure_ops.siglip_loss(..., backend="cpu"): row panels,
O(B·N) memory). Modes: fwd and fwd+bwd (grad w.r.t. image, text, logit_scale and logit_bias). Inputs at the
SigLIP paper's initialization (s = 10, β = −10). FLOP model: fwd 2N²d, fwd+bwd 6N²d.

    python benchmarks/bench_siglip.py                 # default sweep -> benchmarks/results/cpu/siglip.json
    python benchmarks/bench_siglip.py --quick --out /tmp/bench
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
    H.sweep(H.config_from_args(args, "siglip", [{"d": d} for d in args.d], {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
