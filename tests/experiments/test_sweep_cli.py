"""The sweep end to end: CLI, output files, JSON fields, divergence, bad arguments."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from altgrad_jax.__main__ import main
from altgrad_jax.experiments import data
from altgrad_jax.experiments.report import META_FIELDS, OUTPUT_FILES, RUN_FIELDS
from altgrad_jax.experiments.sweep import SweepConfig, run_sweep

TINY = ["--context", "8", "--d-model", "8", "--heads", "2", "--layers", "1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    argv = ["sweep", "--synthetic", "--steps", "6", "--eval-every", "3", *TINY]
    argv += ["--formats", "E4M3,E5M2", "--rules", "nearest", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out


def test_sweep_writes_every_output_file(sweep_dir):
    for name in OUTPUT_FILES:
        assert (sweep_dir / name).stat().st_size > 0, name
    assert (sweep_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (sweep_dir / "report.md").read_text()
    assert "stalls most" in report and "float32 baseline" in report


def test_results_json_has_the_documented_fields(sweep_dir):
    results = json.loads((sweep_dir / "results.json").read_text())
    assert set(results["meta"]) == set(META_FIELDS)
    assert [(r["format"], r["rule"]) for r in results["runs"]] == [
        (None, "float32"),
        ("E4M3", "nearest"),
        ("E5M2", "nearest"),
    ]
    for run in results["runs"]:
        assert set(run) == set(RUN_FIELDS)
        assert run["status"] == "ok" and run["steps_run"] == 6
        assert run["eval_steps"] == [3, 6] and len(run["train_loss"]) == 6
        assert run["best_val_loss"] == min(run["val_losses"])
    baseline, quantized = results["runs"][0], results["runs"][1]
    assert baseline["stall_rate"] is None and baseline["saturation"]["weights"] is None
    assert 0 <= quantized["stall_rate"] <= 1 and len(quantized["stall_curve"]) == 6
    assert sum(quantized["update_ulp_hist"].values()) > 0
    # One compiled init, train chunk and evaluation serve both formats of the rule.
    assert results["meta"]["compilations"] == {"float32": 3, "nearest": 3}
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and float(rows[1]["stall_rate"]) == quantized["stall_rate"]


def test_diverging_run_is_reported_not_raised():
    corpus = data.make_corpus(data.synthetic_text(2000), "synthetic")
    config = SweepConfig(
        formats=(), rules=(), steps=6, eval_every=3, learning_rate=1e4,
        batch_size=4, context=8, d_model=8, n_heads=2, n_layers=1,
    )  # fmt: skip
    (run,) = run_sweep(config, corpus).runs
    assert run.status == "diverged"
    assert 1 <= run.diverged_step <= 6 and run.steps_run >= run.diverged_step
    assert run.final_val_loss is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--formats", "E9M9"], "unknown format 'E9M9'; known formats: E0M7"),
        (["--rules", "magic"], "unknown rule 'magic'; known rules: nearest"),
        (["--steps", "-5"], "--steps: expected a positive integer, got -5"),
        (["--lr", "0"], "--lr: expected a positive number, got 0.0"),
        (["--text", "/no/such/file.txt"], "cannot read text file '/no/such/file.txt'"),
    ],
)
def test_bad_arguments_exit_with_one_line(args, message, capsys):
    try:
        status = main(["sweep", *args])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_empty_text_file_from_the_console_has_no_traceback(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "altgrad_jax", "sweep", "--text", str(empty)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"altgrad-jax sweep: error: text file {str(empty)!r} is empty"
    assert "Traceback" not in proc.stderr


def test_formats_command_prints_the_table(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[0] == "name" and "E5M2" in out
