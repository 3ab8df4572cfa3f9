"""The sweep end to end: CLI, output files, JSON fields, divergence, bad arguments."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import pytest

from altgrad_jax.__main__ import main
from altgrad_jax.experiments.report import META_FIELDS, OUTPUT_FILES, RUN_FIELDS
from altgrad_jax.experiments.sweep import SweepConfig, run_sweep
from altgrad_jax.experiments.train import TrainConfig


def test_sweep_writes_every_output_file(sweep_dir):
    for name in OUTPUT_FILES:
        assert (sweep_dir / name).stat().st_size > 0, name
    assert (sweep_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (sweep_dir / "report.md").read_text()
    assert "stalls most" in report and "float32 baseline" in report


def test_results_json_has_the_documented_fields(sweep_dir, sweep_results):
    results = sweep_results
    assert set(results["meta"]) == set(META_FIELDS)
    assert [(r["format"], r["rule"], r["seed"]) for r in results["runs"]] == [
        (fmt, rule, seed)
        for fmt, rule in [
            (None, "float32"),
            ("E4M3", "nearest"),
            ("E5M2", "nearest"),
            ("MXFP8_E4M3", "nearest"),
        ]
        for seed in (0, 1)
    ]
    assert [r["grad_format"] for r in results["runs"][2::2]] == ["E5M2", "E5M2", "MXFP8_E4M3"]
    for run in results["runs"]:
        assert set(run) == set(RUN_FIELDS)
        assert run["status"] == "ok" and run["steps_run"] == 24
        assert run["eval_steps"] == [8, 16, 24] and len(run["train_loss"]) == 24
        assert run["best_val_loss"] == min(run["val_losses"])
    baseline, quantized = results["runs"][0], results["runs"][2]
    assert baseline["stall_rate"] is None and baseline["saturation"]["weights"] is None
    assert 0 <= quantized["stall_rate"] <= 1 and len(quantized["stall_curve"]) == 24
    assert sum(quantized["update_ulp_hist"].values()) > 0
    assert set(quantized["layer_stall"]) == {"embedding", "attention", "mlp", "head", "norm"}
    # One compiled init and train chunk (with its evaluation) serve both per-tensor formats and
    # both seeds of the rule; the block format has its own pair.
    assert results["meta"]["compilations"] == {"float32": 2, "nearest": 4}
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and float(rows[2]["stall_rate"]) == quantized["stall_rate"]
    cell = results["cells"][1]
    assert (cell["format"], cell["rule"], cell["seeds"]) == ("E4M3", "nearest", 2)
    losses = [r["final_val_loss"] for r in results["runs"][2:4]]
    assert cell["final_val_loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert cell["final_val_loss"]["low"] < cell["final_val_loss"]["mean"]


def test_a_block_format_trains_with_its_stall_measured(sweep_results):
    runs = [r for r in sweep_results["runs"] if r["format"] == "MXFP8_E4M3"]
    assert len(runs) == 2
    for run in runs:
        assert run["final_val_loss"] < run["train_loss"][0]  # it learned
        assert 0 < run["stall_rate"] < 1 and len(run["stall_curve"]) == 24
        assert 0 < run["flip_rate"] <= 1 and sum(run["update_ulp_hist"].values()) > 0
        assert all(0 <= rate <= 1 for rate in run["layer_stall"].values())
        assert run["saturation"]["weights"] is None  # block scales follow each block's max
        assert 0 <= run["underflow"]["weights"] <= 1
    assert runs[0]["stall_curve"] != runs[1]["stall_curve"]
    (cell,) = [c for c in sweep_results["cells"] if c["format"] == "MXFP8_E4M3"]
    assert (cell["seeds"], cell["extra_state_bytes"]) == (2, 0.0)


def test_a_shorter_last_chunk_is_compiled_once_and_evaluated(sweep_config, golden_corpus):
    config = dataclasses.replace(sweep_config, formats=(), rules=(), eval_every=10)
    result = run_sweep(config, golden_corpus)
    assert [run.eval_steps for run in result.runs] == [[10, 20, 24]] * 2
    assert result.compilations == {"float32": 3}  # init, the 10-step chunk and the 4-step one


def test_diverging_run_is_reported_not_raised(sweep_config, golden_corpus):
    # Every loss is above 1 nat at the first step (8 letters: log 8 = 2.08), so each seed
    # diverges there and the batch stops after its first chunk.
    config = dataclasses.replace(sweep_config, formats=(), rules=(), diverge_loss=1.0)
    runs = run_sweep(config, golden_corpus).runs
    assert [(r.status, r.diverged_step, r.steps_run, r.final_val_loss) for r in runs] == [
        ("diverged", 1, 8, None)
    ] * 2
    assert (runs[0].train_loss, runs[0].final_train_loss) == ([], None)  # stats stop before it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--formats", "E9M9"], "unknown format 'E9M9'; known formats: E0M7"),
        (["--rules", "magic"], "unknown rule 'magic'; expected one of 'nearest', 'stochastic'"),
        (["--steps", "-5"], "error: --steps must be a positive int, got -5"),
        (["--steps", "0"], "error: --steps must be a positive int, got 0"),
        (["--steps", "ten"], "argument --steps: expected an int, got 'ten'"),
        (["--lr", "0"], "error: --lr must be a positive finite number, got 0.0"),
        (["--lr", "inf"], "error: --lr must be a positive finite number, got inf"),
        (["--seed", "1.5"], "argument --seed: expected an int, got '1.5'"),
        (["--heads", "3"], "d_model=64 is not divisible by n_heads=3"),
        (["--formats", "E4M3", "--rules", "float32"], "unknown rule 'float32'; expected one"),
        (["--out", "/dev/null/sweep"], "cannot write to output folder '/dev/null/sweep'"),
        (["--text", "/no/such/file.txt"], "cannot read text file '/no/such/file.txt'"),
        (["--seeds", "0"], "error: --seeds must be a positive int, got 0"),
        (["--schedule", "linear"], "unknown --schedule 'linear'; expected one of 'cosine'"),
        (["--grad-format", "E9M9"], "--grad-format: unknown format 'E9M9'"),
        (["--warmup-fraction", "1"], "--warmup-fraction must be a number in [0, 1), got 1.0"),
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


def _parse(argv):
    from altgrad_jax.__main__ import _config_from_args, _parse

    return _config_from_args(_parse(["sweep", *argv]))


def test_cli_defaults_are_the_config_defaults():
    from altgrad_jax.experiments.model import ModelConfig
    from altgrad_jax.experiments.sweep import config_options

    assert _parse([]) == SweepConfig()
    assert SweepConfig().train == TrainConfig()
    paths = {option.path for option in config_options()}
    # Every field of the configs the sweep holds is an option, with that config's own default.
    for field in dataclasses.fields(TrainConfig):
        assert ("train", field.name) in paths
        assert getattr(SweepConfig().train, field.name) == field.default
    for field in dataclasses.fields(ModelConfig):
        if field.name != "vocab_size":
            assert ("model", field.name) in paths
            assert getattr(SweepConfig().model, field.name) == field.default


def test_cli_flags_reach_the_config():
    config = _parse(["--lr", "0.01", "--heads", "2", "--layers", "3", "--batch-size", "8"])
    assert config.train == TrainConfig(batch_size=8, learning_rate=0.01)
    full = _parse(["--full", "--steps", "20"])
    assert full.formats[-2:] == ("BF16", "FP16") and "ulp" in full.rules
    assert (full.steps, full.model.d_model) == (20, 64)
    assert (config.model.n_heads, config.model.n_layers) == (2, 3)
    config = _parse(["--no-baseline", "--formats", "e4m3,E5M2", "--rules", "nearest", "ulp"])
    assert not config.baseline and config.formats == ("E4M3", "E5M2")
    assert config.rules == ("nearest", "ulp")


def test_help_lists_every_option_with_its_default(capsys):
    from altgrad_jax.__main__ import _show
    from altgrad_jax.experiments.sweep import config_options

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in config_options():
        shown = (
            ("on" if option.default else "off") if option.type is bool else _show(option.default)
        )
        assert f"{option.flag} " in text
        assert f"{option.help} (default: {shown})" in text, option.flag
    assert "(default: runs/sweep)" in text


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch, capsys):
    from altgrad_jax.experiments import sweep

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the output folder")

    monkeypatch.setattr(sweep, "run_sweep", no_training)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["sweep", "--synthetic", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"altgrad-jax sweep: error: cannot write to output folder '{blocker}")


def test_interrupted_sweep_keeps_the_finished_runs(tmp_path, monkeypatch, capsys, sweep_args):
    """The results files are written after each run: an interrupt after the first keeps it."""
    from altgrad_jax.experiments import sweep

    real_run_sweep = sweep.run_sweep

    def interrupted(config, corpus, progress=None, on_run=None):
        def write_then_stop(so_far):
            on_run(so_far)
            raise KeyboardInterrupt

        return real_run_sweep(config, corpus, progress, write_then_stop)

    # The baseline batch is the first: an interrupt after it keeps its two seeds (trained by
    # the shared sweep's programs, cached).
    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    argv = ["sweep", *sweep_args, "--no-progress", "--seeds", "2"]
    assert main([*argv, "--formats", "E4M3", "--rules", "nearest", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.count("\n") == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert [run["rule"] for run in results["runs"]] == ["float32", "float32"]
    assert results["meta"]["complete"] is False
    with (tmp_path / "results.csv").open() as handle:
        assert [row["rule"] for row in csv.DictReader(handle)] == ["float32", "float32"]
    assert not (tmp_path / "report.md").exists()


def test_ctrl_c_stops_a_running_sweep_at_once_and_keeps_the_finished_runs(tmp_path):
    """A real SIGINT while XLA computes or compiles (in native code, where Python cannot stop
    it): the program exits with 130 instead of finishing the work, or crashing on the way out."""
    import signal
    import time

    out = tmp_path / "out"
    tiny = ["--d-model", "8", "--heads", "1", "--layers", "1", "--context", "8"]
    long = ["--steps", "6000", "--eval-every", "6000", "--seeds", "1"]
    argv = ["--synthetic", *tiny, *long, "--formats", "E4M3", "--rules", "nearest,stochastic"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "altgrad_jax", "sweep", *argv, "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The baseline batch's results are written; the nearest batch trains and the
        # stochastic one compiles in the background.
        while not (out / "results.json").exists() and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().endswith(f"interrupted; finished runs are in {out}")
    results = json.loads((out / "results.json").read_text())
    assert [run["rule"] for run in results["runs"]] == ["float32"]


def test_compile_time_is_shared_by_a_batch_apart_from_run_time(sweep_results):
    results = sweep_results
    runs = results["runs"]
    assert runs[0]["compile_time_s"] > 0
    # The four per-tensor nearest runs share one batch's programs and its time equally.
    assert len({run["compile_time_s"] for run in runs[2:6]}) == 1
    assert len({run["wall_time_s"] for run in runs[2:6]}) == 1
    assert runs[6]["compile_time_s"] != runs[2]["compile_time_s"]  # the block format's own
    meta = results["meta"]
    assert meta["compile_time_s"] == pytest.approx(
        sum(r["compile_time_s"] for r in results["runs"])
    )


def test_compiled_program_compiles_once_per_signature():
    import jax.numpy as jnp

    from altgrad_jax.experiments.sweep import CompiledProgram
    from altgrad_jax.formats import format_params, get_format

    program = CompiledProgram(lambda x, fmt: x * fmt.max_value)
    for name in ("E4M3", "E5M2", "E7M0"):
        fmt = format_params(get_format(name)).as_arrays()
        assert float(program(jnp.ones(3), fmt)[0]) == get_format(name).max_value
    assert program.compilations == 1
    program(jnp.ones(4), fmt)
    assert program.compilations == 2


def test_flat_config_names_are_unique_and_round_trip():
    from altgrad_jax.experiments.sweep import config_options

    names = [option.name for option in config_options()]
    assert len(names) == len(set(names))
    config = _parse(["--lr", "0.01", "--context", "8", "--heads", "2", "--formats", "E4M3"])
    assert SweepConfig.from_flat(config.flat()) == config
    assert config.flat()["learning_rate"] == 0.01 and config.flat()["context"] == 8
    with pytest.raises(ValueError, match="unknown config field 'lr'; expected one of formats"):
        SweepConfig.from_flat({"lr": 0.01})
