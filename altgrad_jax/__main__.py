"""Command line: ``altgrad-jax formats`` prints the format table, ``altgrad-jax sweep`` runs the
format-comparison sweep (also as ``python -m altgrad_jax ...``); no command runs the default sweep.

Bad arguments end the program with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from altgrad_jax.formats import format_table

PROG = "altgrad-jax"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _names(values: Sequence[str]) -> tuple[str, ...]:
    """Accepts ``E4M3 E5M2`` as well as ``E4M3,E5M2``."""
    return tuple(name for value in values for name in value.split(",") if name)


def _parser() -> argparse.ArgumentParser:
    from altgrad_jax.experiments.sweep import DEFAULT_FORMATS, DEFAULT_RULES, RULE_NAMES

    parser = _Parser(prog=PROG, description="Simulated low-bit float training and bit-stall.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("formats", help="print the table of registered formats")
    sweep = commands.add_parser(
        "sweep",
        help="train a char transformer under each format and update rule, and compare",
        description="Trains the same small model under each format and update rule and writes "
        "a table, results.json/csv, plots and report.md to the output folder.",
    )
    sweep.add_argument(
        "--formats",
        nargs="+",
        default=list(DEFAULT_FORMATS),
        metavar="FMT",
        help=f"formats to run (default: {' '.join(DEFAULT_FORMATS)})",
    )
    sweep.add_argument(
        "--rules",
        nargs="+",
        default=list(DEFAULT_RULES),
        metavar="RULE",
        help=f"update rules, from {', '.join(RULE_NAMES)} (default: {' '.join(DEFAULT_RULES)})",
    )
    sweep.add_argument("--no-baseline", action="store_true", help="skip the float32 run")
    sweep.add_argument("--steps", type=_positive_int, default=300, help="steps per run")
    sweep.add_argument("--eval-every", type=_positive_int, default=50, help="steps per eval")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam learning rate")
    sweep.add_argument(
        "--ulp-steps",
        type=_positive_float,
        default=1.0,
        help="grid steps per unit of Adam's direction for the 'ulp' rule",
    )
    sweep.add_argument("--batch-size", type=_positive_int, default=16)
    sweep.add_argument("--context", type=_positive_int, default=64, help="characters per sequence")
    sweep.add_argument("--d-model", type=_positive_int, default=64)
    sweep.add_argument("--heads", type=_positive_int, default=4)
    sweep.add_argument("--layers", type=_positive_int, default=2)
    data = sweep.add_mutually_exclusive_group()
    data.add_argument("--text", metavar="PATH", help="train on this UTF-8 text file instead")
    data.add_argument(
        "--synthetic",
        action="store_true",
        help="the tiny synthetic Markov-chain text (for quick checks)",
    )
    sweep.add_argument("--out", default="runs/sweep", help="output folder (default: runs/sweep)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _sweep_inputs(args: argparse.Namespace):
    """The sweep config and corpus from the arguments; ``ValueError`` for bad input."""
    from altgrad_jax.experiments import data
    from altgrad_jax.experiments.sweep import SweepConfig

    config = SweepConfig(
        formats=_names(args.formats),
        rules=_names(args.rules),
        baseline=not args.no_baseline,
        steps=args.steps,
        eval_every=args.eval_every,
        seed=args.seed,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        context=args.context,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        ulp_steps=args.ulp_steps,
    )
    config.model_config(2)  # checks the model size before any data is read
    if args.text is not None:
        text, name = data.load_text_file(args.text), args.text
    elif args.synthetic:
        text, name = data.synthetic_text(), "synthetic Markov chain"
    else:
        text, name = data.stdlib_text(), "CPython pydoc_data.topics"
    return config, data.make_corpus(text, name, min_split=args.context + 2)


def _sweep(args: argparse.Namespace, config, corpus) -> None:
    from altgrad_jax.experiments.report import format_table as results_table
    from altgrad_jax.experiments.report import write_outputs
    from altgrad_jax.experiments.sweep import run_sweep

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the "experiments" extra
            tqdm = None
        if tqdm is not None:
            total = len(config.runs()) * config.steps
            bar = tqdm(total=total, unit="step", desc="sweep", file=sys.stderr)

    def progress(steps: int, label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(steps)

    result = run_sweep(config, corpus, progress)
    if bar is not None:
        bar.close()
    written = write_outputs(result, args.out)
    print(results_table(result))
    compiled = ", ".join(f"{rule}: {n}" for rule, n in result.compilations.items())
    print(f"\n{len(result.runs)} runs in {result.wall_time_s:.1f} s; compilations: {compiled}")
    print(f"wrote {', '.join(path.name for path in written)} to {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``altgrad-jax`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv or ["sweep"])
    if args.command == "formats":
        print(format_table())
        return 0
    try:
        config, corpus = _sweep_inputs(args)
    except ValueError as err:
        print(f"{PROG} sweep: error: {err}", file=sys.stderr)
        return 2
    _sweep(args, config, corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
