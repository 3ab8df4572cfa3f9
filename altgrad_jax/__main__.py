"""Command line: ``altgrad-jax formats`` prints the format table, ``altgrad-jax sweep`` runs the
format-comparison sweep (also as ``python -m altgrad_jax ...``); no command runs the default sweep.

Bad arguments end the program with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from altgrad_jax.formats import format_table

if TYPE_CHECKING:
    from altgrad_jax.experiments.sweep import ConfigOption

PROG = "altgrad-jax"
DEFAULT_OUT = "runs/sweep"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _names(values: Sequence[str]) -> tuple[str, ...]:
    """Accepts ``E4M3 E5M2`` as well as ``E4M3,E5M2``."""
    return tuple(name for value in values for name in value.split(",") if name)


def _show(value: Any) -> str:
    """A default as the user would type it."""
    return " ".join(value) if isinstance(value, tuple) else str(value)


def _converter(option: ConfigOption) -> Callable[[str], Any]:
    """Text to the option's type; its checker judges the value later (``_config_from_args``)."""
    kind = float if option.type == (float | None) else option.type
    article = "an" if kind.__name__[0] in "aeiou" else "a"

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {article} {kind.__name__}, got {text!r}"
            ) from None

    return convert


def _add_config_arguments(
    parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None
) -> None:
    """One flag per leaf field of :class:`SweepConfig`: its flag, help and default (replaced
    by ``defaults``' value for the fields it names)."""
    from altgrad_jax.experiments.sweep import config_options

    for option in config_options():
        if defaults and option.name in defaults:
            option = option._replace(default=defaults[option.name])
        dest = ".".join(option.path)
        if option.type is bool:
            action = "store_false" if option.default else "store_true"
            verb = "turn off" if option.default else "turn on"
            help = f"{verb}: {option.help} (default: {'on' if option.default else 'off'})"
            parser.add_argument(option.flag, dest=dest, action=action, help=help)
        elif option.type == tuple[str, ...]:
            metavar = option.name.upper().rstrip("S")
            help = f"{option.help} (default: {_show(option.default)})"
            parser.add_argument(
                option.flag,
                dest=dest,
                nargs="+",
                metavar=metavar,
                default=option.default,
                help=help,
            )
        else:
            help = f"{option.help} (default: {_show(option.default)})"
            parser.add_argument(
                option.flag,
                dest=dest,
                type=_converter(option),
                default=option.default,
                metavar=option.name.upper(),
                help=help,
            )


def _config_from_args(args: argparse.Namespace):
    """The :class:`SweepConfig` of the parsed flags; ``ValueError`` names a bad flag's value."""
    from altgrad_jax.experiments.sweep import build_config, config_options

    values = {}
    for option in config_options():
        value = getattr(args, ".".join(option.path))
        if option.type == tuple[str, ...]:
            value = _names(value)
        elif option.check is not None:
            value = option.check(option.flag, value)  # the config's checker, named by the flag
        values[option.path] = value
    return build_config(values)


def _parser(defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Simulated low-bit float training and bit-stall.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("formats", help="print the table of registered formats")
    sweep = commands.add_parser(
        "sweep",
        help="train a char transformer under each format and update rule, and compare",
        description="Trains the same small model under each format and update rule and writes "
        "a table, results.json/csv, plots and report.md to the output folder. results.json and "
        "results.csv are rewritten after every run, so an interrupted sweep keeps what it did.",
    )
    _add_config_arguments(sweep, defaults)
    data = sweep.add_mutually_exclusive_group()
    data.add_argument("--text", metavar="PATH", help="train on this UTF-8 text file instead")
    data.add_argument(
        "--synthetic",
        action="store_true",
        help="the tiny synthetic Markov-chain text (for quick checks)",
    )
    sweep.add_argument(
        "--full",
        action="store_true",
        help="the complete grid: every 8-bit format, BF16 and FP16 under every rule, 300 steps "
        "(other flags still override it)",
    )
    sweep.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parses ``argv``; with ``--full`` the defaults become :data:`FULL_GRID`'s values."""
    args = _parser().parse_args(argv)
    if getattr(args, "full", False):
        from altgrad_jax.experiments.sweep import FULL_GRID

        args = _parser(FULL_GRID).parse_args(argv)
    return args


def _sweep_inputs(args: argparse.Namespace):
    """The sweep config and corpus from the arguments, the output folder checked writable.

    Raises ``ValueError`` (one line) for bad input, before any training.
    """
    from altgrad_jax.experiments import data
    from altgrad_jax.experiments.report import check_output_dir

    config = _config_from_args(args)
    if args.text is not None:
        text, name = data.load_text_file(args.text), args.text
    elif args.synthetic:
        text, name = data.synthetic_text(), "synthetic Markov chain"
    else:
        text, name = data.stdlib_text(), "CPython pydoc_data.topics"
    corpus = data.make_corpus(text, name, min_split=config.model.context + 2)
    check_output_dir(args.out)
    return config, corpus


def _sweep(args: argparse.Namespace, config, corpus) -> None:
    from altgrad_jax.experiments.report import format_table as results_table
    from altgrad_jax.experiments.report import write_outputs, write_results
    from altgrad_jax.experiments.sweep import run_sweep

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the "experiments" extra
            tqdm = None
        if tqdm is not None:
            total = len(config.runs()) * config.steps  # run steps
            bar = tqdm(total=total, unit="step", desc="sweep", file=sys.stderr)

    def progress(steps: int, label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(steps)

    try:
        result = run_sweep(
            config, corpus, progress, on_run=lambda so_far: write_results(so_far, args.out)
        )
    finally:
        if bar is not None:
            bar.close()
    written = write_outputs(result, args.out)
    print(results_table(result))
    compiled = ", ".join(f"{rule}: {n}" for rule, n in result.compilations.items())
    print(
        f"\n{len(result.runs)} runs in {result.wall_time_s:.1f} s ({result.compile_time_s:.1f} s "
        f"compiling, {result.compile_wait_s:.1f} s of it not overlapped with training); "
        f"compilations: {compiled}"
    )
    print(f"wrote {', '.join(path.name for path in written)} to {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``altgrad-jax`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv or ["sweep"])
    if args.command == "formats":
        print(format_table())
        return 0
    try:
        config, corpus = _sweep_inputs(args)
    except ValueError as err:
        print(f"{PROG} sweep: error: {err}", file=sys.stderr)
        return 2
    try:
        _sweep(args, config, corpus)
    except KeyboardInterrupt:
        print(f"{PROG} sweep: interrupted; finished runs are in {args.out}", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The program (console script and ``python -m altgrad_jax``): :func:`main`, then exit.

    After Ctrl-C, XLA may still be compiling (the sweep's background thread) or computing in
    native threads, and a normal interpreter exit under them aborts the process; so an
    interrupted sweep exits at once instead (its finished runs are on disk already).
    """
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
