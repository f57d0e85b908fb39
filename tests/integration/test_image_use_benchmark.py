"""benchmarks/image_use.py in its CPU mode: the tower probe and the real-vs-grey bridge curve on the tiny setup."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

from panobench.config import dump_run_config
from panobench.data.synthetic import PALETTE
from panobench.geometry.tiling import plan_tiles

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "image_use.py"


def load_script():
    spec = importlib.util.spec_from_file_location("image_use", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patch_labels_name_the_colour_that_covers_a_patch():
    image_use = load_script()
    views = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)        # grey: no palette colour
    views[0, :, :8, :8] = torch.tensor(PALETTE["red"], dtype=torch.uint8)[:, None, None]
    views[0, :, 8:, 8:11] = torch.tensor(PALETTE["blue"], dtype=torch.uint8)[:, None, None]   # 3/8 of the patch
    views[0, :, :8, 8:10] = torch.tensor(PALETTE["green"], dtype=torch.uint8)[:, None, None]  # 2/8: below 0.3
    labels = image_use.patch_labels(views, 8)
    background = len(PALETTE)
    assert labels.tolist() == [[list(PALETTE).index("red"), background, background, list(PALETTE).index("blue")]]


def test_linear_probe_separates_separable_classes():
    image_use = load_script()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    features = torch.nn.functional.one_hot(labels, 3).float() * 4 + 0.1 * torch.randn(600, 3, generator=g)
    result = image_use.linear_probe(features, labels, 7, seed=0)
    assert result["accuracy"] == 1.0 and result["test_rows"] == 120
    noise = image_use.linear_probe(torch.randn(600, 3, generator=g), labels, 7, seed=0)
    assert noise["accuracy"] < 0.6


def test_cpu_mode_writes_the_curve_and_the_probe(cfg_factory, tmp_path, monkeypatch):
    image_use = load_script()
    path = tmp_path / "cell.yaml"
    cfg = cfg_factory()
    dump_run_config(cfg, path)
    out = tmp_path / "iu.json"
    monkeypatch.chdir(tmp_path)
    assert image_use.main(["--config", str(path), "--steps", "2", "--every", "1", "--valid-rows", "4",
                           "--probe-images", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    curve = result["bridge"]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    for point in curve:
        for image in ("real", "grey"):
            assert math.isfinite(point[image]["answer_loss"]) and 0 <= point[image]["content_accuracy"] <= 1
    # Training moves the bridge: the loss on real panoramas changes from its untrained value.
    assert curve[2]["real"]["answer_loss"] != curve[0]["real"]["answer_loss"]
    probe = result["tower_probe"]
    views = plan_tiles(cfg.geometry.overlap, cfg.geometry.fov, cfg.geometry.pitch_rows).num_views(
        cfg.geometry.include_global)
    assert probe["images"] == 3 and probe["views"] == 3 * views and probe["patches"] == 3 * views * 64
    assert 0.0 <= probe["accuracy"] <= 1.0 and 0.0 < probe["object_patch_share"] < 1.0
