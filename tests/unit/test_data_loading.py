"""ERP image loading and QuIC-360 CSV reading: every bad input fails with a message naming file and line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from panobench.data.csvdata import (
    REQUIRED_COLUMNS,
    PanoramaCaptionDataset,
    group_references,
    make_sample_id,
    read_quic_csv,
)
from panobench.data.panorama import load_erp
from panobench.errors import ConfigError, InputError


def _erp(path: Path, value=(10, 20, 30), size=(32, 16), mode="RGB") -> Path:
    """Write a 2:1 image of one colour (size is PIL's (W, H))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _csv(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root with three valid images a.png, b.png, sub/c.jpg."""
    _erp(tmp_path / "a.png", (255, 0, 0))
    _erp(tmp_path / "b.png", (0, 255, 0))
    _erp(tmp_path / "sub" / "c.jpg", (0, 0, 255))
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# Images


def test_rgb_png_loads_as_uint8_chw(tmp_path):
    t = load_erp(_erp(tmp_path / "x.png", (10, 20, 30)))
    assert t.dtype == torch.uint8 and t.shape == (3, 16, 32)
    assert t[:, 0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 100, [100, 100, 100]),
        ("1", 1, [255, 255, 255]),
        ("LA", (77, 0), [77, 77, 77]),  # alpha dropped, grey kept
        ("RGBA", (10, 200, 30, 0), [10, 200, 30]),  # alpha dropped, colour not composited
        ("CMYK", (0, 255, 0, 0), [255, 0, 255]),
    ],
)
def test_other_modes_become_rgb(tmp_path, mode, value, expected):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    t = load_erp(_erp(tmp_path / f"x{suffix}", value, mode=mode))
    assert t.dtype == torch.uint8 and t.shape == (3, 16, 32)
    assert t[:, 3, 3].tolist() == expected


def test_palette_image_uses_its_palette(tmp_path):
    img = Image.new("P", (32, 16), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.save(tmp_path / "p.png")
    assert load_erp(tmp_path / "p.png")[:, 0, 0].tolist() == [200, 100, 50]


@pytest.mark.parametrize(("suffix", "dtype"), [(".png", np.uint16), (".tif", ">u2"), (".tif", np.int32)])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, suffix, dtype):
    values = np.tile(np.array([0, 257, 32768, 65535], dtype=np.int64), (16, 8)).astype(dtype)  # [16, 32]
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I;16B", "I")
    t = load_erp(path)
    assert t.dtype == torch.uint8
    assert t[0, 0, :4].tolist() == [0, 1, 128, 255]
    assert torch.equal(t[0], t[2])


