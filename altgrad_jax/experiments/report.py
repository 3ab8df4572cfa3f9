"""What a sweep writes: a terminal table, results.json / results.csv, PNG plots and report.md.

``results.json`` is ``{"meta": {...}, "runs": [{...}, ...]}``; the fields of a run are documented
in :data:`RUN_FIELDS` and those of ``meta`` in :data:`META_FIELDS`, both read from the field
metadata of :class:`RunResult` and :class:`SweepResult`. ``results.csv`` has one row per run with
the columns of :func:`csv_columns` (the per-role rates flattened to ``saturation_weights`` etc.).
Rates are fractions in [0, 1]; ``null`` means "not measured" (the float32 baseline quantizes
nothing) or "not reached" (a run that diverged has no final loss).

:func:`write_results` writes the two results files and is cheap enough to call after every run,
so an interrupted sweep keeps what it finished; :func:`check_output_dir` says before any training
whether the folder can be written.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from altgrad_jax.optim import HISTOGRAM_EDGES, HISTOGRAM_LABELS

from .sweep import BASELINE, ROLES, RULE_NAMES, RunResult, SweepResult, stores_nearest

__all__ = [
    "META_FIELDS",
    "OUTPUT_FILES",
    "RESULTS_FILES",
    "RUN_FIELDS",
    "check_output_dir",
    "csv_columns",
    "format_table",
    "write_outputs",
    "write_results",
]

RUN_FIELDS: dict[str, str] = {
    field.name: field.metadata["doc"] for field in dataclasses.fields(RunResult)
}

META_FIELDS: dict[str, str] = {
    **{
        field.name: field.metadata["doc"]
        for field in dataclasses.fields(SweepResult)
        if field.name != "runs"
    },
    "complete": "whether every run of the config finished (false for an interrupted sweep)",
    "jax_version": "the JAX that ran it",
    "hist_edges": "bin edges of update_ulp_hist",
    "fields": "this documentation of the run fields",
}

RESULTS_FILES: tuple[str, ...] = ("results.json", "results.csv")
OUTPUT_FILES: tuple[str, ...] = (
    *RESULTS_FILES,
    "report.md",
    "loss_curves.png",
    "stall_rate.png",
    "flip_rate.png",
    "update_ulp_hist.png",
)

_LOSING = " and ".join(rule for rule in RULE_NAMES if stores_nearest(rule))
_LANDING = ", ".join(rule for rule in RULE_NAMES if not stores_nearest(rule))
# What the stall rate means, said wherever it is shown.
STALL_MEANING = (
    "Stall is the fraction of Adam's updates that nearest rounding onto the storage grid would "
    f"lose (Q(w + u) == Q(w)). Under nearest storage (rules {_LOSING}) those updates are lost; "
    f"under {_LANDING} storage the same number is what nearest rounding would have lost: those "
    "rules land such updates, in expectation or later, which the landed ratio shows."
)
_STALL_CAPTION = (
    "Stall: updates that nearest rounding onto the storage grid would lose, Q(w + u) == Q(w). "
    f"Lost under {_LOSING} storage; {_LANDING} storage land them (in expectation or later), so "
    "there the curve is what nearest rounding would have lost."
)


def csv_columns() -> list[str]:
    """The columns of ``results.csv``, from the ``csv`` metadata of :class:`RunResult`'s fields."""
    columns = []
    for field in dataclasses.fields(RunResult):
        layout = field.metadata["csv"]
        if layout == "column":
            columns.append(field.name)
        elif layout == "per_role":
            columns += [f"{field.name}_{role}" for role in ROLES]
    return columns


