"""MultiBench feature pickles: affect and MIMIC layouts written here, MultiBench's preprocessing, labels, errors."""

from __future__ import annotations

import fractions
import json
import pickle
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from mmexperts.data import load_multibench, load_task
from mmexperts.errors import UnsafePickleError

from conftest import AFFECT_STEPS as T
from conftest import write_affect as _write_affect


@pytest.fixture
def mosi(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, _write_affect(tmp_path, "mosi_raw.pkl")


def _rows(ds: datasets.Dataset) -> dict:
    return ds.with_format("numpy")[:]


def test_affect_columns_cropping_padding_and_labels(mosi):
    folder, raw = mosi
    data = load_multibench("mosi", folder, modalities=("audio", "text"), max_seq_len=8)
    assert list(data) == ["train", "validation", "test"]
    features = data["train"].features
    assert features["modality_a"] == datasets.Array2D((8, 4), "float32")
    assert features["modality_b"] == datasets.Array2D((8, 6), "float32")
    assert features["label"].names == ["negative", "positive"]
    train = _rows(data["train"])
    assert len(train["label"]) == 4  # the all-zero text clip is dropped
    assert train["label"].tolist() == [0, 1, 1, 0]  # sentiment > 0; -1.5, 2.0, 0.4, -0.2
    assert _rows(data["test"])["label"].tolist() == [0, 1, 0]  # a neutral 0.0 counts as negative
    expected_audio = np.zeros((8, 4), np.float32)
    expected_audio[:4] = raw["train"]["audio"][0, T - 4:]
    expected_audio[3, 0] = 0.0  # -inf -> 0
    np.testing.assert_array_equal(train["modality_a"][0], expected_audio)  # cropped at the text start, padded after
    np.testing.assert_array_equal(train["modality_b"][1], raw["train"]["text"][2, :8])  # 10 steps truncated to 8
    info = json.loads(data["train"].info.description)["multibench"]
    assert info["modalities"] == {"modality_a": "audio", "modality_b": "text"}
    assert info["dropped_empty_text"] == {"train": 1, "validation": 0, "test": 0}
    batch = data["validation"].with_format("torch")[:2]
    assert batch["modality_a"].dtype == torch.float32 and batch["modality_a"].shape == (2, 8, 4)


def test_affect_defaults_nan_to_zero_and_unaligned_crop(mosi):
    folder, raw = mosi
    data = load_multibench("cmu-mosi", folder / "mosi_raw.pkl")  # the file itself; default vision + text, length 50
    train = _rows(data["train"])
    assert train["modality_a"].shape == (4, 50, 5) and train["modality_b"].shape == (4, 50, 6)
    assert np.isfinite(train["modality_a"]).all() and train["modality_a"][0, 2, 1] == 0.0  # NaN -> 0
    vision = raw["train"]["vision"].copy()
    vision[2, :3] = 0.0  # the full-length clip's vision starts 3 steps after its text
    raw["train"]["vision"] = vision
    with open(folder / "mosi_raw.pkl", "wb") as f:
        pickle.dump(raw, f)
    aligned = _rows(load_multibench("mosi", folder, max_seq_len=T)["train"])["modality_a"]
    unaligned = _rows(load_multibench("mosi", folder, max_seq_len=T, aligned=False)["train"])["modality_a"]
    np.testing.assert_array_equal(aligned[1], vision[2])  # cropped at the text start: step 0
    np.testing.assert_array_equal(unaligned[1, :T - 3], vision[2, 3:])  # cropped at its own first non-zero step
    assert not unaligned[1, T - 3:].any()


def test_z_norm_matches_per_clip_standardisation(mosi):
    folder, raw = mosi
    data = load_multibench("mosi", folder, modalities=("vision", "audio"), max_seq_len=T, z_norm=True)
    clip = torch.tensor(raw["train"]["vision"][3, T - 7:])  # MultiBench: torch mean/std over the cropped clip
    expected = torch.nan_to_num((clip - clip.mean(0, keepdim=True)) / clip.std(0, keepdim=True)).numpy()
    got = _rows(data["train"])["modality_a"][2]
    np.testing.assert_allclose(got[:7], expected, rtol=1e-5, atol=1e-5)
    assert not got[7:].any()
    single_step = _rows(data["train"])["modality_b"][3]  # one real step: std undefined -> 0
    assert not single_step.any()


def test_humor_keeps_its_labels_and_sarcasm_binarises(tmp_path):
    _write_affect(tmp_path, "humor.pkl", {"train": [1, 0, 1, 0, 1], "valid": [0, 1, 1], "test": [1, 1, 0]})
    humor = load_multibench("ur-funny", tmp_path)
    assert _rows(humor["train"])["label"].tolist() == [1, 1, 0, 1]
    assert humor["train"].features["label"].names == ["not_humorous", "humorous"]
    _write_affect(tmp_path, "sarcasm.pkl", {"train": [-1, 1, 1, -1, 1], "valid": [1, -1, -1], "test": [-1, 1, 1]})
    sarcasm = load_multibench("mustard", tmp_path)
    assert _rows(sarcasm["validation"])["label"].tolist() == [1, 0, 0]
    _write_affect(tmp_path / "bad", "humor.pkl", {"train": [1, 0, 2, 0, 1], "valid": [0, 1, 1], "test": [1, 1, 0]})
    with pytest.raises(ValueError, match=r"humor labels must be 0 or 1, found \[2.0\]"):
        load_multibench("humor", tmp_path / "bad")


def _write_mimic(folder: Path, n: int = 40) -> dict:
    rng = np.random.default_rng(1)
    adm_labels = np.zeros((n, 6))
    for i in range(n):
        adm_labels[i, rng.integers(1, 7, size=2).clip(max=5)] = rng.integers(0, 2)
    data = {"ep_tdata": rng.normal(2.0, 3.0, (n, 24, 12)), "adm_features_all": rng.normal(1.0, 2.0, (n, 5)),
            "adm_labels_all": adm_labels, "y_icd9": rng.integers(0, 2, (n, 20)).astype(np.float64)}
    data["ep_tdata"][0, 0, 0] = np.inf
    data["adm_features_all"][1, 2] = np.nan
    with open(folder / "im.pk", "wb") as f:
        pickle.dump(data, f)
    return data


def _multibench_mimic_order(n: int) -> list[int]:
    """MultiBench's split: random.seed(10); random.shuffle over the list of samples."""
    samples = [(i, "sample") for i in range(n)]
    random.seed(10)
    random.shuffle(samples)
    return [i for i, _ in samples]


def test_mimic_split_labels_and_zscore(tmp_path):
    raw = _write_mimic(tmp_path)
    data = load_multibench("mimic", tmp_path)
    order = _multibench_mimic_order(40)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    assert data["train"].features["modality_a"] == datasets.Array2D((1, 5), "float32")
    assert data["train"].features["modality_b"] == datasets.Array2D((24, 12), "float32")
    positive = raw["adm_labels_all"] > 0
    mortality = [next((j for j in range(1, 6) if positive[i, j]), 0) for i in range(40)]
    assert _rows(data["validation"])["label"].tolist() == [mortality[i] for i in order[:4]]
    assert _rows(data["test"])["label"].tolist() == [mortality[i] for i in order[4:8]]
    series = np.nan_to_num(raw["ep_tdata"], posinf=0.0)
    expected = (series - series.mean(axis=(0, 1))) / series.std(axis=(0, 1))
    np.testing.assert_allclose(_rows(data["train"])["modality_b"], expected[order[8:]], rtol=1e-5, atol=1e-5)
    static = _rows(data["test"])["modality_a"]
    assert np.isfinite(static).all() and static.shape == (4, 1, 5)
    icd9 = load_multibench("mimic", tmp_path, modalities=("timeseries", "static"), mimic_task=7, max_seq_len=30)
    assert icd9["train"].features["label"].names == ["negative", "positive"]
    assert icd9["train"].features["modality_a"] == datasets.Array2D((30, 12), "float32")
    assert _rows(icd9["train"])["label"].tolist() == raw["y_icd9"][order[8:], 7].astype(int).tolist()


def test_load_task_reads_multibench(mosi):
    folder, _ = mosi
    task = load_task("multibench:mosi", data_dir=str(folder), max_rows=3, max_seq_len=6)
    assert task.task_type == "single_label_classification" and task.num_labels == 2
    assert len(task.dataset["train"]) == 3 and task.dataset["test"].features["modality_a"].shape == (6, 5)
    with pytest.raises(ValueError, match="pass data_dir="):
        load_task("multibench:mosi")


def test_refuses_unsafe_pickles_unless_trusted(tmp_path):
    data = _write_affect(tmp_path, "sarcasm.pkl")
    data["note"] = fractions.Fraction(1, 3)  # any non-numpy class is refused by default
    with open(tmp_path / "sarcasm.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(pickle.UnpicklingError, match="fractions.Fraction.*trust_pickle=True"):
        load_multibench("sarcasm", tmp_path)
    assert len(load_multibench("sarcasm", tmp_path, trust_pickle=True)["train"]) == 4


def _eval_payload(code: str) -> bytes:
    """A protocol-4 pickle that reaches eval through a dotted name under an allowed module and runs ``code``."""
    def text(value: str) -> bytes:
        return b"\x8c" + bytes([len(value.encode())]) + value.encode()  # SHORT_BINUNICODE
    get_eval = text("numpy.dtypes") + text("__builtins__.get") + b"\x93" + text("eval") + b"\x85R"
    return b"\x80\x04" + get_eval + text(code) + b"\x85R."


def test_dotted_name_payload_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = _eval_payload(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    pickle.loads(payload)  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "sarcasm.pkl").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"numpy\.dtypes\.__builtins__\.get.*trust_pickle=True"):
        load_multibench("sarcasm", tmp_path)
    with pytest.raises(UnsafePickleError):
        load_task("multibench:sarcasm", data_dir=str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reads_every_pickle_protocol_without_trust(tmp_path, protocol):
    data = _write_affect(tmp_path, "mosi_data.pkl")
    with open(tmp_path / "mosi_data.pkl", "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    loaded = _rows(load_multibench("mosi", tmp_path, max_seq_len=T)["validation"])
    np.testing.assert_array_equal(loaded["modality_b"][2], data["valid"]["text"][2])


@pytest.mark.parametrize("call, error, message", [
    (lambda d: load_multibench("iemocap", d), ValueError, "unknown MultiBench dataset 'iemocap'; valid choices: mosi"),
    (lambda d: load_multibench("mosi", "https://drive.google.com/x.pkl"), ValueError, "got the URL"),
    (lambda d: load_multibench("mosi", d / "missing"), FileNotFoundError, "does not exist"),
    (lambda d: load_multibench("humor", d), FileNotFoundError, r"no humor.pkl for 'humor' in .*found mosi_raw.pkl"),
    (lambda d: load_multibench("mosi", d, ("vision", "depth")), ValueError, "two different names out of"),
    (lambda d: load_multibench("mosi", d, ("text", "text")), ValueError, "got \\('text', 'text'\\)"),
    (lambda d: load_multibench("mosi", d, mimic_task=3), ValueError, "mimic_task applies to 'mimic' only"),
    (lambda d: load_multibench("mosi", d, max_seq_len=0), ValueError, "max_seq_len must be a positive integer"),
])
def test_clear_errors(mosi, call, error, message):
    with pytest.raises(error, match=message):
        call(mosi[0])


def test_missing_modality_and_bad_mimic_task(tmp_path):
    data = _write_affect(tmp_path, "mosei_raw.pkl")
    del data["valid"]["audio"]
    with open(tmp_path / "mosei_raw.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ValueError, match=r"split 'valid' of .* lacks \['audio'\]"):
        load_multibench("mosei", tmp_path, modalities=("audio", "text"))
    assert len(load_multibench("mosei", tmp_path)["validation"]) == 3  # vision + text still load
    _write_mimic(tmp_path)
    with pytest.raises(ValueError, match="mimic_task must be -1 .* 0..19, got 20"):
        load_multibench("mimic", tmp_path, mimic_task=20)
    raw = _write_mimic(tmp_path)
    raw["y_icd9"][3, 1] = 2.0
    with open(tmp_path / "im.pk", "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(ValueError, match=r"y_icd9\[:, 1\] must hold 0/1 labels, found \[2.0\]"):
        load_multibench("mimic", tmp_path, mimic_task=1)
