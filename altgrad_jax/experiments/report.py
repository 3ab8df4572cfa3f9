"""What a sweep writes: a terminal table, results.json / results.csv, PNG plots and report.md.

``results.json`` is ``{"meta": {...}, "cells": [{...}, ...], "runs": [{...}, ...]}``: one run per
(format, rule, seed), one cell per (format, rule) with the mean and 95% Student-t interval of
each statistic over the seeds (:class:`CellResult`). The fields of a run are documented in
:data:`RUN_FIELDS`, those of a cell in :data:`CELL_FIELDS` and those of ``meta`` in
:data:`META_FIELDS`, all read from the field metadata of the dataclasses. ``results.csv`` has
one row per run with the columns of :func:`csv_columns` (the per-role rates flattened to
``saturation_weights`` etc.).
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

from . import stats
from .model import LAYER_GROUPS
from .sweep import (
    BASELINE,
    ROLES,
    RULE_NAMES,
    CellResult,
    RunResult,
    SweepResult,
    stores_nearest,
)

__all__ = [
    "CELL_FIELDS",
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

CELL_FIELDS: dict[str, str] = {
    field.name: field.metadata["doc"] for field in dataclasses.fields(CellResult)
}

META_FIELDS: dict[str, str] = {
    **{
        field.name: field.metadata["doc"]
        for field in dataclasses.fields(SweepResult)
        if field.name not in ("runs", "cells")
    },
    "complete": "whether every run of the config finished (false for an interrupted sweep)",
    "jax_version": "the JAX that ran it",
    "hist_edges": "bin edges of update_ulp_hist",
    "fields": "this documentation of the run fields",
    "cell_fields": "this documentation of the cell fields",
}

RESULTS_FILES: tuple[str, ...] = ("results.json", "results.csv")
OUTPUT_FILES: tuple[str, ...] = (
    *RESULTS_FILES,
    "report.md",
    "loss_curves.png",
    "stall_rate.png",
    "flip_rate.png",
    "update_ulp_hist.png",
    "layer_stall.png",
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
        elif layout == "per_layer":
            columns += [f"{field.name}_{group}" for group in LAYER_GROUPS]
    return columns


def _csv_row(run: RunResult) -> list[Any]:
    row: list[Any] = []
    for field in dataclasses.fields(RunResult):
        layout, value = field.metadata["csv"], getattr(run, field.name)
        if layout == "column":
            row.append(value)
        elif layout == "per_role":
            row += [value[role] for role in ROLES]
        elif layout == "per_layer":
            row += [value[group] for group in LAYER_GROUPS]
    return ["" if value is None else value for value in row]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _small_pct(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{100 * value:.2g}%"


def _iv(value: stats.Interval, digits: int = 3, pct: bool = False) -> str:
    """``mean +- half-width`` (the 95% interval), ``mean`` alone for one seed, "-" if none."""
    if value.mean is None:
        return "-"
    scale, unit = (100, "%") if pct else (1, "")
    text = f"{scale * value.mean:.{1 if pct else digits}f}"
    if value.half_width is not None:
        text += f"±{scale * value.half_width:.{1 if pct else digits}f}"
    return text + unit


def _status(cell: CellResult) -> str:
    return f"{cell.diverged}/{cell.seeds} diverged" if cell.diverged else "ok"


def format_table(result: SweepResult) -> str:
    """The terminal table: one row per (format, rule) cell, mean ± 95% interval over seeds."""
    header = (
        "format",
        "rule",
        "grad",
        "val loss",
        "best",
        "stall",
        "flip",
        "landed",
        "state B/param",
        "status",
    )
    rows = [header]
    for cell in result.cells:
        rows.append(
            (
                cell.format or "-",
                cell.rule,
                cell.grad_format or "-",
                _iv(cell.final_val_loss),
                _iv(cell.best_val_loss),
                _iv(cell.stall_rate, pct=True),
                _iv(cell.flip_rate, pct=True),
                _iv(cell.landed_ratio, 2),
                f"{cell.extra_state_bytes:g}",
                _status(cell),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    seeds = result.config.seeds
    lines.append(f"(mean ± 95% Student-t interval over {seeds} seed{'s' * (seeds != 1)})")
    return "\n".join(line.rstrip() for line in lines)


def _meta(result: SweepResult) -> dict[str, Any]:
    import jax

    meta = {
        field.name: getattr(result, field.name)
        for field in dataclasses.fields(result)
        if field.name not in ("runs", "cells")
    }
    return {
        **meta,
        "config": result.config.flat(),
        "complete": result.complete,
        "jax_version": jax.__version__,
        "hist_edges": list(HISTOGRAM_EDGES),
        "fields": RUN_FIELDS,
        "cell_fields": CELL_FIELDS,
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
    cells = [dataclasses.asdict(cell) for cell in result.cells]
    return json.dumps({"meta": _meta(result), "cells": cells, "runs": runs}, indent=1) + "\n"


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
    return list(dict.fromkeys(cell.rule for cell in result.cells if cell.rule != BASELINE))


def _baseline(result: SweepResult) -> CellResult | None:
    return next((cell for cell in result.cells if cell.rule == BASELINE), None)


def _runs_of(result: SweepResult, fmt: str | None, rule: str) -> list[RunResult]:
    return [run for run in result.runs if run.format == fmt and run.rule == rule]


def _band(
    curves: list[list[float | None]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Pointwise mean and 95% interval of equally long curves (steps with any None left out)."""
    xs, mean, low, high = [], [], [], []
    for step, values in enumerate(zip(*curves, strict=False)):
        iv = stats.interval(values)
        if iv.mean is None or None in values:
            continue
        xs.append(step)
        mean.append(iv.mean)
        low.append(iv.low if iv.low is not None else iv.mean)
        high.append(iv.high if iv.high is not None else iv.mean)
    return xs, mean, low, high


