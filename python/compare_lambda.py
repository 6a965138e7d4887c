#!/usr/bin/env python
"""Sweep λ (and STRUCTURE levels, layer choices, seeds) on an existing run folder and compare the heads.

The same as the installed command ``structure-ops compare`` (the code lives in ``structure_ops.train.compare``;
this script stays for the recipes' users). The run folder is one written by ``coco_dinov2_roberta.py`` or by
``structure-ops extract`` (+ ``select-layers`` for ``--layers best``): its cached features, splits and zero-shot
set are reused, nothing is re-extracted.

    python python/compare_lambda.py --run runs/coco --lams 0 1 10 --levels 1 2 --seeds 0 1 2

Every configuration is a named training run in <run>/train/ (``compare_<layers>_lam<λ>_L<levels>_seed<s>``);
the table goes to <run>/compare/results.{json,md} with accuracy.png and training_curves.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from structure_ops.train import compare as C


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    C.add_arguments(p)
    a = p.parse_args(argv)
    if any(lam < 0 for lam in a.lams) or any(lv < 1 for lv in a.levels):
        p.error("--lams must be >= 0 and --levels >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        C.compare(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"{Path(__file__).name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
