"""Command line: ``python -m eexit demo`` runs the embedded default job (see :mod:`eexit.demo`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eexit", description="eexit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small ViT on the bundled digits, attach eexit, compare methods")
    demo.add_argument(
        "--out", default="outputs/demo", help="folder for the adapter, plot and results (default: %(default)s)"
    )
    demo.add_argument("--lams", default="0.01,0.1,0.3,1.0", help="comma-separated λ values (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        lams = [float(v) for v in args.lams.split(",") if v.strip()]
        run_demo(out_dir=args.out, lams=lams, quick=args.quick, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
