"""The ``structure-ops`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="structure-ops",
        description="Fused STRUCTURE / CLIP losses for multimodal alignment. Run `structure-ops demo` for a tour.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="exactness check, a small alignment run and a speed check, on the CPU")
    demo.add_argument("--out", default="runs/demo", help="output directory (report.json)")
    demo.add_argument("--backend", default="auto", help="auto | reference | cpu | triton | cuda")
    demo.add_argument("--quick", action="store_true", help="smaller sizes, one seed, 60 steps (a few seconds)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds of the alignment comparison")
    sub.add_parser("info", help="versions, devices, built extensions, which backend runs each op")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import main as info_main

        info_main()
        return 0
    from .demo import run

    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    run(args.out, backend=args.backend, quick=args.quick, seeds=args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