def _smooth(values: list[float | None], width: int) -> list[float | None]:
    """Running mean over ``width`` steps (None where a window holds a None)."""
    out: list[float | None] = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(None if None in window else sum(window) / len(window))  # type: ignore[arg-type]
    return out


def _stall_label(rule: str) -> str:
    """The y label of a stall curve: lost updates, or what nearest rounding would have lost."""
    if stores_nearest(rule):
        return "stall rate (updates lost)"
    return "stall rate (what nearest would lose;\nthis rule lands them)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_per_rule(result: SweepResult, path: Path, what: str) -> None:
    """One panel per rule, one curve per format: the mean over seeds with its 95% band."""
    plt = _pyplot()
    rules = _rules(result) or [BASELINE]
    fig, axes = plt.subplots(1, len(rules), figsize=(4.5 * len(rules), 3.6), squeeze=False)
    baseline = _runs_of(result, None, BASELINE)
    for ax, rule in zip(axes[0], rules, strict=True):
        formats = dict.fromkeys(c.format for c in result.cells if c.rule == rule)
        for fmt in formats:
            runs = _runs_of(result, fmt, rule)
            if what == "loss":
                steps = runs[0].eval_steps
                curves = [run.val_losses for run in runs if run.eval_steps == steps]
                xs, mean, low, high = _band(curves)
                xs = [steps[i] for i in xs]
            else:
                curves = [run.stall_curve if what == "stall" else run.flip_curve for run in runs]
                width = max(len(curves[0]) // 30, 1)
                xs, mean, low, high = _band([_smooth(c, width) for c in curves])
                xs = [x + 1 for x in xs]
            if xs:
                (line,) = ax.plot(xs, mean, marker="." if what == "loss" else None, label=fmt)
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        if what == "loss" and baseline:
            xs, mean, low, high = _band([run.val_losses for run in baseline])
            xs = [baseline[0].eval_steps[i] for i in xs]
            ax.plot(xs, mean, "k--", label=BASELINE)
            ax.fill_between(xs, low, high, color="k", alpha=0.1)
        ax.set_title(f"rule: {rule}")
        ax.set_xlabel("step")
        ylabel = {"loss": "validation loss", "stall": _stall_label(rule), "flip": "flip rate"}
        ax.set_ylabel(ylabel[what], fontsize=8 if what == "stall" else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    caption = f"Mean over {result.config.seeds} seeds, band: 95% Student-t interval."
    if what == "stall":
        caption = f"{_STALL_CAPTION} {caption} Stall grows as the learning rate decays."
    fig.subplots_adjust(bottom=0.24)
    fig.text(0.01, 0.01, caption, fontsize=7, va="bottom", wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_hist(result: SweepResult, path: Path) -> None:
    """|u| / ulp(w) histograms per rule, the counts of all seeds of a cell summed."""
    plt = _pyplot()
    rules = _rules(result) or [BASELINE]
    fig, axes = plt.subplots(1, len(rules), figsize=(4.5 * len(rules), 3.6), squeeze=False)
    for ax, rule in zip(axes[0], rules, strict=True):
        formats = [c.format for c in result.cells if c.rule == rule and c.format is not None]
        width = 0.8 / max(len(formats), 1)
        for k, fmt in enumerate(formats):
            runs = _runs_of(result, fmt, rule)
            counts = [sum(run.update_ulp_hist[label] for run in runs) for label in HISTOGRAM_LABELS]
            total = max(sum(counts), 1)
            xs = [i + k * width for i in range(len(HISTOGRAM_LABELS))]
            ax.bar(xs, [c / total for c in counts], width=width, label=fmt)
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


def _plot_layers(result: SweepResult, path: Path) -> None:
    """Stall per layer group under nearest storage (or the first rule), one bar group per
    format, error bars the 95% interval over seeds."""
    plt = _pyplot()
    rules = _rules(result)
    rule = "nearest" if "nearest" in rules else (rules[0] if rules else BASELINE)
    cells = [c for c in result.cells if c.rule == rule and c.stall_rate.mean is not None]
    fig, ax = plt.subplots(figsize=(1.2 * len(LAYER_GROUPS) * max(len(cells), 1) / 2 + 3, 3.6))
    width = 0.8 / max(len(cells), 1)
    for k, cell in enumerate(cells):
        ivs = [cell.layer_stall[group] for group in LAYER_GROUPS]
        means = [iv.mean or 0.0 for iv in ivs]
        errors = [iv.half_width or 0.0 for iv in ivs]
        xs = [i + k * width for i in range(len(LAYER_GROUPS))]
        ax.bar(xs, means, width=width, yerr=errors, capsize=2, label=cell.format)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(LAYER_GROUPS))], LAYER_GROUPS)
    ax.set_ylabel(_stall_label(rule), fontsize=8)
    ax.set_title(f"stall per layer group, rule: {rule} (mean, 95% interval over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _order(tiers: list[list[str]]) -> str:
    """Tiers as text: ``a ≈ b < c`` (≈ tied within noise, < intervals separate)."""
    return " < ".join(" ≈ ".join(tier) for tier in tiers)


def _answer(result: SweepResult) -> list[str]:
    """The research question answered from the intervals: ranked only where they separate."""
    seeds = result.config.seeds
    lines = [
        "## Answer",
        "",
        f"Every number is the mean over **{seeds} seed{'s' * (seeds != 1)}** with its 95% "
        "Student-t interval; rules are ranked only where the intervals of their final "
        "validation losses do not overlap (`<`), otherwise they are a tie within noise (`≈`).",
        "",
    ]
    nearest = [c for c in result.cells if c.rule == "nearest" and c.stall_rate.mean is not None]
    if nearest:
        worst = max(nearest, key=lambda cell: cell.stall_rate.mean)
        lines.append(
            f"- Most stall: **{worst.format}**, {_iv(worst.stall_rate, pct=True)} of updates "
            f"lost under nearest storage (landed ratio {_iv(worst.landed_ratio, 2)})."
        )
    baseline = _baseline(result)
    for fmt in dict.fromkeys(c.format for c in result.cells if c.format is not None):
        cells = {c.rule: c for c in result.cells if c.format == fmt}
        finished = {r: c.final_val_loss for r, c in cells.items() if not c.diverged}
        diverged = [r for r, c in cells.items() if c.diverged]
        tiers = stats.rank(finished)
        text = f"- {fmt}: {_order(tiers)}" if tiers else f"- {fmt}:"
        if diverged:
            text += f" (diverged: {', '.join(diverged)})"
        if tiers and len(tiers[0]) > 1:
            text += f"; best tie within noise: {', '.join(tiers[0])}"
        if baseline is not None and tiers:
            best = cells[tiers[0][0]].final_val_loss
            base = baseline.final_val_loss
            if best.below(base):
                relation = "below float32 (separated)"
            elif base.below(best):
                relation = "above float32 (separated)"
            else:
                relation = "within noise of float32"
            text += f"; its best is {relation}"
        lines.append(text + ".")
    return [*lines, ""]


def _report_md(result: SweepResult) -> str:
    cfg = result.config
    baseline = _baseline(result)
    schedule = (
        "constant learning rate"
        if cfg.train.schedule == "constant"
        else f"warmup ({cfg.train.warmup_fraction:g} of the steps) then cosine decay to "
        f"{cfg.train.min_lr_fraction:g} of the peak"
    )
    lines = [
        "# Which low-precision format stalls most, and which update rule rescues it?",
        "",
        f"Character-level transformer ({result.num_params:,} parameters) on `{result.corpus}` "
        f"(vocabulary {result.vocab_size}), {cfg.steps} Adam steps at peak learning rate "
        f"{cfg.train.learning_rate:g} ({schedule}), batch {cfg.train.batch_size} x "
        f"{cfg.model.context} characters, seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}. "
        "Weights are stored on the format's grid by the update rule; activations and gradients "
        f"of every dense layer are quantized with current per-tensor scaling (gradients: "
        f"`--grad-format {cfg.grad_format}`). Sweep wall time {result.wall_time_s:.0f} s on "
        f"{result.devices} device{'s' * (result.devices != 1)}; "
        f"{result.compile_time_s:.0f} s compiling, {result.compile_wait_s:.0f} s of it not "
        "overlapped with training; compiled programs per rule: "
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
            f"float32 baseline: final validation loss {_iv(baseline.final_val_loss)} "
            f"(best {_iv(baseline.best_val_loss)}).",
            "",
        ]
    lines += [STALL_MEANING, ""]
    rules = _rules(result)
    if rules:
        extra = {c.rule: c.extra_state_bytes for c in result.cells if c.rule != BASELINE}
        lines += [
            "## Final validation loss per rule",
            "",
            "Mean ± 95% interval over seeds (nats per character, lower is better); the extra "
            "optimizer-state bytes per parameter of each rule, the price of its rescue, head "
            "each column.",
            "",
            "| format | "
            + " | ".join(f"{rule} (+{extra[rule]:g} B)" for rule in rules)
            + " | stall (nearest) |",
            "|---|" + "---|" * (len(rules) + 1),
        ]
        for fmt in dict.fromkeys(c.format for c in result.cells if c.format is not None):
            by_rule = {c.rule: c for c in result.cells if c.format == fmt}
            cells = []
            for rule in rules:
                cell = by_rule.get(rule)
                text = "-" if cell is None else _iv(cell.final_val_loss)
                if cell is not None and cell.diverged:
                    text += f" ({_status(cell)})"
                cells.append(text)
            near = by_rule.get("nearest")
            stall = "-" if near is None else _iv(near.stall_rate, pct=True)
            lines.append(f"| {fmt} | " + " | ".join(cells) + f" | {stall} |")
        lines.append("")
    lines += [
        "## Files",
        "",
        "`results.json` (all numbers: `cells` with intervals, `runs` per seed; fields documented "
        "in its `meta`), `results.csv` (one row per run), `loss_curves.png`, `stall_rate.png` "
        "(over training), `flip_rate.png`, `update_ulp_hist.png`, `layer_stall.png`.",
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
    _plot_layers(result, out / "layer_stall.png")
    return [out / name for name in OUTPUT_FILES]
