"""Synthetic panorama dataset: determinism, geometry against py360convert, CSV format, seam coverage."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import py360convert
import py360convert.utils
import pytest
from PIL import Image

from panobench.data import synthetic
from panobench.data.synthetic import (
    PALETTE,
    SceneObject,
    erp_direction_grid,
    erp_yaw_pitch_grid,
    generate_synthetic,
    render_scene,
)
from panobench.errors import ConfigError, InputError

SMALL = {"n_train": 4, "n_valid": 2, "n_test": 3, "width": 128, "height": 64}
TILE_YAWS = (0.0, 90.0, 180.0, -90.0)  # the 4 horizon tiles of the overlap-0 tiling


@pytest.fixture(autouse=True)
def _pin_py360convert_numpy_path(monkeypatch):
    # py360convert silently switches to OpenCV remap when cv2 is importable; the oracle is its numpy path.
    monkeypatch.setattr(py360convert.utils, "cv2", None, raising=False)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    """The dataset at default size (320/40/60 images, 512x256), generated once for this module."""
    out = tmp_path_factory.mktemp("synth") / "default"
    generate_synthetic(out, seed=0)
    return out


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _colour_count(img: np.ndarray, rgb: tuple[int, int, int], tol: float = 30.0) -> int:
    dist = np.linalg.norm(img.astype(np.float64) - np.asarray(rgb, dtype=np.float64), axis=-1)
    return int((dist <= tol).sum())


def _tile(erp: np.ndarray, yaw: float, pitch: float = 0.0, hw: int = 64) -> np.ndarray:
    return py360convert.e2p(erp, fov_deg=90, u_deg=yaw, v_deg=pitch, out_hw=(hw, hw))


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = _file_hashes(generate_synthetic(tmp_path / "a", seed=3, **SMALL).out_dir)
    b = _file_hashes(generate_synthetic(tmp_path / "b", seed=3, **SMALL).out_dir)
    assert len(a) == 4 + 2 + 3 + 3 + 3  # images + CSVs + scenes.jsonl, summary.json, README.txt
    assert a == b


def test_different_seed_gives_different_data(tmp_path):
    a = _file_hashes(generate_synthetic(tmp_path / "a", seed=0, **SMALL).out_dir)
    b = _file_hashes(generate_synthetic(tmp_path / "b", seed=1, **SMALL).out_dir)
    assert a.keys() == b.keys()
    assert a["images/train/000000.png"] != b["images/train/000000.png"]
    assert a["train.csv"] != b["train.csv"]
    assert a["scenes.jsonl"] != b["scenes.jsonl"]


def test_regenerating_replaces_previous_output_but_not_foreign_directories(tmp_path):
    out = tmp_path / "synth"
    generate_synthetic(out, seed=0, **SMALL)
    (out / "stale.txt").write_text("left over")
    generate_synthetic(out, seed=0, **SMALL)
    assert not (out / "stale.txt").exists()
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="refusing to replace"):
        generate_synthetic(foreign, seed=0, **SMALL)
    assert (foreign / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(("kwargs", "field"), [({"width": 100, "height": 64}, "2:1"), ({"n_train": 0}, "n_train"),
                                                ({"seed": -1}, "seed"),
                                                # 5 objects have no number word: it was a KeyError mid-generation
                                                ({"objects": (2, 5)}, r"objects per scene .* <= 4"),
                                                ({"objects": (0, 2)}, "objects per scene")])
def test_bad_parameters_are_refused(tmp_path, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        generate_synthetic(tmp_path / "x", **{**SMALL, **kwargs})


def test_direction_grid_follows_e2p_convention():
    yaw, pitch = erp_yaw_pitch_grid(8, 4)
    assert yaw[0, 0] == pytest.approx(-157.5) and yaw[0, -1] == pytest.approx(157.5)
    assert pitch[0, 0] == pytest.approx(67.5) and pitch[-1, 0] == pytest.approx(-67.5)
    d = erp_direction_grid(8, 4)
    assert d.shape == (4, 8, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0)


@pytest.mark.parametrize(("yaw", "pitch"), [(20.0, 0.0), (-25.0, 15.0), (100.0, -20.0), (178.0, 5.0)])
def test_object_lands_where_py360convert_looks(yaw, pitch):
    """An object at (yaw, pitch) appears in the e2p tile centred nearest it, on the correct side, and not opposite."""
    directions = erp_direction_grid(512, 256)
    obj = SceneObject(colour="red", shape="disc", yaw=yaw, pitch=pitch, size=12.0)
    erp, _ = render_scene((obj,), directions, np.random.default_rng(0))
    nearest = min(TILE_YAWS, key=lambda t: _angle_diff(t, yaw))
    tile = _tile(erp, nearest)
    hit = np.linalg.norm(tile.astype(float) - PALETTE["red"], axis=-1) <= 30
    assert hit.sum() > 50
    rows, cols = np.nonzero(hit)
    # Gnomonic image of the centre: x = tan(dyaw) (positive right), y = tan(pitch)/cos(dyaw) (positive up).
    dyaw = math.radians((yaw - nearest + 180.0) % 360.0 - 180.0)
    expect_col = 32 + 32 * math.tan(dyaw) - 0.5
    expect_row = 32 - 32 * math.tan(math.radians(pitch)) / math.cos(dyaw) - 0.5
    assert cols.mean() == pytest.approx(expect_col, abs=2.0)
    assert rows.mean() == pytest.approx(expect_row, abs=2.5)
    assert _colour_count(_tile(erp, nearest + 180.0), PALETTE["red"]) == 0


def test_shapes_have_expected_relative_areas():
    directions = erp_direction_grid(512, 256)
    area = {}
    for shape in synthetic.SHAPES:
        obj = SceneObject(colour="blue", shape=shape, yaw=0.0, pitch=0.0, size=15.0)
        area[shape] = int(synthetic.object_mask(obj, directions).sum())
    # disc pi r^2 > square 2 r^2 > triangle (3 sqrt3 / 4) r^2 (gnomonic distortion is small at 15°).
    assert area["disc"] / area["square"] == pytest.approx(math.pi / 2, rel=0.08)
    assert area["square"] / area["triangle"] == pytest.approx(2 / (3 * math.sqrt(3) / 4), rel=0.08)


def test_generated_objects_visible_in_nearest_tile_only(tmp_path):
    out = generate_synthetic(tmp_path / "s", seed=5, n_train=12, n_valid=1, n_test=1).out_dir
    checked = 0
    for line in (out / "scenes.jsonl").read_text(encoding="utf-8").splitlines():
        scene = json.loads(line)
        erp = np.asarray(Image.open(out / scene["url"]).convert("RGB"))
        for obj in scene["objects"]:
            nearest = min(TILE_YAWS, key=lambda t, y=obj["yaw"]: _angle_diff(t, y))
            assert _colour_count(_tile(erp, nearest), tuple(obj["rgb"])) >= 5, (scene["url"], obj)
            assert _colour_count(_tile(erp, nearest + 180.0), tuple(obj["rgb"])) == 0, (scene["url"], obj)
            checked += 1
    assert checked >= 24


def test_csv_format_and_reference_counts(default_set):
    scenes = [json.loads(x) for x in (default_set / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]
    for split, n_images in (("train", 320), ("valid", 40), ("test", 60)):
        raw = (default_set / f"{split}.csv").read_bytes()
        assert b"\r\n" not in raw
        header, rows = _read_csv(default_set / f"{split}.csv")
        assert header == ["url", "query", "annotation"]
        urls = {r["url"] for r in rows}
        assert len(urls) == n_images
        for url in urls:
            assert not Path(url).is_absolute() and ".." not in Path(url).parts
            assert (default_set / url).is_file()
        groups: dict[tuple[str, str], list[str]] = {}
        for r in rows:
            assert r["query"].strip() and r["annotation"].strip()
            groups.setdefault((r["url"], r["query"]), []).append(r["annotation"])
        sizes = {len(refs) for refs in groups.values()}
        if split == "test":
            assert sizes <= {4, 5, 6} and len(sizes) > 1
            assert all(len(set(refs)) == len(refs) for refs in groups.values())  # distinct paraphrases
        else:
            assert sizes == {1}
        # The CSV holds exactly the references recorded as ground truth.
        truth = {(s["url"], q["query"]): q["references"] for s in scenes if s["split"] == split for q in s["queries"]}
        assert truth == groups


def test_captions_state_the_scene_facts(default_set):
    for line in (default_set / "scenes.jsonl").read_text(encoding="utf-8").splitlines():
        scene = json.loads(line)
        objs = scene["objects"]
        assert 2 <= len(objs) <= 4
        assert len({o["colour"] for o in objs}) == len(objs)  # a colour/shape query is unambiguous
        for q in scene["queries"]:
            if q["query"] == synthetic.SCENE_QUERY:
                for ref in q["references"]:
                    assert all(f"{o['colour']} {o['shape']}" in ref for o in objs)
            else:
                (obj,) = [o for o in objs if f"{o['colour']} {o['shape']}" == q["query"]]
                phrase = dict(synthetic.DIRECTIONS)[obj["direction"]]
                for ref in q["references"]:
                    assert phrase in ref and synthetic.ELEVATIONS[obj["elevation"]] in ref


def test_objects_do_not_overlap_and_stay_near_horizon(default_set):
    for line in (default_set / "scenes.jsonl").read_text(encoding="utf-8").splitlines():
        objs = json.loads(line)["objects"]
        for o in objs:
            assert abs(o["pitch"]) <= 35 and 10 <= o["size"] <= 20
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                gap = synthetic.angular_distance_deg(a["yaw"], a["pitch"], b["yaw"], b["pitch"])
                assert gap > a["size"] + b["size"]


def test_default_set_has_objects_across_seams(default_set):
    """Checked on the pixels: the same object colour on both sides of the ERP seam / a 4-tile seam."""
    scenes = [json.loads(x) for x in (default_set / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]
    erp_seam = tile_seam = 0
    width = 512
    seam_cols = [int(round((s + 180.0) / 360.0 * width)) for s in synthetic.TILE_SEAMS_DEG]
    for scene in scenes:
        img = np.asarray(Image.open(default_set / scene["url"]).convert("RGB")).astype(int)
        palette = [tuple(o["rgb"]) for o in scene["objects"]]

        def across(left: np.ndarray, right: np.ndarray, palette=palette) -> bool:
            return any(((left == c).all(-1) & (right == c).all(-1)).any() for c in palette)

        erp_seam += across(img[:, 0], img[:, -1])
        tile_seam += any(across(img[:, c - 1], img[:, c]) for c in seam_cols)
    summary = json.loads((default_set / "summary.json").read_text(encoding="utf-8"))
    assert (erp_seam, tile_seam) == (summary["erp_seam_images"], summary["tile_seam_images"])
    assert erp_seam >= 0.2 * len(scenes)
    assert tile_seam >= 0.2 * len(scenes)
