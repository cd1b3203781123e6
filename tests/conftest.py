"""Shared fixtures: tiny two-tower models built from configs (no downloads) and padded batches."""

from __future__ import annotations

import os
import tempfile
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mmexperts-hf-home-")  # tests never touch a real cache

import csv
import importlib.util
import json
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

import mmexperts  # noqa: F401  (registers the PEFT types)
from mmexperts import AltMoEConfig, VisionTextModelForClassification
from mmexperts.offline.synthetic import build_tokenizer
from mmexperts.training import TrainConfig, Trainer, train

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

IMAGE_SIZE, VOCAB, HIDDEN = 30, 99, 32


def vit_config(**overrides) -> ViTConfig:
    kwargs = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  image_size=IMAGE_SIZE, patch_size=6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTConfig(**{**kwargs, **overrides})


def bert_config(**overrides) -> BertConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return BertConfig(**{**kwargs, **overrides})


def make_classifier(num_labels: int = 3, **config_kwargs) -> VisionTextModelForClassification:
    torch.manual_seed(0)
    return VisionTextModelForClassification.from_vision_text_configs(vit_config(), bert_config(),
                                                                     num_labels=num_labels, **config_kwargs).eval()


def make_dual_encoder() -> VisionTextDualEncoderModel:
    torch.manual_seed(0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vit_config(), bert_config(), projection_dim=16)
    return VisionTextDualEncoderModel(config).eval()


# Tower settings shared by the tiny CLIP and SigLIP models (small bos/eos ids keep them inside the vocabulary).
TEXT_TOWER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION_TOWER = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    image_size=IMAGE_SIZE, patch_size=6)


def make_clip() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=TEXT_TOWER, vision_config=VISION_TOWER, projection_dim=16)).eval()


def make_siglip() -> SiglipModel:
    torch.manual_seed(0)
    return SiglipModel(SiglipConfig(text_config=TEXT_TOWER, vision_config=VISION_TOWER)).eval()


MODEL_FACTORIES = {"classifier": make_classifier, "dual_encoder": make_dual_encoder, "clip": make_clip,
                   "siglip": make_siglip}


def make_batch(batch_size: int = 4, seq_len: int = 9, seed: int = 0, with_labels: bool = True) -> dict:
    """A padded batch: row i keeps ``seq_len - i`` real tokens (CLIP's EOS id 2 ends each row), the rest is padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        real = max(seq_len - row, 2)
        input_ids[row, real - 1] = 2
        input_ids[row, real:] = 1
        attention_mask[row, real:] = 0
    batch = {"pixel_values": torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
             "input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels:
        batch["labels"] = torch.randint(0, 3, (batch_size,), generator=generator)
    return batch


@pytest.fixture
def batch() -> dict:
    return make_batch()


class FakeHub:
    """Intercepts Hub uploads: each upload lands as a snapshot in the local Hub cache, so that loading by repo id
    with ``HF_HUB_OFFLINE=1`` finds it through huggingface_hub's real cache resolution."""

    def __init__(self):
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, *args, **kwargs):
        from huggingface_hub import RepoUrl
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *args, repo_id, folder_path, **kwargs):
        import hashlib
        import shutil
        from pathlib import Path

        from huggingface_hub import constants

        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")
                 if p.is_file()}
        commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo_dir / "snapshots" / commit
        shutil.copytree(folder_path, snapshot, dirs_exist_ok=True)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
        self.uploads.append({"repo_id": repo_id, "files": files, "kwargs": kwargs})
        return f"https://huggingface.co/{repo_id}/commit/{commit}"


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    from huggingface_hub import HfApi

    hub = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, *a, **k: hub.create_repo(repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *a, **k: hub.upload_folder(*a, **k))
    return hub


