"""Task loading (synthetic, local jsonl/csv, Hub column mapping, offline errors), bad-row reports and collation."""

from __future__ import annotations

import csv
import io
import json
import socket
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import ViTImageProcessor

from mmexperts.data.catalog import KNOWN_DATASETS
from mmexperts.data.collate import MultimodalCollator
from mmexperts.data.loading import load_task
from mmexperts.data.tasks import BAD_ROW_REASONS, TASK_TYPES, DataReport
from mmexperts.offline.synthetic import ENTAILMENT_LABELS, MULTILABEL_NAMES, build_tokenizer

LABELS = ["cat", "dog", "bird"]


# ------------------------------------------------------------------------------------------------ local fixtures


def _images(folder: Path) -> None:
    """Good RGB PNGs, a grayscale JPEG, a file of garbage bytes and a truncated PNG."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"good{i}.png")
    Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8), mode="L").save(folder / "gray.jpg")
    (folder / "corrupt.png").write_bytes(b"these bytes are not an image")
    (folder / "truncated.png").write_bytes((folder / "good0.png").read_bytes()[:60])


TRAIN_ROWS = [
    {"image": "img/good0.png", "text": "a cat", "label": "cat"},
    {"image": "img/good1.png", "text": "a dog", "label": "dog"},
    {"image": "img/missing.png", "text": "no file", "label": "cat"},       # missing_image
    {"image": "img/corrupt.png", "text": "garbage", "label": "cat"},       # corrupt_image
    {"image": "img/good2.png", "text": "   ", "label": "dog"},            # empty_text
    {"image": "img/good3.png", "text": "a horse", "label": "horse"},      # unknown_label
    {"image": "img/gray.jpg", "text": "a gray cat", "label": "cat"},
    {"image": "img/truncated.png", "text": "cut", "label": "dog"},        # corrupt_image
    {"image": "img/good3.png", "text": "a bird", "label": "bird"},
]
VALIDATION_ROWS = [
    {"image": "img/good0.png", "text": "bird again", "label": "bird"},
    {"image": "img/nowhere.png", "text": "lost", "label": "dog"},         # missing_image
    {"image": "img/good1.png", "text": "what", "label": "zebra"},         # unknown_label
]
EXPECTED_COUNTS = {"train": {"missing_image": 1, "corrupt_image": 2, "empty_text": 1, "unknown_label": 1},
                   "validation": {"missing_image": 1, "corrupt_image": 0, "empty_text": 0, "unknown_label": 1}}


def _write(folder: Path, split: str, rows: list[dict], fmt: str) -> None:
    if fmt == "jsonl":
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    with open(folder / f"{split}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "|".join(v) if isinstance(v, list) else v for k, v in row.items()})


def make_local(tmp_path: Path, fmt: str = "jsonl", train=TRAIN_ROWS, validation=VALIDATION_ROWS,
               labels: list[str] | None = LABELS) -> Path:
    folder = tmp_path / f"data-{fmt}"
    folder.mkdir(parents=True)
    _images(folder / "img")
    _write(folder, "train", train, fmt)
    if validation:
        _write(folder, "validation", validation, fmt)
    if labels is not None:
        (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------------ synthetic


@pytest.mark.parametrize("task,task_type,columns,names", [
    ("entailment", "single_label_classification", ["image", "text", "label"], ENTAILMENT_LABELS),
    ("multilabel", "multi_label_classification", ["image", "text", "labels"], MULTILABEL_NAMES),
    ("retrieval", "retrieval", ["image", "captions", "image_id"], []),
])
def test_synthetic_tasks(task, task_type, columns, names):
    data = load_task(f"synthetic:{task}", train_size=12, eval_size=8, seed=3)
    assert data.task_type == task_type and data.task_type in TASK_TYPES
    assert data.label_names == list(names) and data.name == f"synthetic:{task}"
    assert set(data.dataset) == {"train", "validation"}
    assert data.dataset["train"].column_names == columns
    assert (len(data.dataset["train"]), len(data.dataset["validation"])) == (12, 8)
    assert data.dataset["train"][0]["image"].mode == "RGB"
    assert data.report.num_dropped == 0 and str(data.report) == "no bad rows"


def test_synthetic_max_rows_seed_and_kwargs():
    first = load_task("synthetic:retrieval", train_size=10, eval_size=4, max_rows=6, captions_per_image=3)
    again = load_task("synthetic:retrieval", train_size=10, eval_size=4, max_rows=6, captions_per_image=3)
    assert len(first.dataset["train"]) == 6 and len(first.dataset["validation"]) == 4
    assert all(len(c) == 3 for c in first.dataset["train"]["captions"])
    assert first.dataset["train"]["captions"] == again.dataset["train"]["captions"]
    with pytest.raises(ValueError, match="unknown synthetic task"):
        load_task("synthetic:vqa")
    with pytest.raises(ValueError, match="max_rows"):
        load_task("synthetic:entailment", max_rows=0)


# ---------------------------------------------------------------------------------------------------- local data


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_local_bad_rows_are_counted_and_dropped(tmp_path, fmt):
    data = load_task("local", data_dir=str(make_local(tmp_path, fmt)))
    assert data.task_type == "single_label_classification" and data.label_names == LABELS
    assert data.report.counts == EXPECTED_COUNTS
    assert data.report.total == {"missing_image": 2, "corrupt_image": 2, "empty_text": 1, "unknown_label": 2}
    assert data.report.num_dropped == 7
    assert "train: 5" in str(data.report) and "validation: 2" in str(data.report)
    train = data.dataset["train"]
    assert train.column_names == ["image", "text", "label"]
    assert train.features["label"].names == LABELS
    assert train["text"] == ["a cat", "a dog", "a gray cat", "a bird"]
    assert train["label"] == [0, 1, 0, 2]
    assert all(image.mode == "RGB" for image in train["image"])  # the grayscale JPEG is converted
    assert data.dataset["validation"]["label"] == [2]


def test_local_strict_stops_at_first_bad_row(tmp_path):
    folder = make_local(tmp_path)
    with pytest.raises(ValueError, match=r"split 'train', row 2 .*missing image.*missing\.png"):
        load_task("local", data_dir=str(folder), strict=True)
    good = [row for row in TRAIN_ROWS if row["label"] != "horse" and "good" in row["image"] and row["text"].strip()]
    folder = make_local(tmp_path / "unknown", train=good + [TRAIN_ROWS[5]], validation=None)
    with pytest.raises(ValueError, match=rf"split 'train', row {len(good)} .*unknown label.*'horse'"):
        load_task(str(folder), strict=True)
    clean = load_task(str(make_local(tmp_path / "clean", train=good, validation=None)), strict=True)
    assert clean.report.num_dropped == 0 and len(clean.dataset["train"]) == len(good)


def test_local_label_names_integers_and_path_name(tmp_path):
    rows = [{"image": "img/good0.png", "text": "t", "label": "zebra"},
            {"image": "img/good1.png", "text": "t", "label": "ant"},
            {"image": "img/good2.png", "text": "t", "label": "zebra"}]
    data = load_task(str(make_local(tmp_path, train=rows, validation=None, labels=None)))
    assert data.label_names == ["ant", "zebra"] and data.dataset["train"]["label"] == [1, 0, 1]
    indexed = [{"image": "img/good0.png", "text": "t", "label": 2}, {"image": "img/good1.png", "text": "t", "label": 5}]
    data = load_task("local", data_dir=str(make_local(tmp_path / "ints", train=indexed, validation=None)))
    assert data.dataset["train"]["label"] == [2] and data.report.counts["train"]["unknown_label"] == 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_local_multi_label(tmp_path, fmt):
    rows = [{"image": "img/good0.png", "text": "one", "labels": ["cat", "bird"]},
            {"image": "img/good1.png", "text": "two", "labels": ["dog"]},
            {"image": "img/good2.png", "text": "three", "labels": ["dog", "unicorn"]},
            {"image": "img/corrupt.png", "text": "four", "labels": ["cat"]}]
    data = load_task("local", data_dir=str(make_local(tmp_path, fmt, train=rows, validation=None)))
    assert data.task_type == "multi_label_classification" and data.label_names == LABELS
    assert data.report.counts["train"] == {"missing_image": 0, "corrupt_image": 1, "empty_text": 0,
                                           "unknown_label": 1}
    assert data.dataset["train"].column_names == ["image", "text", "labels"]
    assert data.dataset["train"]["labels"] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_local_retrieval_and_known_name_with_data_dir(tmp_path):
    rows = [{"image": "img/good0.png", "captions": ["a", "b"], "image_id": 10},
            {"image": "img/good1.png", "captions": ["c", " "], "image_id": 11},
            {"image": "img/good2.png", "captions": ["d"], "image_id": 12}]
    data = load_task("local", data_dir=str(make_local(tmp_path, train=rows, validation=None, labels=None)))
    assert data.task_type == "retrieval" and data.label_names == []
    assert data.dataset["train"]["image_id"] == [10, 12]
    assert data.dataset["train"]["captions"] == [["a", "b"], ["d"]]
    assert data.report.counts["train"]["empty_text"] == 1

    multi = [{"image": "img/good0.png", "text": "plot", "labels": ["dog"]}]
    data = load_task("mm-imdb", data_dir=str(make_local(tmp_path / "imdb", train=multi, validation=None)))
    assert data.task_type == "multi_label_classification" and data.name == "mm-imdb"
    with pytest.raises(ValueError, match="multi_label_classification task"):
        load_task("mm-imdb", data_dir=str(make_local(tmp_path / "single", validation=None)))


def test_local_errors_list_columns(tmp_path):
    folder = tmp_path / "nolabel"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"image": "x.png", "text": "t", "score": 1}) + "\n")
    with pytest.raises(ValueError, match="available columns: image .*text .*score"):
        load_task("local", data_dir=str(folder))
    with pytest.raises(FileNotFoundError, match="no split file"):
        load_task("local", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        load_task("local")
    with pytest.raises(ValueError, match="data_dir"):
        load_task("food101")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_task("not-a-dataset")


# ------------------------------------------------------------------------------------------------------------ hub


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode everywhere, and any socket connection fails at once, so nothing can wait on the network."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["snli-ve", "coco", "someone/some-dataset"])
def test_hub_offline_error_is_clear(no_network, name):
    with pytest.raises(ConnectionError, match="(?s)offline.*HF_HUB_OFFLINE.*data_dir"):
        load_task(name)


def _image_bytes(seed: int, corrupt: bool = False) -> dict:
    """An encoded image as the Hub stores it (bytes, no path)."""
    if corrupt:
        return {"bytes": b"\x89PNG broken", "path": None}
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), seed * 40, dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _fake_hub(monkeypatch, splits: dict[str, datasets.Dataset]) -> list:
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_known_mapping_with_string_labels(monkeypatch):
    features = datasets.Features({"image": datasets.Image(), "premise": datasets.Value("string"),
                                  "hypothesis": datasets.Value("string"), "label": datasets.Value("string")})
    rows = {"image": [_image_bytes(0), _image_bytes(1), _image_bytes(2, corrupt=True), _image_bytes(3)],
            "premise": ["p"] * 4, "hypothesis": ["h0", "h1", "h2", "h3"],
            "label": ["contradiction", "entailment", "neutral", "maybe"]}
    calls = _fake_hub(monkeypatch, {"train": datasets.Dataset.from_dict(rows, features=features)})
    data = load_task("snli-ve", revision="main")
    assert calls == [(KNOWN_DATASETS["snli-ve"].hub_id, {"revision": "main"})]
    assert data.task_type == "single_label_classification"
    assert data.label_names == ["entailment", "neutral", "contradiction"]
    assert data.dataset["train"].column_names == ["image", "text", "label"]
    assert data.dataset["train"]["text"] == ["h0", "h1"] and data.dataset["train"]["label"] == [2, 0]
    assert data.dataset["train"][0]["image"].mode == "RGB"
    assert data.report.counts["train"]["corrupt_image"] == 1 and data.report.counts["train"]["unknown_label"] == 1


def test_hub_auto_detected_columns(monkeypatch):
    features = datasets.Features({"id": datasets.Value("int32"), "picture": datasets.Image(),
                                  "sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"])})
    rows = {"id": [0, 1], "picture": [_image_bytes(0), _image_bytes(1)], "sentence": ["a", ""], "label": [1, 0]}
    _fake_hub(monkeypatch, {"train": datasets.Dataset.from_dict(rows, features=features),
                            "val": datasets.Dataset.from_dict(rows, features=features)})
    data = load_task("someone/yes-no", max_rows=1)
    assert data.task_type == "single_label_classification" and data.label_names == ["no", "yes"]
    assert set(data.dataset) == {"train", "validation"}
    assert len(data.dataset["train"]) == 1 and data.dataset["validation"]["text"] == ["a"]
    assert data.report.counts["validation"]["empty_text"] == 1

    bare = datasets.Features({"picture": datasets.Image(), "score": datasets.Value("float32")})
    _fake_hub(monkeypatch, {"train": datasets.Dataset.from_dict({"picture": [_image_bytes(0)], "score": [0.5]},
                                                                features=bare)})
    with pytest.raises(ValueError, match=r"no text column.*available columns: picture \(Image\), score \(float32\)"):
        load_task("someone/no-text")


def test_hub_retrieval_mapping(monkeypatch):
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "img_id": datasets.Value("string"), "filename": datasets.Value("string")})
    rows = {"image": [_image_bytes(0), _image_bytes(1)], "caption": [["x", "y"], ["z"]], "img_id": ["7", "8"],
            "filename": ["a.jpg", "b.jpg"]}
    _fake_hub(monkeypatch, {"test": datasets.Dataset.from_dict(rows, features=features)})
    data = load_task("flickr30k")
    assert data.task_type == "retrieval" and list(data.dataset) == ["test"]
    assert data.dataset["test"].column_names == ["image", "captions", "image_id"]
    assert data.dataset["test"]["captions"] == [["x", "y"], ["z"]] and data.dataset["test"]["image_id"] == [0, 1]


def test_data_report_str():
    report = DataReport()
    report.add("train", ["", "missing_image", "unknown_label", "missing_image"])
    assert report.counts["train"]["missing_image"] == 2 and report.total["unknown_label"] == 1
    assert set(report.counts["train"]) == set(BAD_ROW_REASONS)
    assert str(report) == "3 bad rows dropped - train: 3 (missing_image=2, unknown_label=1)"


# -------------------------------------------------------------------------------------------------------- collate


@pytest.fixture(scope="module")
def processors():
    return build_tokenizer(), ViTImageProcessor(size={"height": 32, "width": 32})


def test_collator_single_label_padding(processors):
    tokenizer, image_processor = processors
    split = load_task("synthetic:entailment", train_size=8, eval_size=4).dataset["train"]
    collator = MultimodalCollator(tokenizer, image_processor, "single_label_classification")
    batch = next(iter(DataLoader(split, batch_size=8, collate_fn=collator)))
    lengths = [len(tokenizer(text)["input_ids"]) for text in split["text"]]
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == (8, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == split["label"]
    if "token_type_ids" in tokenizer("x"):
        assert batch["token_type_ids"].shape == batch["input_ids"].shape
    short = MultimodalCollator(tokenizer, image_processor, "single_label_classification", max_length=5)
    assert short([split[i] for i in range(3)])["input_ids"].shape[1] == 5


def test_collator_multi_label_and_retrieval(processors):
    tokenizer, image_processor = processors
    multi = load_task("synthetic:multilabel", train_size=4, eval_size=4).dataset["train"]
    collator = MultimodalCollator(tokenizer, image_processor, "multi_label_classification",
                                  num_labels=len(MULTILABEL_NAMES))
    batch = collator([multi[i] for i in range(4)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4, len(MULTILABEL_NAMES))
    with pytest.raises(ValueError, match="num_labels=3"):
        MultimodalCollator(tokenizer, image_processor, "multi_label_classification", num_labels=3)([multi[0]])

    retrieval = load_task("synthetic:retrieval", train_size=4, eval_size=4).dataset["validation"]
    rows = [retrieval[i] for i in range(4)]
    batch = MultimodalCollator(tokenizer, image_processor, "retrieval")(rows)
    assert batch["image_ids"].dtype == torch.long and batch["image_ids"].tolist() == [4, 5, 6, 7]
    first = tokenizer([row["captions"][0] for row in rows], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], first["input_ids"]) and "labels" not in batch
    second = MultimodalCollator(tokenizer, image_processor, "retrieval", caption_index=1)(rows)
    expected = tokenizer([row["captions"][1] for row in rows], padding=True, return_tensors="pt")
    assert torch.equal(second["input_ids"], expected["input_ids"])


def test_collator_errors(processors):
    tokenizer, image_processor = processors
    collator = MultimodalCollator(tokenizer, image_processor, "single_label_classification")
    image = Image.new("RGB", (8, 8))
    with pytest.raises(KeyError, match="no 'label' column.*it has: image, text"):
        collator([{"image": image, "text": "a red circle"}])
    with pytest.raises(KeyError, match="no 'text' column"):
        collator([{"image": image, "label": 0}])
    with pytest.raises(ValueError, match="unknown task_type"):
        MultimodalCollator(tokenizer, image_processor, "regression")