def test_float_image_in_unit_range(tmp_path):
    Image.fromarray(np.full((16, 32), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    assert load_erp(tmp_path / "f.tif")[:, 0, 0].tolist() == [128, 128, 128]


def test_resize_to_working_size(tmp_path):
    t = load_erp(_erp(tmp_path / "big.png", (50, 60, 70), size=(64, 32)), size=(8, 16))
    assert t.shape == (3, 8, 16)
    assert t[:, 4, 8].tolist() == [50, 60, 70]
    with pytest.raises(ConfigError, match="2:1"):
        load_erp(tmp_path / "big.png", size=(8, 8))


def test_aspect_within_one_percent_is_accepted(tmp_path):
    assert load_erp(_erp(tmp_path / "ok.png", size=(201, 100))).shape == (3, 100, 201)


@pytest.mark.parametrize("size", [(64, 64), (300, 100), (203, 100)])
def test_non_2_to_1_image_is_refused(tmp_path, size):
    path = _erp(tmp_path / "wrong.png", size=size)
    with pytest.raises(InputError, match=rf"wrong\.png is {size[0]}x{size[1]}.*2:1"):
        load_erp(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(tmp_path, fmt):
    rng = np.random.default_rng(0)
    full = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(full, format=fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert load_erp(full).shape == (3, 64, 128)
    with pytest.raises(InputError, match=rf"cut\.{fmt.lower()}"):
        load_erp(cut)


def test_text_file_named_png_is_refused(tmp_path):
    (tmp_path / "fake.png").write_text("this is not an image\n")
    with pytest.raises(InputError, match=r"not a readable image file: .*fake\.png"):
        load_erp(tmp_path / "fake.png")


def test_missing_image_and_directory_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"image not found: .*nope\.png"):
        load_erp(tmp_path / "nope.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError, match=r"not a regular file: .*dir\.png"):
        load_erp(tmp_path / "dir.png")


# ---------------------------------------------------------------------------------------------------------
# CSV


def test_reads_valid_csv_with_lines_paths_and_extra_columns(root):
    csv_path = _csv(root / "train.csv", "url,query,annotation,extra\na.png,NA,a red thing,x\nsub/c.jpg,sky,null,y\n")
    df = read_quic_csv(csv_path)
    assert list(df.columns) == ["url", "query", "annotation", "path", "row", "image_id"]
    assert df["row"].tolist() == [2, 3]
    assert df["query"].tolist() == ["NA", "sky"]  # "NA"/"null" stay text
    assert df["annotation"].tolist() == ["a red thing", "null"]
    assert df["path"].tolist() == [str((root / "a.png").resolve()), str((root / "sub" / "c.jpg").resolve())]
    assert df["image_id"].tolist() == ["a.png", "sub/c.jpg"]


def test_data_root_and_inside_absolute_path(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("csvs")
    csv_path = _csv(elsewhere / "t.csv", f"url,query,annotation\na.png,q,x\n{(root / 'b.png').resolve()},q,y\n")
    df = read_quic_csv(csv_path, data_root=root)
    assert df["path"].tolist() == [str((root / "a.png").resolve()), str((root / "b.png").resolve())]


def test_quoted_multiline_field_keeps_physical_line_numbers(root):
    csv_path = _csv(root / "t.csv", 'url,query,annotation\na.png,q,"two\nlines"\nb.png,q,\n')
    with pytest.raises(InputError, match=r"t\.csv line 4: empty 'annotation'"):
        read_quic_csv(csv_path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", r"t\.csv is empty"),
        ("\n\n", r"t\.csv is empty"),
        ("url,query,annotation\n", r"t\.csv: header only, no data rows"),
        ("uri,query\na.png,q\n", r"missing required column\(s\) \['url', 'annotation'\]; found \['uri', 'query'\]"),
        ("url,query,annotation\na.png,q,x\n ,q,y\n", r"t\.csv line 3: empty 'url'"),
        ("url,query,annotation\na.png,  ,x\n", r"t\.csv line 2: empty 'query'"),
        ("url,query,annotation\na.png,q,\n", r"t\.csv line 2: empty 'annotation'"),
        ("url,query,annotation\na.png,q,x\nb.png,q,y\na.png,q,x\n", r"t\.csv line 4: duplicate of line 2"),
        ("url,query,annotation\na.png,q,x,extra\n", r"t\.csv line 2: 4 fields but the header \(line 1\) has 3"),
        ("url,query,annotation\nhttps://example.org/a.jpg,q,x\n", r"line 2: url .*remote URL; download the images"),
        ("url,query,annotation\na.png,q,x\n../outside.png,q,y\n", r"t\.csv line 3: image path '\.\./outside\.png' .*outside"),
        ("url,query,annotation\na.png,q,x\nmissing.png,q,y\nb.png,q,z\ngone.jpg,q,w\n",
         r"t\.csv: 2 image file\(s\) not found: line 3: 'missing\.png' -> .*; line 5: 'gone\.jpg'"),
        ("url,url,query,annotation\na.png,a.png,q,x\n", r"t\.csv line 1: duplicate column name"),
    ],
)
def test_bad_csv_is_refused_naming_file_and_line(root, text, pattern):
    (root.parent / "outside.png").write_bytes((root / "a.png").read_bytes())  # exists, but outside the root
    with pytest.raises(InputError, match=pattern):
        read_quic_csv(_csv(root / "t.csv", text))


def test_non_utf8_csv_names_byte_offset(root):
    raw = b"url,query,annotation\na.png,q,caf" + b"\xe9\n"  # latin-1 'é'
    with pytest.raises(InputError, match=r"t\.csv is not valid UTF-8: byte offset 32 \(0-based; line 2\) has byte 0xe9"):
        read_quic_csv(_csv(root / "t.csv", raw))


def test_utf8_bom_is_accepted(root):
    df = read_quic_csv(_csv(root / "t.csv", "\ufeffurl,query,annotation\na.png,q,café\n"))
    assert df["annotation"].tolist() == ["café"]


def test_absolute_path_outside_root_is_refused(root, tmp_path_factory):
    outside = _erp(tmp_path_factory.mktemp("elsewhere") / "o.png")
    with pytest.raises(InputError, match=r"t\.csv line 2: .*outside the data root"):
        read_quic_csv(_csv(root / "t.csv", f"url,query,annotation\n{outside},q,x\n"))


def test_symlink_escaping_root_is_refused(root, tmp_path_factory):
    outside = _erp(tmp_path_factory.mktemp("elsewhere") / "o.png")
    os.symlink(outside, root / "link.png")
    with pytest.raises(InputError, match=r"t\.csv line 2: image path 'link\.png' resolves to .*outside the data root"):
        read_quic_csv(_csv(root / "t.csv", "url,query,annotation\nlink.png,q,x\n"))


def test_missing_csv_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"CSV not found: .*nope\.csv"):
        read_quic_csv(tmp_path / "nope.csv")


def test_group_references_collects_all_references_in_order(root):
    text = "url,query,annotation\na.png,q1,r1\nb.png,q1,r2\na.png,q1,r3\na.png,q2,r4\nb.png,q1,r5\n"
    groups = group_references(read_quic_csv(_csv(root / "t.csv", text)))
    assert len(groups) == 3  # N = 5 rows over G = 3 (image, query) groups
    assert groups["url"].tolist() == ["a.png", "b.png", "a.png"]
    assert groups["query"].tolist() == ["q1", "q1", "q2"]
    assert groups["references"].tolist() == [["r1", "r3"], ["r2", "r5"], ["r4"]]
    assert groups["rows"].tolist() == [[2, 4], [3, 6], [5]]
    assert groups["sample_id"].tolist() == [make_sample_id("a.png", "q1"), make_sample_id("b.png", "q1"),
                                            make_sample_id("a.png", "q2")]
    assert groups["sample_id"].is_unique


def test_dataset_rows_and_groups(root):
    csv_path = _csv(root / "t.csv", "url,query,annotation\na.png,q,r1\na.png,q,r2\nsub/c.jpg,q,r3\n")
    rows = PanoramaCaptionDataset(csv_path, erp_size=(8, 16))
    assert len(rows) == 3
    item = rows[2]
    assert item["erp"].shape == (3, 8, 16) and item["erp"].dtype == torch.uint8
    assert (item["query"], item["annotation"], item["url"], item["row"]) == ("q", "r3", "sub/c.jpg", 4)
    assert item["sample_id"] == make_sample_id("sub/c.jpg", "q")
    grouped = PanoramaCaptionDataset(csv_path, erp_size=(8, 16), grouped=True)
    assert len(grouped) == 2
    first = grouped[0]
    assert first["references"] == ["r1", "r2"] and first["row"] == 2 and "annotation" not in first
    assert first["erp"][:, 4, 8].tolist() == [255, 0, 0]


def test_dataset_names_csv_line_for_corrupt_image(root):
    (root / "bad.png").write_text("not a png")
    ds = PanoramaCaptionDataset(_csv(root / "t.csv", "url,query,annotation\na.png,q,x\nbad.png,q,y\n"))
    assert ds[0]["erp"].shape == (3, 256, 512)
    with pytest.raises(InputError, match=r"t\.csv line 3 \(url 'bad\.png'\): not a readable image file: .*bad\.png"):
        ds[1]


def test_required_columns():
    assert REQUIRED_COLUMNS == ("url", "query", "annotation")


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_synth_cli_output_reads_back(tmp_path):
    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "panobench", "synth", "--out", str(out), "--seed", "2", "--n-train", "2",
           "--n-valid", "1", "--n-test", "2", "--width", "64", "--height", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for split in ("train", "valid", "test"):
        df = read_quic_csv(out / f"{split}.csv")
        groups = group_references(df)
        assert df["url"].nunique() == {"train": 2, "valid": 1, "test": 2}[split]
        assert all(4 <= len(r) <= 6 for r in groups["references"]) if split == "test" else len(groups) == len(df)
        assert load_erp(df["path"].iloc[0]).shape == (3, 32, 64)


def test_synth_cli_refuses_foreign_directory_with_one_line(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    cmd = [sys.executable, "-m", "panobench", "synth", "--out", str(tmp_path), "--n-train", "1", "--n-valid", "1",
           "--n-test", "1", "--width", "64", "--height", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("panobench synth: error: synthetic output")
    assert "Traceback" not in result.stderr