# ---- the training recipe on tiny local backbones ------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def backbones(tmp_path_factory) -> tuple[str, str]:
    """Tiny random ViT and BERT folders with their image processor and tokenizer (no pretraining, no download)."""
    folder = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8)).save_pretrained(folder / "vision")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder / "vision")
    tokenizer = build_tokenizer()
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(folder / "text")
    tokenizer.save_pretrained(folder / "text")
    return str(folder / "vision"), str(folder / "text")


def tiny_config(backbones, output_dir, **overrides) -> TrainConfig:
    vision, text = backbones
    values = dict(vision_model=vision, text_model=text, output_dir=str(output_dir), train_size=64, eval_size=32,
                  batch_size=8, eval_batch_size=16, max_steps=6, warmup_steps=1, eval_steps=3, save_steps=3,
                  logging_steps=1, learning_rate=1e-2, method_config={"init_weights": False},
                  unimodal_baselines=False, feature_cache_dir=str(Path(output_dir).parent / "feature-cache"))
    return TrainConfig(**{**values, **overrides})


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "adapter_model.safetensors")


def launch_env() -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src"))
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(variable, None)
    return env


def train_on_two_cpu_processes(tmp_path, vision: str, text: str, *args: str) -> tuple[dict, dict]:
    """Train through `accelerate launch --cpu` with OpenMPI; check both ranks end with identical adapter weights and
    return (initial, final) weights of rank 0."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mpirun_hostfile", str(hostfile), "--num_cpu_threads_per_process", "1",
               str(ROOT / "tests" / "scripts" / "train_and_dump_ranks.py"),
               "--vision_model", vision, "--text_model", text, "--output_dir", str(tmp_path / "run"),
               "--train_size", "64", "--eval_size", "32", "--batch_size", "8", "--max_steps", "4",
               "--eval_steps", "2", "--save_steps", "2", "--warmup_steps", "1", "--learning_rate", "1e-2",
               "--no_unimodal_baselines", "--feature_cache_dir", str(tmp_path / "feature-cache"), *args]
    run = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [load_file(tmp_path / "run" / f"rank_{rank}.safetensors") for rank in (0, 1)]
    assert json.loads((tmp_path / "run" / "world.json").read_text())["num_processes"] == 2
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
    return load_file(tmp_path / "run" / "rank_0_initial.safetensors"), ranks[0]


def train_interrupted(config: TrainConfig, monkeypatch, step: int = 4) -> None:
    """Train until ``step`` is done, then stop as an interrupted run would (KeyboardInterrupt)."""
    original = Trainer.on_step_end

    def stop_after_step(self, loss):
        original(self, loss)
        if self.state.step == step:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(Trainer, "on_step_end", stop_after_step)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(Trainer, "on_step_end", original)


def assert_resumes_exactly(config_for: Callable[..., TrainConfig], monkeypatch, step: int = 4) -> None:
    """A run stopped after ``step`` and resumed from its latest checkpoint ends with exactly the adapter weights of an
    uninterrupted run. ``config_for(folder, **overrides)`` builds each run's config ("straight", "resumed")."""
    train(config_for("straight"))
    train_interrupted(config_for("resumed"), monkeypatch, step)
    resumed_config = config_for("resumed", resume_from_checkpoint="latest")
    train(resumed_config)
    straight = adapter_weights(Path(config_for("straight").output_dir) / "adapter")
    resumed = adapter_weights(Path(resumed_config.output_dir) / "adapter")
    assert straight.keys() == resumed.keys() and straight
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


# ---- shared by several test modules (no test module imports another) ---------------------------------------------
ALTMOE_WIDTH = 16  # the Alt-MoE connectors' width in `make_altmoe`


def make_altmoe(kind: str = "clip", seed: int = 0, **overrides) -> peft.PeftModel:
    """An Alt-MoE adapter (4 experts, top-2, width ``ALTMOE_WIDTH``, random init drawn from ``seed``) on a tiny base."""
    settings = dict(num_experts=4, top_k=2, hidden_size=ALTMOE_WIDTH, dropout=0.0, init_weights=False)
    base = MODEL_FACTORIES[kind]()
    torch.manual_seed(seed)
    return peft.get_peft_model(base, AltMoEConfig(**{**settings, **overrides})).eval()


