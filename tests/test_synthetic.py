"""Tests of the procedurally generated image-text datasets and their tokenizer.

Captions and labels are checked against scenes decoded back from the rendered pixels, independently of the
generator's own bookkeeping.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import datasets
import numpy as np
import pytest
from PIL import Image

from mmexperts.offline import synthetic
from mmexperts.offline.synthetic import (
    CAPTION_VOCABULARY,
    HYPOTHESIS_TYPES,
    MULTILABEL_NAMES,
    build_entailment_dataset,
    build_multilabel_dataset,
    build_retrieval_dataset,
    build_synthetic_splits,
    build_tokenizer,
)

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
ROWS = {"top": 0, "middle": 1, "bottom": 2}
COLUMNS = {"left": 0, "middle": 1, "right": 2}
NUMBERS = {w: i + 1 for i, w in enumerate(["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}


def raw(ds: datasets.Dataset) -> datasets.Dataset:
    return ds.cast_column("image", datasets.Image(decode=False))


def image_bytes(ds: datasets.Dataset) -> list[bytes]:
    return [im["bytes"] for im in raw(ds)["image"]]


def decode_scene(image: Image.Image) -> dict[tuple[str, str], tuple[int, int]]:
    """Objects read back from pixels: {(colour, shape): (row, col)} via per-cell colour and bounding-box fill."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    flat = pixels.reshape(-1, 3)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    background = values[counts.argmax()]
    foreground = np.abs(pixels - background).sum(-1) > 60
    size = pixels.shape[0]
    objects = {}
    for r in range(3):
        for c in range(3):
            ys = slice(round(r * size / 3), round((r + 1) * size / 3))
            xs = slice(round(c * size / 3), round((c + 1) * size / 3))
            mask = foreground[ys, xs]
            if mask.sum() < 10:
                continue
            mean = pixels[ys, xs][mask].mean(0)
            colour = min(PALETTE, key=lambda name: np.abs(np.array(PALETTE[name]) - mean).sum())
            yy, xx = np.nonzero(mask)
            fill = mask.sum() / ((yy.max() - yy.min() + 1) * (xx.max() - xx.min() + 1))
            shape = "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle"
            objects[(colour, shape)] = (r, c)
    return objects


def holds(text: str, objects: dict) -> bool:
    """Truth of a caption in a decoded scene, from the caption's words alone."""
    if m := re.fullmatch(r"there is a (\w+) shape", text):
        return any(colour == m.group(1) for colour, _ in objects)
    if m := re.fullmatch(r"there is a (\w+)", text):
        return any(shape == m.group(1) for _, shape in objects)
    if m := re.fullmatch(r"there is a (\w+) (\w+)", text):
        return m.groups() in objects
    if m := re.fullmatch(r"a (\w+) (\w+) is in the (\w+) (row|column)", text):
        cell = objects.get(m.group(1, 2))
        index, table = (0, ROWS) if m.group(4) == "row" else (1, COLUMNS)
        return cell is not None and cell[index] == table[m.group(3)]
    if m := re.fullmatch(r"a (\w+) (\w+) is (left of|right of|above|below) a (\w+) (\w+)", text):
        a, b = objects.get(m.group(1, 2)), objects.get(m.group(4, 5))
        if a is None or b is None:
            return False
        return {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[m.group(3)]
    if m := re.fullmatch(r"there (?:is|are) (\w+) shapes?", text):
        return len(objects) == NUMBERS[m.group(1)]
    parts = [re.fullmatch(r"a (\w+) (\w+)", part) for part in text.split(" and ")]
    assert all(parts), f"unparsable caption {text!r}"
    return sorted(p.groups() for p in parts) == sorted(objects)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def entailment() -> datasets.Dataset:
    return build_entailment_dataset(800, seed=0, hypotheses=HYPOTHESIS_TYPES)


@pytest.fixture(scope="module")
def entailment_large_images() -> datasets.Dataset:
    return build_entailment_dataset(120, seed=5, image_size=64, hypotheses=HYPOTHESIS_TYPES)


# --------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("builder,text_column", [(build_entailment_dataset, "text"),
                                                 (build_multilabel_dataset, "text"),
                                                 (build_retrieval_dataset, "captions")])
