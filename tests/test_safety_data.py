"""Damaged local data files and mismatched Alt-MoE batches fail (or drop rows) with errors naming file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from PIL import Image

from mmexperts import AltMoEConfig
from mmexperts.data.loading import load_task
from mmexperts.data.tasks import MALFORMED_LINE
from mmexperts.errors import DataError

from conftest import make_batch, make_clip

LABELS = ["cat", "dog"]


def _folder(tmp_path: Path) -> Path:
    """A folder with three tiny PNG images and a labels.txt."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return folder


def _at(path: Path) -> str:
    """The path as a regular expression."""
    return re.escape(str(path))


def _row(i: int, label: str = "cat") -> bytes:
    return json.dumps({"image": f"im{i % 3}.png", "text": f"row {i}", "label": label}).encode() + b"\n"


def _damaged_jsonl(folder: Path) -> Path:
    """Good rows with an invalid UTF-8 line (line 2), a blank line (4) and a malformed JSON line (5)."""
    path = folder / "train.jsonl"
    path.write_bytes(_row(0) + b'{"image": "im1.png", "text": "caf\xe9", "label": "dog"}\n' + _row(1, "dog")
                     + b"\n" + b'{"image": "im2.png", "text": \n' + _row(2))
    return path


def test_undecodable_and_malformed_jsonl_lines_are_dropped_and_reported(tmp_path):
    path = _damaged_jsonl(_folder(tmp_path))
    data = load_task("local", data_dir=str(path.parent))
    assert data.dataset["train"]["text"] == ["row 0", "row 1", "row 2"]
    assert data.dataset["train"]["label"] == [0, 1, 0]
    assert data.report.counts["train"][MALFORMED_LINE] == 2 and data.report.num_dropped == 2
    assert [(bad.path, bad.line) for bad in data.report.bad_lines] == [(str(path), 2), (str(path), 5)]
    assert "not valid UTF-8" in data.report.bad_lines[0].problem
    assert "not valid JSON" in data.report.bad_lines[1].problem
    assert f"{path}, line 2: not valid UTF-8" in str(data.report)
    assert f"{path}, line 5: not valid JSON" in str(data.report)


def test_strict_refuses_the_first_malformed_line(tmp_path):
    path = _damaged_jsonl(_folder(tmp_path))
    with pytest.raises(DataError, match=rf"{_at(path)}, line 2: not valid UTF-8 .*Fix the line.*strict=True"):
        load_task("local", data_dir=str(path.parent), strict=True)
    path.write_bytes(_row(0) + b"[1, 2]\n")
    with pytest.raises(DataError, match=rf"{_at(path)}, line 2: a JSON array, not an object"):
        load_task("local", data_dir=str(path.parent), strict=True)


def test_rows_that_are_not_objects_are_bad_lines(tmp_path):
    folder = _folder(tmp_path)
    (folder / "train.jsonl").write_bytes(_row(0) + b"null\n" + b'"text"\n' + _row(1, "dog"))
    data = load_task("local", data_dir=str(folder))
    assert len(data.dataset["train"]) == 2
    assert [bad.line for bad in data.report.bad_lines] == [2, 3]


def test_empty_and_all_malformed_files_are_data_errors(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "train.jsonl"
    path.write_bytes(b"\n  \n")
    with pytest.raises(DataError, match=rf"{_at(path)} has no rows"):
        load_task("local", data_dir=str(folder))
    path.write_bytes(b"{\n\xff\n")
    with pytest.raises(DataError, match=rf"{_at(path)} has no readable rows: all 2 of its lines are malformed"):
        load_task("local", data_dir=str(folder))


def test_invalid_json_file_names_file_and_line(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "train.json"
    path.write_text('[{"image": "im0.png", "text": "a", "label": "cat"},\n {"image": "im1.png", "text": }]\n')
    with pytest.raises(DataError, match=rf"{_at(path)}, line 2, column \d+: not valid JSON"):
        load_task("local", data_dir=str(folder))
    path.write_text('{"image": "im0.png", "text": "a", "label": "cat"}\n3\n')
    with pytest.raises(DataError, match=rf"{_at(path)}, line 2: a JSON number, not an object"):
        load_task("local", data_dir=str(folder), strict=True)
    path.write_text('[{"image": "im0.png", "text": "a", "label": "cat"}]')
    assert load_task("local", data_dir=str(folder)).dataset["train"]["text"] == ["a"]


def test_undecodable_csv_records_name_file_and_line(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "train.csv"
    path.write_bytes(b"image,text,label\nim0.png,one,cat\nim1.png,caf\xe9,dog\nim2.png,\"two\nlines\",dog\n")
    data = load_task("local", data_dir=str(folder))
    assert data.dataset["train"]["text"] == ["one", "two\nlines"]
    assert [(bad.path, bad.line) for bad in data.report.bad_lines] == [(str(path), 3)]
    with pytest.raises(DataError, match=rf"{_at(path)}, line 3: not valid UTF-8.*Re-save the file as UTF-8"):
        load_task("local", data_dir=str(folder), strict=True)
    path.write_bytes(b"im\xe9ge,text,label\nim0.png,one,cat\n")
    with pytest.raises(DataError, match=rf"{_at(path)}, line 1: the header is not valid UTF-8"):
        load_task("local", data_dir=str(folder))


def test_image_that_is_not_an_image_is_a_bad_row(tmp_path):
    folder = _folder(tmp_path)
    (folder / "fake.png").write_bytes(b"")
    (folder / "train.jsonl").write_bytes(_row(0) + json.dumps({"image": "fake.png", "text": "t",
                                                                "label": "cat"}).encode() + b"\n")
    data = load_task("local", data_dir=str(folder))
    assert len(data.dataset["train"]) == 1 and data.report.counts["train"]["corrupt_image"] == 1
    with pytest.raises(DataError, match=r"row 1 .*corrupt image.*fake\.png"):
        load_task("local", data_dir=str(folder), strict=True)


def test_altmoe_refuses_image_and_text_batches_of_different_sizes():
    torch.manual_seed(0)
    model = peft.get_peft_model(make_clip(), AltMoEConfig(num_experts=4, top_k=2, hidden_size=16, dropout=0.0,
                                                          init_weights=False)).eval()
    batch = make_batch(batch_size=3, with_labels=False)
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:2], batch["attention_mask"][:2]
    message = "pixel_values has batch size 3 but input_ids has 2; .*one caption per image"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(**batch, return_loss=True)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model.base_model.token_features(**batch)