AFFECT_STEPS = 10  # MultiBench pads every affect sequence at the front to a fixed length (50 in the real pickles)
AFFECT_DIMS = {"vision": 5, "audio": 4, "text": 6}


def affect_split(rng: np.random.Generator, lengths: list[int], labels: list[float]) -> dict:
    """One split in MultiBench's layout: (N, T, dim) arrays left-padded with zeros, labels (N, 1, 1), ids."""
    n, steps = len(lengths), AFFECT_STEPS
    split = {m: np.zeros((n, steps, d), np.float32) for m, d in AFFECT_DIMS.items()}
    for i, length in enumerate(lengths):
        for m, d in AFFECT_DIMS.items():
            if length:
                split[m][i, steps - length:] = rng.normal(size=(length, d)) + 3.0
    split["labels"] = np.asarray(labels, np.float32).reshape(n, 1, 1)
    split["id"] = np.asarray([f"clip{i}" for i in range(n)])
    return split


def write_affect(folder: Path, file: str, labels: dict[str, list[float]] | None = None) -> dict:
    """Write a seeded MultiBench affect pickle (train/valid/test, a -inf and a NaN in train) and return its data."""
    rng = np.random.default_rng(0)
    labels = labels or {"train": [-1.5, 0.0, 2.0, 0.4, -0.2], "valid": [1.0, -1.0, 3.0], "test": [0.0, 2.6, -2.2]}
    lengths = {"train": [4, 0, 10, 7, 1], "valid": [3, 5, 12], "test": [6, 2, 8]}  # 12 > T: cut to T
    data = {s: affect_split(rng, [min(n, AFFECT_STEPS) for n in lengths[s]], labels[s]) for s in labels}
    data["train"]["audio"][0, -1, 0] = -np.inf  # COVAREP's -inf
    data["train"]["vision"][0, -2, 1] = np.nan
    folder.mkdir(exist_ok=True)
    with open(folder / file, "wb") as f:
        pickle.dump(data, f)
    return data


TRAIN_RECIPE = ROOT / "recipes" / "train.py"


def load_recipe_module():
    """``recipes/train.py`` imported as a module (to call its ``main`` in-process)."""
    spec = importlib.util.spec_from_file_location("recipe_train", TRAIN_RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SWEEP_RECIPE = ROOT / "recipes" / "sweep_s3.py"
SWEEP_TINY = dict(num_train=64, num_eval=32, sparsities="0,0.25,0.5,0.75", seeds="0,1", num_experts=4, latent_size=8,
                  hidden_size=8, epochs=2, finetune_epochs=2, batch_size=32, criterion="gate_mass")


def sweep_flags(output_dir: Path, base: dict = SWEEP_TINY, **overrides) -> list[str]:
    """The S3 sweep recipe's command-line flags for the fields of ``base`` updated by ``overrides``."""
    values = {**base, **overrides, "output_dir": str(output_dir)}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def start_sweep(output_dir: Path, *extra: str, base: dict = SWEEP_TINY, **overrides) -> subprocess.Popen:
    """The S3 sweep recipe in a subprocess, without progress bars: the fields of ``base`` updated by ``overrides``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(SWEEP_RECIPE), *sweep_flags(output_dir, base, **overrides), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sweep_rows(output_dir: Path) -> list[dict]:
    """The rows of ``output_dir/sweep.csv`` as dicts of strings."""
    with open(output_dir / "sweep.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def kill_sweep_after_first_row(process: subprocess.Popen, output_dir: Path) -> int:
    """SIGKILL the sweep ``process`` as soon as its CSV holds a row; returns how many rows it holds then."""
    deadline = time.monotonic() + 240
    while not ((output_dir / "sweep.csv").exists() and sweep_rows(output_dir)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no row after 240 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return len(sweep_rows(output_dir))  # a complete CSV at any moment: rows are written atomically