def test_same_seed_same_data_different_seed_different_data(builder, text_column):
    a, b, c = builder(40, seed=7), builder(40, seed=7), builder(40, seed=8)
    assert image_bytes(a) == image_bytes(b)
    assert a[text_column] == b[text_column]
    assert image_bytes(a) != image_bytes(c)
    assert a[text_column] != c[text_column]


# ----------------------------------------------------------------------------------------- columns/features


def test_entailment_columns_and_features(entailment):
    assert entailment.column_names == ["image", "text", "label"]
    assert isinstance(entailment.features["image"], datasets.Image)
    assert entailment.features["label"].names == ["contradiction", "entailment"]
    assert len(entailment) == 800
    image = entailment[0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert isinstance(entailment[0]["text"], str)


def test_multilabel_columns_features_and_labels_from_pixels():
    ds = build_multilabel_dataset(60, seed=2, image_size=64)
    assert ds.column_names == ["image", "text", "labels"]
    assert ds.features["labels"].length == len(MULTILABEL_NAMES)
    assert all(name in ds.info.description for name in MULTILABEL_NAMES)
    positives = 0
    for example in ds:
        labels = example["labels"]
        assert len(labels) == len(MULTILABEL_NAMES) and set(labels) <= {0.0, 1.0}
        colours = [w for w in example["text"].split() if w in PALETTE]
        assert len(colours) == 1
        objects = decode_scene(example["image"])
        assert len(objects) >= 2
        cells = [cell for (colour, _), cell in objects.items() if colour == colours[0]]
        shapes = {shape for (colour, shape) in objects if colour == colours[0]}
        expected = [float(s in shapes) for s in ("circle", "square", "triangle")] + [
            float(any(r == 0 for r, _ in cells)), float(any(r == 2 for r, _ in cells)),
            float(any(c == 0 for _, c in cells)), float(any(c == 2 for _, c in cells))]
        assert labels == expected, example["text"]
        positives += sum(labels) > 0
    assert 0 < positives < len(ds)


def test_retrieval_columns_distinct_true_captions():
    ds = build_retrieval_dataset(60, seed=3, image_size=64, captions_per_image=3)
    assert ds.column_names == ["image", "captions", "image_id"]
    assert ds["image_id"] == list(range(60))
    assert len(set(image_bytes(ds))) == 60
    for example in ds:
        assert len(example["captions"]) == 3 and len(set(example["captions"])) == 3
        objects = decode_scene(example["image"])
        assert all(holds(caption, objects) for caption in example["captions"]), example["captions"]


def test_retrieval_rejects_bad_captions_per_image():
    with pytest.raises(ValueError, match="captions_per_image.*0"):
        build_retrieval_dataset(4, captions_per_image=0)
    with pytest.raises(ValueError, match="99"):
        build_retrieval_dataset(4, captions_per_image=99)


# ------------------------------------------------------------------------------------- entailment balance


def test_entailment_labels_true_of_images(entailment_large_images):
    for example in entailment_large_images:
        objects = decode_scene(example["image"])
        assert holds(example["text"], objects) == bool(example["label"]), example["text"]


def test_entailment_labels_balanced(entailment):
    assert Counter(entailment["label"]) == {0: 400, 1: 400}


def test_entailment_text_alone_is_chance(entailment):
    by_text = defaultdict(list)
    for text, label in zip(entailment["text"], entailment["label"]):
        by_text[text].append(label)
    assert len(by_text) > 100
    assert all(np.mean(labels) == 0.5 for labels in by_text.values())
    # The best possible text-only classifier: a lookup of each text's majority label, scored on the data it saw.
    best = sum(max(Counter(labels).values()) for labels in by_text.values())
    assert best / len(entailment) == 0.5


def test_entailment_image_alone_is_chance(entailment):
    by_image = defaultdict(list)
    for image, label in zip(image_bytes(entailment), entailment["label"]):
        by_image[image].append(label)
    assert len(by_image) == 400
    assert all(sorted(labels) == [0, 1] for labels in by_image.values())


def test_entailment_covers_all_templates(entailment):
    texts = entailment["text"]
    for pattern in (r"there is a \w+ shape", r"there is a (circle|square|triangle)", r"there is a \w+ \w+", r".* row",
                    r".* column", r".* (left of|right of|above|below) .*"):
        assert any(re.fullmatch(pattern, t) for t in texts), pattern


def test_entailment_default_hypotheses_are_colour_existence():
    data = build_entailment_dataset(40, seed=3)
    assert all(re.fullmatch(r"there is a \w+ shape", text) for text in data["text"])
    assert Counter(data["label"]) == {0: 20, 1: 20}


def test_entailment_unknown_hypothesis_type_is_named():
    with pytest.raises(ValueError, match="'colors'"):
        build_entailment_dataset(8, hypotheses=["colors"])


# ------------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("task", ["entailment", "multilabel", "retrieval"])
def test_splits(task):
    splits = build_synthetic_splits(task, train_size=24, eval_size=8, seed=1)
    assert set(splits) == {"train", "validation"}
    assert len(splits["train"]) == 24 and len(splits["validation"]) == 8
    assert image_bytes(splits["train"])[:8] != image_bytes(splits["validation"])
    builder = {"entailment": build_entailment_dataset, "multilabel": build_multilabel_dataset,
               "retrieval": build_retrieval_dataset}[task]
    assert image_bytes(splits["train"]) == image_bytes(builder(24, seed=1))
    if task == "retrieval":
        assert not set(splits["train"]["image_id"]) & set(splits["validation"]["image_id"])


def test_bad_task_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'vqa'.*entailment.*multilabel.*retrieval"):
        build_synthetic_splits("vqa", 10, 10)


@pytest.mark.parametrize("train_size,eval_size,bad", [(0, 4, "0"), (4, -3, "-3")])
def test_bad_sizes(train_size, eval_size, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        build_synthetic_splits("entailment", train_size, eval_size)


def test_builder_rejects_non_positive_size():
    with pytest.raises(ValueError, match="-1"):
        build_multilabel_dataset(-1)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_vocabulary_is_lower_case_unique_and_covers_captions(entailment):
    assert len(set(CAPTION_VOCABULARY)) == len(CAPTION_VOCABULARY)
    assert all(w == w.lower() and w.isalpha() for w in CAPTION_VOCABULARY)
    retrieval = build_retrieval_dataset(50, captions_per_image=5)
    words = {w for t in list(entailment["text"]) + list(build_multilabel_dataset(50)["text"]) for w in t.split()}
    words |= {w for captions in retrieval["captions"] for t in captions for w in t.split()}
    assert words <= set(CAPTION_VOCABULARY)


def test_tokenizer_round_trip_offline(tmp_path, monkeypatch, entailment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    build_tokenizer(model_max_length=24).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 24 and tokenizer.padding_side == "right"
    texts = list(entailment["text"][:16])
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 16
    assert (mask == (ids != 0)).all()
    assert (mask == 0).any()
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    lengths = mask.sum(1)
    assert (ids[range(16), lengths - 1] == tokenizer.sep_token_id).all()
    assert not (ids == tokenizer.unk_token_id).any()
    assert lengths.tolist() == [len(t.split()) + 2 for t in texts]
    for row, text in zip(ids, texts):
        assert tokenizer.decode(row, skip_special_tokens=True) == text
    shouted = tokenizer("There is a RED circle, ok?")["input_ids"]
    plain = tokenizer("there is a red circle")["input_ids"]
    assert shouted == plain[:-1] + [tokenizer.unk_token_id] * 3 + plain[-1:]


def test_make_scenes_captions_hold():
    scenes = synthetic.make_scenes(30, seed=4, image_size=64)
    assert len(scenes) == 30
    for item in scenes:
        objects = decode_scene(item["image"])
        assert len(objects) == len(item["scene"].objects)
        assert all(holds(caption, objects) for caption in item["captions"])
