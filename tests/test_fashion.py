"""Fashion-MNIST tasks: IDX files, balanced garment questions (one modality alone is at chance), captions."""

from __future__ import annotations

import gzip
from collections import Counter, defaultdict

import numpy as np
import pytest

from mmexperts.data import fashion
from mmexperts.data.loading import load_task
from mmexperts.errors import DataError


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    """A small Fashion-MNIST-shaped folder: random garments of every class, 600 training and 400 test images."""
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for split, count in (("train", 600), ("test", 400)):
        images_name, labels_name = fashion.FILES[split]
        images = rng.integers(0, 256, size=(count, 28, 28))
        write_idx(folder / images_name, images, compress=split == "train")
        write_idx(folder / labels_name, np.arange(count) % 10, compress=split == "train")
    return folder


def test_weights_balance_the_answer_given_the_class_and_given_the_attribute():
    weights = fashion.balanced_pair_weights()
    assert weights.shape == (len(fashion.CLASSES), len(fashion.ATTRIBUTES), 2)
    np.testing.assert_allclose(weights[..., 1].sum(1) / weights.sum((1, 2)), 0.5, atol=1e-6)
    np.testing.assert_allclose(weights[..., 1].sum(0) / weights.sum((0, 2)), 0.5, atol=1e-6)
    np.testing.assert_allclose(weights.sum((0, 2)), 1 / len(fashion.ATTRIBUTES), atol=1e-6)
    truth = np.array([[fashion.holds(c, a) for a in fashion.ATTRIBUTES] for c in range(len(fashion.CLASSES))])
    assert (weights[..., 1][~truth] == 0).all() and (weights[..., 0][truth] == 0).all()  # answers are true


def test_entailment_rows_are_true_and_balanced(idx_folder):
    splits = fashion.build_fashion_splits("entailment", 500, 150, seed=3, data_dir=idx_folder)
    assert {split: len(ds) for split, ds in splits.items()} == {"train": 500, "validation": 150, "test": 150}
    assert splits["train"].features["label"].names == ["no", "yes"]
    for split, ds in splits.items():
        by_class = defaultdict(list)
        for garment, attribute, label, text in zip(ds["garment"], ds["attribute"], ds["label"], ds["text"]):
            assert label == fashion.holds(garment, attribute)
            assert text in fashion.ATTRIBUTES[attribute][1]
            by_class[garment].append(label)
        for labels in by_class.values():  # exactly half "yes" per class (one extra when odd)
            assert abs(2 * sum(labels) - len(labels)) <= 1
    validation, test = (set(splits[s]["image_id"]) for s in ("validation", "test"))
    assert not validation & test


def test_a_single_modality_is_at_chance():
    """Majority answers learnt from the question alone or the garment alone score ~50 % on held-out rows."""
    splits = fashion.build_fashion_splits("entailment", 6000, 2000, seed=0)
    train, test = splits["train"], splits["test"]
    for column in ("text", "garment"):
        votes = defaultdict(Counter)
        for key, label in zip(train[column], train["label"]):
            votes[key][label] += 1
        guesses = [votes[key].most_common(1)[0][0] if votes[key] else 1 for key in test[column]]
        accuracy = np.mean(np.array(guesses) == np.array(test["label"]))
        assert 0.44 < accuracy < 0.56, (column, accuracy)


def test_retrieval_rows_have_captions_from_class_and_look(idx_folder):
    splits = fashion.build_fashion_splits("retrieval", 300, 100, seed=1, data_dir=idx_folder)
    row = splits["train"][0]
    assert len(row["captions"]) == 5 and all(isinstance(c, str) and c for c in row["captions"])
    noun = fashion.CLASS_PHRASES[row["garment"]].split(" ", 1)[1]
    assert all(noun in caption for caption in row["captions"][:3])
    for ds in splits.values():
        assert len(set(ds["image_id"])) == len(ds)
    assert not set(splits["validation"]["image_id"]) & set(splits["test"]["image_id"])


def test_load_task_gives_standard_columns(idx_folder):
    task = load_task("fashion:entailment", data_dir=str(idx_folder), train_size=50, eval_size=20, max_rows=30)
    assert task.task_type == "single_label_classification" and task.label_names == ["no", "yes"]
    assert len(task.dataset["train"]) == 30 and task.dataset["train"][0]["image"].mode == "RGB"
    task = load_task("fashion:retrieval", data_dir=str(idx_folder), train_size=50, eval_size=20)
    assert task.task_type == "retrieval" and task.label_names == []


def test_the_installed_dataset_is_read_whole():
    images, labels = fashion.read_split(fashion.DEFAULT_FOLDER, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(Counter(labels.tolist()).values()) == [1000] * 10


def test_bad_files_name_the_file_and_the_fix(tmp_path, idx_folder):
    with pytest.raises(DataError, match=r"no train-images-idx3-ubyte\(\.gz\).*apt-get install dataset-fashion-mnist"):
        fashion.read_split(tmp_path, "train")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(DataError, match=r"bad is not an unsigned-byte IDX file"):
        fashion.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match=r"short holds 3 values but its header promises \(10,\): the file is truncated"):
        fashion.read_idx(short)
    with pytest.raises(ValueError, match=r"Unknown Fashion-MNIST task 'colour'; valid choices: fashion:entailment"):
        load_task("fashion:colour", data_dir=str(idx_folder))
    with pytest.raises(ValueError, match=r"eval_size must be an integer in 1\.\.200"):
        fashion.build_fashion_splits("entailment", 10, 500, data_dir=idx_folder)
