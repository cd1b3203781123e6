"""Feature-sequence tasks (synthetic:factors, multibench:<name>) through the training recipe: S3 on frozen random
feature towers, the feature collator, and the methods that cannot train them refused in one line."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch

from mmexperts.data import FeatureCollator, load_task
from mmexperts.errors import ConfigError, DataError
from mmexperts.modeling import FeatureEncoderForClassification
from mmexperts.training import TrainConfig, Trainer, list_checkpoints, parse_config

from conftest import ROOT, assert_resumes_exactly, load_recipe_module
from conftest import write_affect as _write_affect

FACTORS = ["--config", "none", "--method", "s3", "--dataset", "synthetic:factors", "--train_size", "64",
           "--eval_size", "32", "--batch_size", "16", "--eval_batch_size", "32", "--max_steps", "4",
           "--warmup_steps", "1", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
           "--dataset_config", "{dim_a: 12, dim_b: 10}", "--feature_hidden_size", "16"]


def test_feature_collator_batches_rows_and_names_a_missing_column():
    rows = [{"modality_a": [[float(i)] * 3] * 4, "modality_b": torch.ones(4, 2), "label": i % 2, "task_id": 0}
            for i in range(3)]
    batch = FeatureCollator()(rows)
    assert batch["features_a"].shape == (3, 4, 3) and batch["features_a"].dtype == torch.float32
    assert batch["features_b"].shape == (3, 4, 2) and batch["labels"].tolist() == [0, 1, 0]
    assert batch["task_ids"].dtype == torch.long
    with pytest.raises(DataError, match=r"row 1 of the batch has no 'modality_b' column.*MultimodalCollator"):
        FeatureCollator()([rows[0], {"modality_a": rows[1]["modality_a"], "label": 1, "task_id": 0}])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_recipe_trains_s3_on_factors_and_the_card_rebuilds_base_and_adapter(tmp_path, capsys):
    trainer = Trainer(parse_config([*FACTORS, "--output_dir", str(tmp_path)]))
    results = trainer.train()
    out = capsys.readouterr().out
    assert "Feature towers: frozen, random (torch seed 0), sized from the data: modality_a 8x12, modality_b 8x10" in out
    assert "Vision tower" not in out and "Text tower" not in out
    assert isinstance(trainer.base, FeatureEncoderForClassification)
    assert json.loads((tmp_path / "metrics.json").read_text()) == results and results["steps"] == 4
    assert 0 <= results["eval_accuracy"] <= 1
    assert {"modality_a_only_accuracy", "modality_b_only_accuracy"} <= set(results)
    assert (tmp_path / "adapter" / "routing.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2", "step_4"]
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "torch seed 0" in card and "modality a tower alone" in card and "path/to" not in card

    # the card's snippet, run as written: a fresh encoder drawn from the seed, the adapter by PeftModel.from_pretrained
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "AutoTokenizer" not in snippet and "Image" not in snippet
    namespace: dict = {"__name__": "__card__"}
    exec(compile(snippet, "adapter/README.md", "exec"), namespace)
    loaded = namespace["model"]
    assert isinstance(loaded, peft.PeftModel) and namespace["base"] is not trainer.base
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = {k: v for k, v in next(iter(trainer.eval_loader)).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(namespace["outputs"].logits, trained(**namespace["inputs"]).logits, rtol=0, atol=0)
        loaded.base_model.set_keep_ratio(1.0)  # the snippet ends by sparsifying
        torch.testing.assert_close(loaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)


def test_an_interrupted_feature_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    def config(folder, **overrides) -> TrainConfig:
        return parse_config([*FACTORS, "--output_dir", str(tmp_path / folder), "--no_unimodal_baselines",
                             *[f"--{k}={v}" for k, v in overrides.items()]])

    assert_resumes_exactly(config, monkeypatch, step=2)


def test_recipe_trains_s3_on_a_tiny_multibench_pickle(tmp_path, capsys):
    _write_affect(tmp_path / "data", "mosi_raw.pkl")  # 4 train clips (after the empty one), 3 validation, 3 test
    out = tmp_path / "run"
    flags = ["--config", "none", "--method", "s3", "--dataset", "multibench:mosi", "--data_dir", str(tmp_path / "data"),
             "--batch_size", "2", "--eval_batch_size", "4", "--max_steps", "2", "--warmup_steps", "1",
             "--output_dir", str(out), "--method_config", "{num_experts: 4, latent_size: 16}"]
    assert load_recipe_module().main(flags) == 0, capsys.readouterr().err
    assert "modality_a 50x5, modality_b 50x6" in capsys.readouterr().out  # MultiBench's vision and text, length 50
    results = json.loads((out / "metrics.json").read_text())
    assert results["dataset"] == "multibench:mosi" and results["steps"] == 2 and "eval_accuracy" in results
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("flags, named", [
    (["--method", "mope"], ["--method mope", "query/key/value", "--method s3"]),
    (["--method", "altmoe"], ["--method altmoe", "retrieval", "--method s3"]),
    (["--method", "s3", "--cache_features", "true"], ["--cache_features", "--method s3"]),
], ids=["mope", "altmoe", "s3-cache-features"])
def test_methods_that_cannot_train_feature_tasks_are_refused_in_one_line(flags, named, tmp_path, capsys):
    code = load_recipe_module().main(["--config", "none", "--dataset", "synthetic:factors", "--output_dir",
                                      str(tmp_path / "run"), *flags])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("error: ")
    assert all(part in error for part in named), error
    assert not (tmp_path / "run").exists()


def test_the_demo_configs_fields_of_another_method_or_dataset_are_one_clear_error():
    demo = ROOT / "recipes" / "configs" / "mope_synthetic.yaml"
    with pytest.raises(ConfigError, match="prompt_length") as refused:  # the MoPE demo config, given, under s3
        parse_config(["--config", str(demo), "--method", "s3", "--dataset", "synthetic:factors"])
    assert refused.value.field == "method_config" and "--config none" in str(refused.value)
    with pytest.raises(ConfigError, match="hypotheses"):
        TrainConfig(method="s3", dataset="synthetic:factors", dataset_config="{hypotheses: [colour]}")
    with pytest.raises(ConfigError, match="--data_dir"):
        TrainConfig(method="s3", dataset="multibench:mosi")


def test_the_s3_factors_config_is_a_feature_task_with_s3_defaults():
    config = parse_config(["--config", str(ROOT / "recipes" / "configs" / "s3_factors.yaml")])
    assert config.method == "s3" and config.method_kwargs == {} and config.feature_task
    assert not config.cache_features and (config.feature_hidden_size, config.feature_layers) == (40, 1)
    task = load_task(config.dataset, train_size=8, eval_size=4)
    assert set(task.dataset["train"].column_names) == {"modality_a", "modality_b", "label"}

