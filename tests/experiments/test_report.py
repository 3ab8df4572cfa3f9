"""The results schema and files, from hand-made results (no training)."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from altgrad_jax.experiments.model import LAYER_GROUPS
from altgrad_jax.experiments.report import (
    CELL_FIELDS,
    META_FIELDS,
    RUN_FIELDS,
    STALL_MEANING,
    check_output_dir,
    csv_columns,
    format_table,
    write_results,
)
from altgrad_jax.experiments.sweep import (
    ROLES,
    RunResult,
    SweepConfig,
    SweepResult,
    summarise_cell,
)
from altgrad_jax.experiments.train import TrainConfig
from altgrad_jax.optim import HISTOGRAM_LABELS


def _run(fmt: str | None, rule: str, loss: float) -> RunResult:
    rate = None if fmt is None else 0.5
    return RunResult(
        format=fmt,
        rule=rule,
        seed=0,
        grad_format=fmt,
        status="ok",
        diverged_step=None,
        steps_run=2,
        final_val_loss=loss,
        best_val_loss=loss,
        best_step=2,
        final_train_loss=loss,
        stall_rate=rate,
        final_stall_rate=rate,
        layer_stall=dict.fromkeys(LAYER_GROUPS, rate),
        flip_rate=rate,
        landed_ratio=rate,
        saturation={role: rate for role in ROLES},
        underflow={role: rate for role in ROLES},
        update_ulp_hist=dict.fromkeys(HISTOGRAM_LABELS, 1),
        wall_time_s=1.5,
        compile_time_s=0.0 if fmt == "E5M2" else 9.0,
        eval_steps=[2],
        val_losses=[loss],
        train_loss=[loss + 1, loss],
        stall_curve=[] if fmt is None else [0.5, 0.5],
        flip_curve=[] if fmt is None else [0.5, 0.5],
    )


@pytest.fixture
def result() -> SweepResult:
    config = SweepConfig(
        formats=("E4M3", "E5M2"), rules=("nearest",), seeds=1, train=TrainConfig(steps=2)
    )
    runs = [_run(None, "float32", 2.0), _run("E4M3", "nearest", 2.5)]
    cells = [summarise_cell([run], 0.0) for run in runs]
    compilations = {"float32": 3, "nearest": 3}
    return SweepResult(config, "text", 8, 100, runs, cells, compilations, 1, 20.0, 18.0)


def test_every_run_field_is_documented_by_its_metadata():
    names = [field.name for field in dataclasses.fields(RunResult)]
    assert list(RUN_FIELDS) == names and all(RUN_FIELDS.values())
    assert "compile_time_s" in RUN_FIELDS and "compilation excluded" in RUN_FIELDS["wall_time_s"]


def test_csv_columns_are_the_run_fields(result, tmp_path):
    expected = []
    for field in dataclasses.fields(RunResult):
        value = getattr(result.runs[1], field.name)
        if isinstance(value, list) or field.name == "update_ulp_hist":
            continue  # curves and the histogram are in results.json only
        if isinstance(value, dict):
            keys = LAYER_GROUPS if field.name == "layer_stall" else ROLES
            expected += [f"{field.name}_{key}" for key in keys]
        else:
            expected.append(field.name)
    assert csv_columns() == expected
    write_results(result, tmp_path)
    with (tmp_path / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == expected
    assert [row["format"] for row in rows] == ["", "E4M3"]
    assert float(rows[1]["underflow_gradients"]) == 0.5 and rows[0]["stall_rate"] == ""


def test_results_json_has_documented_fields_and_says_it_is_incomplete(result, tmp_path):
    write_results(result, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["meta"]) == set(META_FIELDS)
    assert [set(cell) for cell in results["cells"]] == [set(CELL_FIELDS)] * 2
    assert results["meta"]["complete"] is False  # 2 of the config's 3 runs
    assert results["meta"]["config"]["batch_size"] == 16  # flat, as before the nesting
    assert SweepConfig.from_flat(results["meta"]["config"]) == result.config
    assert results["meta"]["compile_time_s"] == 18.0
    assert [set(run) for run in results["runs"]] == [set(RUN_FIELDS)] * 2
    assert not list(tmp_path.glob(".results*"))  # no temporary file left behind


def test_table_has_one_row_per_cell_and_states_the_seeds(result):
    header, _rule, baseline, quantized, note = format_table(result).splitlines()
    assert header.split()[:4] == ["format", "rule", "grad", "val"]
    assert quantized.split()[:4] == ["E4M3", "nearest", "E4M3", "2.500"]  # one seed: no ±
    assert baseline.split()[:2] == ["-", "float32"]
    assert note == "(mean ± 95% Student-t interval over 1 seed)"


def test_report_says_what_stall_means_under_each_rule(result, tmp_path):
    from altgrad_jax.experiments.report import _report_md, _stall_label

    report = _report_md(result)
    assert STALL_MEANING in report and "Incomplete sweep" in report
    assert "18 s compiling" in report and "mean over **1 seed**" in report
    assert _stall_label("nearest") == "stall rate (updates lost)"
    assert "what nearest would lose" in _stall_label("stochastic")


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new" / "dir").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"cannot write to output folder .*file/out"):
        check_output_dir(blocker / "out")