def _csv_row(run: RunResult) -> list[Any]:
    row: list[Any] = []
    for field in dataclasses.fields(RunResult):
        layout, value = field.metadata["csv"], getattr(run, field.name)
        if layout == "column":
            row.append(value)
        elif layout == "per_role":
            row += [value[role] for role in ROLES]
    return ["" if value is None else value for value in row]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _small_pct(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{100 * value:.2g}%"


def format_table(result: SweepResult) -> str:
    """The terminal table: one row per run."""
    header = (
        "format",
        "rule",
        "val loss",
        "best",
        "stall",
        "flip",
        "landed",
        "underflow w/a/g",
        "saturation w/a/g",
        "status",
        "run s",
        "compile s",
    )
    rows = [header]
    for run in result.runs:
        rows.append(
            (
                run.format or "-",
                run.rule,
                _num(run.final_val_loss),
                _num(run.best_val_loss),
                _pct(run.stall_rate),
                _pct(run.flip_rate),
                _num(run.landed_ratio, 2),
                "/".join(_small_pct(run.underflow[r]) for r in ROLES),
                "/".join(_small_pct(run.saturation[r]) for r in ROLES),
                run.status if run.diverged_step is None else f"diverged@{run.diverged_step}",
                f"{run.wall_time_s:.1f}",
                f"{run.compile_time_s:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _meta(result: SweepResult) -> dict[str, Any]:
    import jax

    meta = {
        field.name: getattr(result, field.name)
        for field in dataclasses.fields(result)
        if field.name != "runs"
    }
    return {
        **meta,
        "config": result.config.flat(),
        "complete": result.complete,
        "jax_version": jax.__version__,
        "hist_edges": list(HISTOGRAM_EDGES),
        "fields": RUN_FIELDS,
    }


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``.

    An interrupt while writing leaves the previous complete file, never half of a new one.
    """
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False, newline=""
    ) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def _results_json(result: SweepResult) -> str:
    runs = [dataclasses.asdict(run) for run in result.runs]
    return json.dumps({"meta": _meta(result), "runs": runs}, indent=1) + "\n"


def _results_csv(result: SweepResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(csv_columns())
    writer.writerows(_csv_row(run) for run in result.runs)
    return buffer.getvalue()


def check_output_dir(out_dir: str | Path) -> Path:
    """Creates ``out_dir`` if needed and checks a file can be written there; returns its path.

    Called before training, so a bad ``--out`` fails in a second rather than after the sweep.

    Raises:
      ValueError: one line naming the folder and the reason.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"cannot write to output folder {str(out)!r}: {reason}") from None
    return out


def write_results(result: SweepResult, out_dir: str | Path) -> list[Path]:
    """Writes :data:`RESULTS_FILES` (the runs so far) into ``out_dir``; returns their paths.

    Each file is replaced whole, so calling this after every run keeps a readable record of a
    sweep that is interrupted later.
    """
    out = Path(out_dir)
    _write_atomic(out / "results.json", _results_json(result))
    _write_atomic(out / "results.csv", _results_csv(result))
    return [out / name for name in RESULTS_FILES]


def _rules(result: SweepResult) -> list[str]:
    return list(dict.fromkeys(run.rule for run in result.runs if run.rule != BASELINE))


def _baseline(result: SweepResult) -> RunResult | None:
    return next((run for run in result.runs if run.rule == BASELINE), None)


def _smooth(values: list[float | None], width: int) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    clean = [v for v in values if v is not None]
    for i in range(0, len(clean) - width + 1, max(width // 2, 1)):
        xs.append(i + width)
        ys.append(sum(clean[i : i + width]) / width)
    return xs, ys


def _stall_label(rule: str) -> str:
    """The y label of a stall curve: lost updates, or what nearest rounding would have lost."""
    if stores_nearest(rule):
        return "stall rate (updates lost)"
    return "stall rate (what nearest would lose;\nthis rule lands them)"


def _plot_per_rule(result: SweepResult, path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = _rules(result) or [BASELINE]
    fig, axes = plt.subplots(1, len(rules), figsize=(4.5 * len(rules), 3.6), squeeze=False)
    baseline = _baseline(result)
    for ax, rule in zip(axes[0], rules, strict=True):
        for run in result.runs:
            if run.rule != rule:
                continue
            if what == "loss":
                points = [
                    (s, v)
                    for s, v in zip(run.eval_steps, run.val_losses, strict=True)
                    if v is not None
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), marker=".", label=run.format)
            else:
                curve = run.stall_curve if what == "stall" else run.flip_curve
                xs, ys = _smooth(curve, max(len(curve) // 30, 1))
                ax.plot(xs, ys, label=run.format)
        if what == "loss" and baseline is not None and baseline.val_losses:
            ax.plot(baseline.eval_steps, baseline.val_losses, "k--", label=BASELINE)
        ax.set_title(f"rule: {rule}")
        ax.set_xlabel("step")
        ylabel = {"loss": "validation loss", "stall": _stall_label(rule), "flip": "flip rate"}
        ax.set_ylabel(ylabel[what], fontsize=8 if what == "stall" else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    if what == "stall":
        fig.subplots_adjust(bottom=0.22)
        fig.text(0.01, 0.01, _STALL_CAPTION, fontsize=7, va="bottom", wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_hist(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = _rules(result) or [BASELINE]
    fig, axes = plt.subplots(1, len(rules), figsize=(4.5 * len(rules), 3.6), squeeze=False)
    for ax, rule in zip(axes[0], rules, strict=True):
        runs = [run for run in result.runs if run.rule == rule and run.format is not None]
        width = 0.8 / max(len(runs), 1)
        for k, run in enumerate(runs):
            counts = [run.update_ulp_hist[label] for label in HISTOGRAM_LABELS]
            total = max(sum(counts), 1)
            xs = [i + k * width for i in range(len(HISTOGRAM_LABELS))]
            ax.bar(xs, [c / total for c in counts], width=width, label=run.format)
        ax.set_xticks(
            [i + 0.4 for i in range(len(HISTOGRAM_LABELS))],
            HISTOGRAM_LABELS,
            fontsize=7,
            rotation=30,
        )
        # Left of this line (|u| < ulp / 2) nearest rounding loses the update.
        ax.axvline(HISTOGRAM_LABELS.index("[1/2, 1)") - 0.1, color="k", lw=0.8, ls=":")
        ax.set_title(f"|update| / ulp(w), rule: {rule}")
        ax.set_ylabel("fraction of updates")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _best_per_format(result: SweepResult) -> dict[str, RunResult]:
    """The finished run with the lowest final validation loss for each format."""
    best: dict[str, RunResult] = {}
    for run in result.runs:
        if run.format is None or run.final_val_loss is None:
            continue
        if run.format not in best or run.final_val_loss < best[run.format].final_val_loss:
            best[run.format] = run
    return best


def _answer(result: SweepResult) -> list[str]:
    """The research question answered in a few sentences, from the numbers."""
    nearest = [r for r in result.runs if r.rule == "nearest" and r.stall_rate is not None]
    lines = ["## Answer", ""]
    if nearest:
        worst = max(nearest, key=lambda run: run.stall_rate)
        lines.append(
            f"- Most stall: **{worst.format}**, {_pct(worst.stall_rate)} of updates lost under "
            f"nearest storage (landed ratio {_num(worst.landed_ratio, 2)})."
        )
    best = _best_per_format(result)
    remedies = [run.rule for run in best.values() if run.rule != "nearest"]
    if remedies:
        winner = max(dict.fromkeys(remedies), key=remedies.count)
        lines.append(
            f"- Best rescue: **{winner}**, best for {remedies.count(winner)} of {len(best)} "
            "formats."
        )
    baseline = _baseline(result)
    if baseline is not None and baseline.final_val_loss is not None and best:
        gaps = ", ".join(
            f"{fmt} {run.final_val_loss - baseline.final_val_loss:+.3f} ({run.rule})"
            for fmt, run in best.items()
        )
        lines.append(f"- Best final validation loss minus float32's, per format: {gaps}.")
    twins = {}
    for run in nearest:
        twins.setdefault(tuple(run.train_loss), []).append(run.format)
    for names in twins.values():
        if len(names) > 1:
            lines.append(
                f"- {' and '.join(names)} trained identically: under power-of-two storage "
                "scaling their grids coincide (E1M6 is fixed point; see notebooks/01_formats)."
            )
    return [*lines, ""] if len(lines) > 2 else []


def _report_md(result: SweepResult) -> str:
    cfg = result.config
    baseline = _baseline(result)
    runs = [run for run in result.runs if run.format is not None]
    lines = [
        "# Which 8-bit format stalls most, and which update rule rescues it?",
        "",
        f"Character-level transformer ({result.num_params:,} parameters) on `{result.corpus}` "
        f"(vocabulary {result.vocab_size}), {cfg.steps} Adam steps at learning rate "
        f"{cfg.train.learning_rate:g}, batch {cfg.train.batch_size} x {cfg.model.context} "
        f"characters, seed {cfg.seed}. Weights are stored on the format's grid by the update "
        "rule; activations and gradients of every dense layer are quantized with current "
        f"per-tensor scaling. Sweep wall time {result.wall_time_s:.0f} s, of which "
        f"{result.compile_time_s:.0f} s compiling; compiled programs per rule: "
        + ", ".join(f"{rule} {n}" for rule, n in result.compilations.items())
        + ".",
        "",
    ]
    if not result.complete:
        lines += [
            f"**Incomplete sweep**: {len(result.runs)} of {len(cfg.runs())} runs finished.",
            "",
        ]
    lines += _answer(result)
    if baseline is not None:
        lines += [
            f"float32 baseline: final validation loss {_num(baseline.final_val_loss)} "
            f"(best {_num(baseline.best_val_loss)}).",
            "",
        ]
    nearest = [run for run in runs if run.rule == "nearest" and run.stall_rate is not None]
    if nearest:
        worst = max(nearest, key=lambda run: run.stall_rate)
        best = min(nearest, key=lambda run: run.stall_rate)
        lines += [
            "## Stall under nearest storage",
            "",
            f"**{worst.format} stalls most**: {_pct(worst.stall_rate)} of Adam's updates leave "
            f"its stored weights unchanged (final validation loss "
            f"{_num(worst.final_val_loss)}). {best.format} stalls least, "
            f"{_pct(best.stall_rate)}.",
            "",
            STALL_MEANING,
            "",
            "| format | stall | flip | val loss | status |",
            "|---|---|---|---|---|",
        ]
        for run in sorted(nearest, key=lambda run: -run.stall_rate):
            lines.append(
                f"| {run.format} | {_pct(run.stall_rate)} | {_pct(run.flip_rate)} | "
                f"{_num(run.final_val_loss)} | {run.status} |"
            )
        lines.append("")
    rules = _rules(result)
    if len(rules) > 1:
        lines += [
            "## Best rule per format",
            "",
            "Final validation loss per rule (lower is better); the best is in bold.",
            "",
            "| format | " + " | ".join(rules) + " | best |",
            "|---|" + "---|" * (len(rules) + 1),
        ]
        for fmt in dict.fromkeys(run.format for run in runs):
            by_rule = {run.rule: run for run in runs if run.format == fmt}
            finished = [run for run in by_rule.values() if run.final_val_loss is not None]
            winner = min(finished, key=lambda run: run.final_val_loss) if finished else None
            cells = []
            for rule in rules:
                run = by_rule.get(rule)
                text = "-" if run is None else _num(run.final_val_loss)
                if run is not None and run.status == "diverged":
                    text = f"diverged@{run.diverged_step}"
                cells.append(f"**{text}**" if run is winner and winner is not None else text)
            lines.append(
                f"| {fmt} | " + " | ".join(cells) + f" | {winner.rule if winner else '-'} |"
            )
        lines.append("")
    lines += [
        "## Files",
        "",
        "`results.json` (all numbers, fields documented in its `meta.fields`), `results.csv`, "
        "`loss_curves.png`, `stall_rate.png`, `flip_rate.png`, `update_ulp_hist.png`.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: SweepResult, out_dir: str | Path) -> list[Path]:
    """Writes the files of :data:`OUTPUT_FILES` into ``out_dir``; returns the paths written.

    The PNG plots need matplotlib (the "experiments" extra); without it they are skipped.
    """
    out = check_output_dir(out_dir)
    written = write_results(result, out)
    (out / "report.md").write_text(_report_md(result))
    written.append(out / "report.md")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    _plot_per_rule(result, out / "loss_curves.png", "loss")
    _plot_per_rule(result, out / "stall_rate.png", "stall")
    _plot_per_rule(result, out / "flip_rate.png", "flip")
    _plot_hist(result, out / "update_ulp_hist.png")
    return [out / name for name in OUTPUT_FILES]
