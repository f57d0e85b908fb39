"""The data fingerprint: equal for the same bytes wherever the folder lives, different when any input changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from panobench.data.fingerprint import dataset_fingerprint, file_sha256, fingerprint_of
from panobench.errors import InputError


def _dataset(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True)
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        Image.new("RGB", (32, 16), colour).save(root / name)
    csvs = {}
    for split, rows in (("train", ["a.png,sky,a red sky", "b.png,sky,a green sky"]),
                        ("valid", ["b.png,sky,a green sky"]),
                        ("test", ["c.png,sky,a blue sky", "c.png,sky,the sky is blue"])):
        csvs[split] = root / f"{split}.csv"
        csvs[split].write_text("url,query,annotation\n" + "\n".join(rows) + "\n")
    return csvs


def test_fingerprint_counts_each_distinct_image_once_and_is_stable_across_copies(tmp_path):
    csvs = _dataset(tmp_path / "one")
    first = dataset_fingerprint(csvs, tmp_path / "one", progress=False)
    assert first["num_images"] == 3
    assert first["csv"]["test"]["rows"] == 2
    assert first["csv"]["train"]["sha256"] == file_sha256(csvs["train"])
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    moved = {split: tmp_path / "two" / p.name for split, p in csvs.items()}
    assert dataset_fingerprint(moved, tmp_path / "two", progress=False)["fingerprint"] == first["fingerprint"]


def test_fingerprint_changes_when_an_image_or_a_csv_changes(tmp_path):
    csvs = _dataset(tmp_path / "d")
    base = dataset_fingerprint(csvs, tmp_path / "d", progress=False)["fingerprint"]
    Image.new("RGB", (32, 16), (0, 0, 254)).save(tmp_path / "d" / "c.png")      # one image re-encoded
    changed_image = dataset_fingerprint(csvs, tmp_path / "d", progress=False)["fingerprint"]
    assert changed_image != base
    csvs["valid"].write_text("url,query,annotation\nb.png,sky,the sky is green\n")  # one caption edited
    assert dataset_fingerprint(csvs, tmp_path / "d", progress=False)["fingerprint"] not in (base, changed_image)


def test_fingerprint_of_is_order_independent_and_sensitive_to_paths():
    images = {"x/1.png": "aa", "x/2.png": "bb"}
    assert fingerprint_of({"train": "1", "test": "2"}, images) == fingerprint_of({"test": "2", "train": "1"},
                                                                               dict(reversed(images.items())))
    assert fingerprint_of({"train": "1"}, images) != fingerprint_of({"train": "1"}, {"x/1.png": "bb", "x/2.png": "aa"})


def test_missing_image_is_an_error_naming_the_csv(tmp_path):
    csvs = _dataset(tmp_path / "d")
    (tmp_path / "d" / "a.png").unlink()
    with pytest.raises(InputError, match="train.csv"):
        dataset_fingerprint(csvs, tmp_path / "d", progress=False)
