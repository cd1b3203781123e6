"""The S3 sparsity sweep writes as it goes and resumes (issue 14): config.json and a row of sweep.csv per finished
(seed, sparsity) cell, a killed sweep continues from its rows to the same CSV as an uninterrupted one, a folder of
another config is refused in one line, and --overwrite_output_dir starts over."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from mmexperts.errors import ConfigError
from mmexperts.training import parse_config, sweep
from mmexperts.training.sweep import SweepConfig, prepare_output, sparsity_sweep

from conftest import SWEEP_TINY as TINY
from conftest import kill_sweep_after_first_row as kill_after_first_row
from conftest import start_sweep as start
from conftest import sweep_rows as rows

CELLS = 8


def finish(process: subprocess.Popen, returncode: int = 0) -> tuple[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == returncode, f"exit {process.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted sweep, started in the background; call it to wait for its output folder."""
    folder = tmp_path_factory.mktemp("straight") / "sweep"
    process = start(folder)

    def done() -> Path:
        if process.returncode is None:
            finish(process)
        return folder

    yield done
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_csv_grows_cell_by_cell_and_a_failed_sweep_resumes_to_the_same_csv(straight, tmp_path, monkeypatch):
    config = SweepConfig(**TINY, output_dir=str(tmp_path / "sweep"))
    real_cell, calls = sweep.SeedRun.cell, []

    def failing_third_cell(self, level, sparsity):
        calls.append((self.seed, sparsity))
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_cell(self, level, sparsity)

    monkeypatch.setattr(sweep.SeedRun, "cell", failing_third_cell)
    with pytest.raises(RuntimeError, match="injected failure"):
        sparsity_sweep(config)
    out = Path(config.output_dir)
    assert [(r["seed"], r["sparsity"]) for r in rows(out)] == [("0", "0.0"), ("0", "0.25")]
    assert json.loads((out / "config.json").read_text())["epochs"] == TINY["epochs"]
    assert (out / "state" / "seed_0.safetensors").is_file()
    monkeypatch.setattr(sweep.SeedRun, "cell", real_cell)
    calls.clear()
    result = sparsity_sweep(config)
    assert len(result["rows"]) == CELLS
    assert (out / "sweep.csv").read_bytes() == (straight() / "sweep.csv").read_bytes()
    for name in ("accuracy_vs_sparsity.png", "expert_usage.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*")), "no temporary files left behind"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.slow
def test_sigkill_after_the_first_row_then_the_same_command_finishes_the_same_csv(straight, tmp_path):
    out = tmp_path / "sweep"
    written = kill_after_first_row(start(out), out)
    assert 1 <= written < CELLS
    output, _ = finish(start(out))
    assert f"Output folder: {out.resolve()}" in output.splitlines()[0]
    assert f"Resuming: {written} of {CELLS} cells" in output
    assert len([line for line in output.splitlines() if line.startswith("seed ")]) == CELLS - written
    assert (out / "sweep.csv").read_bytes() == (straight() / "sweep.csv").read_bytes()


def test_a_folder_of_another_config_is_refused_in_one_line(tmp_path):
    out = tmp_path / "sweep"
    prepare_output(SweepConfig(**TINY, output_dir=str(out)))
    _, err = finish(start(out, epochs=3), returncode=2)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: --output_dir {out} holds a sweep of a different config (epochs: 2 there, 3 "
                               "now)"), err
    assert "--overwrite_output_dir" in lines[0]
    assert not (out / "sweep.csv").exists()


def test_overwrite_output_dir_starts_over_and_files_without_config_are_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    prepare_output(SweepConfig(**TINY, output_dir=str(out)))
    (out / "sweep.csv").write_text("seed,sparsity,pruned,active_experts,validation_accuracy,test_accuracy,test_loss\n"
                                   "0,0.0,0,0 1 2 3,0.5,0.5,0.7\n")
    (out / "state").mkdir()
    other = SweepConfig(**{**TINY, "epochs": 3}, output_dir=str(out), overwrite_output_dir=True)
    assert prepare_output(other) == []
    removed = "--overwrite_output_dir: removed the previous sweep's sweep.csv, config.json, state"
    assert removed in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["epochs"] == 3 and not (out / "state").exists()
    (out / "config.json").unlink()
    (out / "sweep.csv").write_text("seed\n")
    with pytest.raises(ConfigError, match="without the config.json"):
        prepare_output(SweepConfig(**TINY, output_dir=str(out)))


def test_the_sweep_recipe_reads_yaml_lists_and_flags_with_the_training_parser(tmp_path):
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text("design: paper\ngranularities: [2, 4]\nkeep_ratios: [0.5, 1.0]\nseeds: [0]\n")
    config = parse_config(["--config", str(config_file), "--seeds", "1,2"], config_class=SweepConfig)
    assert (config.design, config.granularities, config.keep_ratios, config.seeds) == ("paper", "2,4", "0.5,1.0",
                                                                                         "1,2")
    with pytest.raises(ConfigError, match="unrecognised arguments: --sparsity 0.5"):
        parse_config(["--sparsity", "0.5"], config_class=SweepConfig)
