"""The paper design's sweep (``SweepConfig(design="paper")``, ``recipes/sweep_s3.py``): stage 1, stage 2, then a linear
probe at every keep ratio, per seed and granularity; a CSV row per (seed, granularity, keep ratio) and the plot, the
keep ratio 1 row is the unpruned probe, the kept fraction of routing pairs falls with p, a killed sweep resumes to the
same CSV, and a folder of another config is refused."""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from mmexperts.errors import ConfigError
from mmexperts.training import sweep
from mmexperts.training.sweep import (
    SPECIALIZATION_KEY,
    SweepConfig,
    build_paper_model,
    feature_loader,
    keep_ratio_probe,
    load_feature_data,
    prepare_output,
    probe_accuracy,
    sparsity_sweep,
    summary_table,
    three_stages,
)

from conftest import SWEEP_RECIPE as RECIPE
from conftest import SWEEP_TINY as TINY
from conftest import kill_sweep_after_first_row as kill_after_first_row
from conftest import start_sweep as start
from conftest import sweep_rows as rows

PAPER = dict(design="paper", num_train=64, num_eval=48, seeds="0,1", granularities="1,2", keep_ratios="0.25,0.5,1.0",
             latent_size=8, hidden_size=8, stage1_epochs=1, stage2_epochs=1, batch_size=32, eval_batch_size=32)
