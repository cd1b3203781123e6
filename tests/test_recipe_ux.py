"""The recipe as a newcomer meets it: one precedence rule for settings, no overwritten runs, model cards whose snippet
reloads the adapter, one-line errors, no warning noise, a report of dropped rows (issue 14)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from mmexperts.errors import ConfigError
from mmexperts.training import TrainConfig, Trainer, list_checkpoints, parse_config, train

from conftest import load_recipe_module

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"
DEMO = ROOT / "recipes" / "configs" / "mope_synthetic.yaml"
NOISE = ("is_gradient_checkpointing", "FutureWarning", "newly initialized", "TRAIN this model",
         "were not passed to `accelerate launch`", "Traceback")


TINY = dict(train_size=64, eval_size=32, batch_size=8, eval_batch_size=16, max_steps=4, warmup_steps=1, eval_steps=2,
            save_steps=2, logging_steps=1, learning_rate=1e-2, method_config={"init_weights": False},
            unimodal_baselines=False)


def tiny(backbones, output_dir, **overrides) -> TrainConfig:
    vision, text = backbones
    return TrainConfig(**{**TINY, "vision_model": vision, "text_model": text, "output_dir": str(output_dir),
                          **overrides})


def tiny_flags(backbones, output_dir, *extra: str) -> list[str]:
    vision, text = backbones
    flags = ["--vision_model", vision, "--text_model", text, "--output_dir", str(output_dir)]
    for key, value in TINY.items():
        if key == "unimodal_baselines":
            flags.append("--no_unimodal_baselines")
        else:
            flags += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip()
                      if isinstance(value, dict) else str(value)]
    return flags + list(extra)


def run_recipe(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1", PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, str(RECIPE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# ---- item 3: defaults < config file (the demo's by default) < flags ------------------------------------------------


def test_precedence_defaults_then_config_file_then_flags(tmp_path):
    demo = yaml.safe_load(DEMO.read_text())
    config = parse_config(["--max_steps", "5"], default_config=DEMO)  # what `recipes/train.py --max_steps 5` does
    assert config.max_steps == 5
    assert config.train_size == demo["train_size"] != TrainConfig.train_size
    assert config.method_kwargs == demo["method_config"] and config.dataset_kwargs == demo["dataset_config"]

    own = tmp_path / "own.yaml"
    own.write_text("train_size: 100\nbatch_size: 4\nmethod_config: {num_experts: 2}\n")
    config = parse_config(["--config", str(own), "--batch_size", "16"], default_config=DEMO)
    assert (config.train_size, config.batch_size, config.method_kwargs) == (100, 16, {"num_experts": 2})
    assert config.eval_steps == TrainConfig.eval_steps  # a given --config replaces the demo's, it is not layered
    assert parse_config([f"--config={own}"], default_config=DEMO).train_size == 100

    bare = parse_config(["--config", "none", "--max_steps", "5"], default_config=DEMO)
    assert bare == TrainConfig(max_steps=5)
    assert parse_config(["--max_steps", "5"]) == TrainConfig(max_steps=5)  # the library default: no file


def test_another_method_without_config_starts_from_the_defaults_not_the_demo(tmp_path):
    assert yaml.safe_load(DEMO.read_text())["method"] == "mope"
    config = parse_config(["--method", "s3", "--dataset", "synthetic:factors"], default_config=DEMO)
    assert config == TrainConfig(method="s3", dataset="synthetic:factors")  # no MoPE settings under an S3 run
    assert parse_config(["--method=s3"], default_config=DEMO) == TrainConfig(method="s3")
    assert parse_config(["--method", "mope", "--max_steps", "5"], default_config=DEMO).method_kwargs == \
        yaml.safe_load(DEMO.read_text())["method_config"]  # the demo's own method keeps the demo config
    given = parse_config(["--config", str(DEMO), "--method", "mope"], default_config=None)
    assert given.method_kwargs == yaml.safe_load(DEMO.read_text())["method_config"]

def test_the_recipe_starts_from_the_demo_config(monkeypatch):
    recipe = load_recipe_module()
    seen = []
    monkeypatch.setattr(recipe, "train", seen.append)
    assert recipe.main(["--max_steps", "5"]) == 0
    assert seen[0] == parse_config(["--config", str(DEMO), "--max_steps", "5"])
    assert seen[0].method_kwargs["router_temperature"] == 1.0


def test_help_states_the_rule_and_shows_the_demo_values():
    run = run_recipe("--help")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "TrainConfig's defaults < the config file" in text and "< command-line flags" in text
    assert "'--config none'" in text and "recipes/configs/mope_synthetic.yaml" in text
    assert "(default: 12000, from mope_synthetic.yaml)" in text  # train_size: the demo's value, not TrainConfig's
    no_probes = text[text.index("--no_unimodal_baselines, --no-unimodal-baselines"):]
    assert no_probes.split("--push_to_hub")[0].strip().endswith(
        "metrics.json and the card then show the adapter's scores alone).")
    assert "Skip the frozen single-modality baselines" in no_probes


# ---- item 5: paths printed, finished runs not overwritten ------------------------------------------------------------


def test_a_finished_run_is_not_overwritten_unless_asked(backbones, tmp_path, capsys):
    train(tiny(backbones, tmp_path, max_steps=6, save_steps=3, eval_steps=3))
    out = capsys.readouterr().out
    where = tmp_path.resolve()
    for path in (where, where / "adapter", where / "best", where / "checkpoints", where / "metrics.json"):
        assert str(path) in out
    assert out.index("Output folder:") < out.index("| metric | value |") < out.index(f"Wrote to {where}:")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_3", "step_6"]
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    with pytest.raises(ConfigError) as refused:
        Trainer(tiny(backbones, tmp_path)).setup()
    message = str(refused.value)
    assert str(tmp_path) in message and "--overwrite_output_dir" in message and "--resume_from_checkpoint" in message
    assert refused.value.field == "output_dir"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before

    resumed = train(tiny(backbones, tmp_path, max_steps=6, save_steps=3, eval_steps=3,
                         resume_from_checkpoint="latest"))
    assert resumed["steps"] == 6

    replaced = train(tiny(backbones, tmp_path, max_steps=2, overwrite_output_dir=True))
    assert replaced["steps"] == 2 and json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2"]  # none left of the old run
    assert "--overwrite_output_dir: removed the previous run's" in capsys.readouterr().out


# ---- item 4: model cards that reload ---------------------------------------------------------------------------------


def test_card_names_the_base_models_and_its_snippet_reloads_the_adapter(backbones, tmp_path, fake_hub):
    trainer = Trainer(tiny(backbones, tmp_path, unimodal_baselines=True, hub_model_id="someone/tiny"))
    results = trainer.train()
    vision, text = (str(Path(p).resolve()) for p in backbones)
    for folder in ("adapter", "best"):
        raw = (tmp_path / folder / "README.md").read_text()
        card = ModelCard(raw)
        assert card.data.base_model == [vision, text]
        assert card.data.library_name == "peft" and {"mmexperts", "mope"} <= set(card.data.tags)
        assert not any(tag.startswith("base_model:") for tag in card.data.tags)
        assert "base_model: ''" not in raw and "[More Information Needed]" not in raw
        assert "frozen linear probe" in raw and "eval_accuracy" in raw
        assert f"Vision tower: `{vision}`" in raw and f"Text tower: `{text}`" in raw
    assert f"{results['vision_only_accuracy']:.4f}" in (tmp_path / "adapter" / "README.md").read_text()

    # "How to use", executed as written: it rebuilds the base from the named towers and loads the saved adapter
    snippet = re.search(r"```python\n(.*?)```", (tmp_path / "adapter" / "README.md").read_text(), re.S).group(1)
    assert "path/to" not in snippet and str((tmp_path / "adapter").resolve()) in snippet
    namespace: dict = {"__name__": "__card__"}
    exec(compile(snippet, "adapter/README.md", "exec"), namespace)
    loaded = namespace["model"]
    assert isinstance(loaded, peft.PeftModel) and namespace["outputs"].logits.shape == (1, 2)
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": torch.randint(5, 40, (3, 6)),
             "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3])}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(**namespace["inputs"]).logits, trained(**namespace["inputs"]).logits,
                                   rtol=0, atol=0)

    # the card pushed to the Hub keeps model ids only in its metadata: local folders are named in the text
    from mmexperts import push_adapter_to_hub

    push_adapter_to_hub(trained, "someone/tiny", dataset="synthetic:entailment")
    pushed = fake_hub.uploads[-1]["files"]["README.md"].decode()
    assert "base_model" not in ModelCard(pushed).data.to_dict() and "base_model: ''" not in pushed
    assert "'someone/tiny'" in pushed and f"Vision tower: `{vision}`" in pushed


# ---- item 9: one-line errors, dropped-rows report --------------------------------------------------------------------


def _local_data(folder: Path) -> Path:
    """Local rows: good ones, a malformed JSON line (line 3 of train.jsonl) and a row whose image is missing."""
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200)).save(folder / f"im{i}.png")
    rows = [json.dumps({"image": f"im{i % 3}.png", "text": f"row {i}", "label": ["no", "yes"][i % 2]})
            for i in range(12)]
    lines = rows[:2] + ['{"image": "im0.png", "text": '] + rows[2:] + [json.dumps(
        {"image": "gone.png", "text": "no image", "label": "yes"})]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "validation.jsonl").write_text("\n".join(rows[:8]) + "\n")
    return folder


def test_dropped_rows_are_listed_in_the_output_folder(backbones, tmp_path):
    data = _local_data(tmp_path / "data")
    trainer = Trainer(tiny(backbones, tmp_path / "run", dataset="local", data_dir=str(data)))
    trainer.setup()
    report = json.loads((tmp_path / "run" / "dropped_rows.json").read_text())
    assert report["dropped"] == 2 and report["by_reason"] == {"missing_image": 1, "malformed_line": 1}
    assert report["by_split"] == {"train": {"missing_image": 1, "malformed_line": 1}}
    (bad,) = report["malformed_lines"]
    assert (bad["file"], bad["line"], bad["split"]) == (str(data / "train.jsonl"), 3, "train")


@pytest.mark.parametrize("case", ["bad value", "unknown method", "not a number", "unknown flag", "missing config",
                                  "missing data_dir", "strict bad row", "nothing to resume", "finished run"])
@pytest.mark.slow
def test_expected_user_errors_print_one_line_and_exit_2(case, backbones, tmp_path):
    out = tmp_path / "run"
    args, expected = {
        "bad value": (["--batch_size", "0"], "error: --batch_size must be >= 1, got 0."),
        "unknown method": (["--method", "lora"], "error: Unknown method 'lora' (--method)"),
        "not a number": (["--max_steps", "many"], "error: argument --max_steps"),
        "unknown flag": (["--max_step", "5", "--learning_rat", "1"], "error: unrecognised arguments"),
        "missing config": (["--config", str(tmp_path / "nope.yaml")], f"error: --config {tmp_path / 'nope.yaml'}"),
        "missing data_dir": (["--dataset", "local", "--data_dir", str(tmp_path / "nowhere")],
                             f"error: --data_dir {tmp_path / 'nowhere'}: no such folder"),
        "strict bad row": (tiny_flags(backbones, out, "--dataset", "local", "--strict_data", "--data_dir",
                                      str(_local_data(tmp_path / "data"))), "error: "),
        "nothing to resume": (tiny_flags(backbones, out, "--resume_from_checkpoint", "latest"),
                              "error: "),
        "finished run": (tiny_flags(backbones, out), f"error: --output_dir {out} holds a finished run"),
    }[case]
    if case == "finished run":
        out.mkdir()
        (out / "metrics.json").write_text("{}")
    run = run_recipe(*args)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(expected), run.stderr[-3000:]
    if case == "strict bad row":
        assert f"{tmp_path / 'data' / 'train.jsonl'}, line 3" in lines[0]
    if case == "finished run":
        assert "--overwrite_output_dir" in lines[0] and "--resume_from_checkpoint" in lines[0]
    if case == "nothing to resume":
        assert "checkpoint" in lines[0]


# ---- item 8: no warning noise ---------------------------------------------------------------------------------------


def test_a_normal_run_is_free_of_warning_noise(backbones, tmp_path):
    run = run_recipe(*tiny_flags(backbones, tmp_path / "run", "--max_steps", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert not [word for word in NOISE if word in run.stderr], run.stderr[-3000:]
    assert "| eval_accuracy |" in run.stdout and f"Wrote to {(tmp_path / 'run').resolve()}:" in run.stdout


def test_the_retrieval_head_notice_is_silenced(backbones, tmp_path, capfd):
    Trainer(tiny(backbones, tmp_path, method="altmoe", dataset="synthetic:retrieval",
                 method_config={"num_experts": 2, "top_k": 1, "hidden_size": 16},
                 feature_cache_dir=str(tmp_path / "feature-cache"))).setup()
    captured = capfd.readouterr()
    assert "newly initialized" not in captured.err + captured.out


def test_metrics_json_rounds_floats_to_4_decimals(backbones, tmp_path):
    results = train(tiny(backbones, tmp_path, max_steps=2, unimodal_baselines=True))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == results
    floats = [v for v in saved.values() if isinstance(v, float)]
    assert floats and all(round(v, 4) == v for v in floats)


# ---- item 6: the first backbone build explains itself ---------------------------------------------------------------


def test_the_first_backbone_build_says_where_it_caches_with_its_own_bar(tmp_path, capfd):
    from mmexperts.offline.backbones import pretrained_backbones

    built = pretrained_backbones(cache_dir=tmp_path, vision_steps=2, text_steps=2)
    err = capfd.readouterr().err
    assert "Building the synthetic backbones once" in err and f"Cached in {built.vision.parent}" in err
    assert re.search(r"roughly \d+ (s|min)", err) and "building backbones" in err and "4/4" in err
    assert "Writing model shards" not in err  # one bar for the whole build
    pretrained_backbones(cache_dir=tmp_path, vision_steps=2, text_steps=2)
    assert "Building" not in capfd.readouterr().err  # cached: nothing to say
