"""Command line: ``emalora-fast demo | bench`` (also ``python -m emalora_fast``)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, output_dir=args.output_dir)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .benchmarks.report import run_bench

    run_bench(quick=args.quick, output_dir=args.output_dir, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emalora-fast",
        description="Fused EMA/BEMA averaging of LoRA adapters and streaming distillation losses.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny LoRA model and compare it with its BEMA")
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    demo.add_argument("--output-dir", default="emalora-runs/demo", help="where the adapter goes")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="kernel microbenchmarks against the usual alternatives")
    bench.add_argument("--quick", action="store_true", help="small sets, a few repetitions")
    bench.add_argument("--output-dir", default="emalora-runs/bench", help="CSV/JSON/PNG go here")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        print(f"emalora-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