CELLS = [(seed, chi, p) for seed in (0, 1) for chi in (1, 2) for p in (0.25, 0.5, 1.0)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted paper sweep, run in this process: (config, result)."""
    config = SweepConfig(**PAPER, output_dir=str(tmp_path_factory.mktemp("paper") / "sweep"))
    return config, sparsity_sweep(config)


def recipe_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("sweep_s3_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_a_row_per_seed_granularity_and_keep_ratio_the_plot_and_the_summary(straight):
    config, result = straight
    out = Path(config.output_dir)
    written = rows(out)
    assert [(int(r["seed"]), int(r["granularity"]), float(r["keep_ratio"])) for r in written] == CELLS
    assert all(int(r["num_experts"]) == 2 * int(r["granularity"]) for r in written)
    assert (out / "accuracy_vs_keep_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "state").iterdir()) == [f"seed_{s}_chi_{c}.safetensors" for s in (0, 1)
                                                                 for c in (1, 2)]
    saved = json.loads((out / "config.json").read_text())
    assert saved["design"] == "paper" and saved["stage2_epochs"] == 1 and "sparsities" not in saved
    assert saved["label_from"] == "shared,unique_a,unique_b,synergy" and saved["spurious_strength"] == 0.0
    for seed, chi in {(s, c) for s, c, _ in CELLS}:  # the stage-1-only probe: one value per (seed, granularity)
        assert len({r["specialization_accuracy"] for r in written if (r["seed"], r["granularity"]) ==
                    (str(seed), str(chi))}) == 1
    table = summary_table(config, result).splitlines()
    assert table[0] == "| keep ratio p | pairs kept | chi=1 (N=2, k=1) | chi=2 (N=4, k=2) |"
    assert len(table) == 2 + 3 + 1 and table[-1].startswith("| stage 1 only (p = 1) | | ")
    assert {(r["granularity"], r["keep_ratio"]) for r in result["summary"]} == {(c, p) for _, c, p in CELLS}
    assert all(r["seeds"] == 2 for r in result["summary"])


def test_the_kept_fraction_of_routing_pairs_falls_with_the_keep_ratio(straight):
    _, result = straight
    for seed, chi in {(s, c) for s, c, _ in CELLS}:
        cells = [r for r in result["rows"] if (r["seed"], r["granularity"]) == (seed, chi)]
        kept = [r["kept_pairs"] for r in cells]
        assert kept == sorted(kept) and len(set(kept)) == len(kept) and kept[-1] == 1.0
        for row in cells:  # ceil(p * pairs) of each batch: p up to rounding
            assert abs(row["kept_pairs"] - row["keep_ratio"]) < 0.01


def test_the_keep_ratio_one_row_is_the_unpruned_probe_of_the_trained_adapter(straight):
    config, result = straight
    seed, chi = 1, 2
    data = load_feature_data(config, seed)
    model = build_paper_model(data, config, seed, chi)
    state = load_file(Path(config.output_dir) / "state" / f"seed_{seed}_chi_{chi}.safetensors")
    state.pop(SPECIALIZATION_KEY)
    peft.set_peft_model_state_dict(model, state)
    train, test = (feature_loader(data[split], config.eval_batch_size) for split in ("train", "test"))
    assert model.base_model.peft_config["default"].keep_ratio == 1.0
    accuracy, _ = probe_accuracy(model, train, test, seed)
    row = {r["keep_ratio"]: r for r in result["rows"] if (r["seed"], r["granularity"]) == (seed, chi)}
    assert accuracy == row[1.0]["test_accuracy"]
    again = keep_ratio_probe(model, train, test, seed, 0.25)
    assert again == {k: row[0.25][k] for k in ("keep_ratio", "kept_pairs", "test_accuracy")}
    assert model.base_model.peft_config["default"].keep_ratio == 1.0  # the probe leaves the model unpruned


def test_without_stage_2_keep_ratio_one_is_the_stage_1_probe(tmp_path):
    config = SweepConfig(**{**PAPER, "seeds": "0", "granularities": "2", "keep_ratios": "0.5,1.0",
                            "stage2_epochs": 0}, output_dir=str(tmp_path / "sweep"))
    result = sparsity_sweep(config)
    full = next(r for r in result["rows"] if r["keep_ratio"] == 1.0)
    assert full["test_accuracy"] == full["specialization_accuracy"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.slow
def test_sigkill_after_the_first_row_then_the_same_config_finishes_the_same_csv(straight, tmp_path, capsys):
    config, _ = straight
    out = tmp_path / "sweep"
    written = kill_after_first_row(start(out, base=PAPER), out)
    assert 1 <= written < len(CELLS)
    assert (out / "state" / "seed_0_chi_1.safetensors").is_file()
    resumed = SweepConfig(**PAPER, output_dir=str(out))
    assert len(sparsity_sweep(resumed)["rows"]) == len(CELLS)
    printed = capsys.readouterr().out
    assert f"Resuming: {written} of {len(CELLS)} cells" in printed
    assert (out / "sweep.csv").read_bytes() == (Path(config.output_dir) / "sweep.csv").read_bytes()
    assert not list(out.rglob(".*")), "no temporary files left behind"


def test_a_folder_of_another_config_or_design_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "sweep"
    prepare_output(SweepConfig(**PAPER, output_dir=str(out)))
    argv = [item for key, value in {**PAPER, "stage2_epochs": 2, "output_dir": out}.items()
            for item in (f"--{key}", str(value))]
    assert recipe_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {out} holds a sweep of a different config "
                                               "(stage2_epochs: 1 there, 2 now)"), err
    concepts = tmp_path / "concepts"
    prepare_output(SweepConfig(**TINY, output_dir=str(concepts)))
    with pytest.raises(ConfigError, match=r"a different config \(design: 'concepts' there, 'paper' now\)"):
        prepare_output(SweepConfig(**PAPER, output_dir=str(concepts)))
    assert not (out / "sweep.csv").exists()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"keep_ratios": "0,0.5"}, "keep_ratios"), ({"keep_ratios": "0.5,half"}, "keep_ratios"),
    ({"granularities": "0,2"}, "granularities"), ({"granularities": "2,2"}, "granularities"),
    ({"stage2_epochs": -1}, "stage2_epochs"), ({"latent_size": 6}, "latent_size"), ({"design": "dense"}, "design"),
])
def test_bad_paper_fields_are_config_errors_before_any_training(overrides, field, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_paper_cells", lambda *args: pytest.fail("trained on a bad config"))
    with pytest.raises(ConfigError, match=f"--{field} must be") as error:
        sparsity_sweep(SweepConfig(**{**PAPER, **overrides}, output_dir=str(tmp_path / "sweep")))
    assert error.value.field == field
    assert not (tmp_path / "sweep").exists()


def test_the_protocol_rows_of_three_stages():
    config = SweepConfig(**PAPER)
    data = load_feature_data(config, 0)
    model = build_paper_model(data, config, 0, 1)
    train = feature_loader(data["train"], 32, shuffle=True)
    train_eval, test = (feature_loader(data[split], 32) for split in ("train", "test"))
    torch.manual_seed(0)
    stages = three_stages(model, train, train_eval, test, 0, [0.5, 1.0], 1, 1, 3e-3, specialization_ratios=[1.0])
    assert [r["keep_ratio"] for r in stages["specialization"]] == [1.0]
    assert [r["keep_ratio"] for r in stages["s3"]] == [0.5, 1.0]
    assert model.base_model.peft_config["default"].stage == "selection"
