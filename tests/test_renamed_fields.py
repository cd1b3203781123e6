"""Fields renamed for one vocabulary (widths end in ``_size``; ``vision``/``text``; each schedule says what it
schedules) still read back from what was written under their earlier names: recipe and sweep config files, a
method_config, a sweep folder to resume. (Saved adapters: the conformance battery.)"""

from __future__ import annotations

import json

import pytest

from mmexperts import AltMoEConfig, MoPEConfig, S3Config
from mmexperts.altmoe.layer import check_direction
from mmexperts.errors import ConfigError
from mmexperts.modeling import FeatureEncoderConfig
from mmexperts.renames import current_names
from mmexperts.training import TrainConfig
from mmexperts.training.cli import parse_config
from mmexperts.training.methods import method_config
from mmexperts.training.sweep import CONFIG_FILE, SweepConfig, compared_config, prepare_output


def test_current_names_moves_warns_and_refuses_both():
    with pytest.warns(FutureWarning, match="here: 'schedule' is now called 'pruning_schedule'"):
        moved = current_names({"schedule": "one-shot", "seed": 1}, {"schedule": "pruning_schedule"}, "here")
    assert moved == {"pruning_schedule": "one-shot", "seed": 1}
    assert current_names({"seed": 1}, {"schedule": "pruning_schedule"}, "here") == {"seed": 1}
    with pytest.raises(ConfigError, match="here sets both 'schedule' .*keep only 'pruning_schedule'"):
        current_names({"schedule": "a", "pruning_schedule": "b"}, {"schedule": "pruning_schedule"}, "here")


@pytest.mark.parametrize("config_class", [MoPEConfig, S3Config, AltMoEConfig, SweepConfig])
def test_every_renamed_field_exists_under_its_current_name_only(config_class):
    fields = set(config_class.__dataclass_fields__)
    assert config_class.renamed_fields
    for old, new in config_class.renamed_fields.items():
        assert new in fields and old not in fields


def test_method_config_reads_earlier_names():
    with pytest.warns(FutureWarning, match="method_config of 'altmoe': 'schedule' is now called 'direction_schedule'"):
        config = method_config("altmoe", {"schedule": "joint"})
    assert config.direction_schedule == "joint"
    with pytest.warns(FutureWarning):
        config = method_config("mope", {"router_cross_dim": 5, "router_self_dim": 3})
    assert (config.router_cross_size, config.router_self_size) == (5, 3)
    with pytest.warns(FutureWarning):
        train = TrainConfig(method="s3", method_config="{latent_dim: 16, expert_hidden_dim: 8}")
    assert train.method_kwargs == {"latent_dim": 16, "expert_hidden_dim": 8}  # the text as written; built renamed


def test_sweep_config_file_with_earlier_names(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("schedule: one-shot\nlatent_dim: 8\nseeds: '0'\n")
    with pytest.warns(FutureWarning, match="is now called") as caught:
        config = parse_config(["--config", str(path)], config_class=SweepConfig)
    assert sorted(str(w.message) for w in caught) == [
        f"--config {path}: '{old}' is now called '{new}' and was read as such; save it again (or rename the field) to "
        "silence this warning." for old, new in (("latent_dim", "latent_size"), ("schedule", "pruning_schedule"))]
    assert (config.pruning_schedule, config.latent_size, config.seeds) == ("one-shot", 8, "0")
    path.write_text("schedule: one-shot\npruning_schedule: progressive\n")
    with pytest.raises(ConfigError, match="sets both 'schedule'"):
        parse_config(["--config", str(path)], config_class=SweepConfig)


def test_sweep_folder_written_under_earlier_names_resumes(tmp_path):
    config = SweepConfig(output_dir=str(tmp_path), pruning_schedule="one-shot", latent_size=8)
    saved = compared_config(config)
    for old, new in SweepConfig.renamed_fields.items():
        saved[old] = saved.pop(new)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.warns(FutureWarning, match="is now called") as caught:
        assert prepare_output(config) == []
    assert len(caught) == 2 and all(str(w.message).startswith(str(tmp_path / CONFIG_FILE)) for w in caught)
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == compared_config(config)  # rewritten: current names
    with pytest.raises(ConfigError, match=r"different config \(latent_size: 8 there, 16 now\)"):
        prepare_output(SweepConfig(output_dir=str(tmp_path), pruning_schedule="one-shot", latent_size=16))


def test_earlier_direction_names_are_refused_with_the_current_one():
    assert check_direction("vision_to_text") == "vision_to_text"
    with pytest.raises(ValueError, match="'image_to_text' is now called 'vision_to_text'"):
        check_direction("image_to_text")


def test_feature_encoder_config_reads_its_earlier_field_names(tmp_path):
    config = FeatureEncoderConfig(feature_size_a=6, feature_size_b=5, hidden_size=16, num_labels=2)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["feature_dim_a"], saved["feature_dim_b"] = saved.pop("feature_size_a"), saved.pop("feature_size_b")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = FeatureEncoderConfig.from_pretrained(tmp_path)
    assert (loaded.feature_size_a, loaded.feature_size_b) == (6, 5)
    assert FeatureEncoderConfig(feature_dim_a=7).feature_size_a == 7
    assert "feature_dim_a" not in loaded.to_dict()  # written back under the current names
