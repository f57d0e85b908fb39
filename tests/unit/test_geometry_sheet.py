"""Contact sheet and the ``panobench tiles`` command."""

import math

import numpy as np
import pytest
from PIL import Image

from panobench.cli import main
from panobench.config import dump_run_config, run_config_from_dict
from panobench.errors import InputError
from panobench.geometry import sheet as sheet_module
from panobench.geometry.sheet import load_rgb_image, tile_footprint, write_contact_sheet
from panobench.geometry.tiling import plan_tiles


@pytest.fixture
def panorama(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(64, 128, 3), dtype=np.uint8)
    path = tmp_path / "pano.png"
    Image.fromarray(img).save(path)
    return path, img


def test_load_rgb_image(panorama, tmp_path):
    path, img = panorama
    assert np.array_equal(load_rgb_image(path), img)
    grey = tmp_path / "grey.png"
    Image.fromarray(img[..., 0]).save(grey)
    assert load_rgb_image(grey).shape == (64, 128, 3)
    with pytest.raises(InputError, match="not found"):
        load_rgb_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read image"):
        load_rgb_image(corrupt)


def test_footprint_of_a_seam_tile_is_split_and_never_spans_the_image():
    h, w = 64, 128
    lines = tile_footprint(plan_tiles(0.0).tiles[2], h, w)  # yaw 180°: straddles the seam
    assert len(lines) >= 2
    for line in lines:
        assert np.abs(np.diff(line[:, 0])).max() < w / 4
        assert line[:, 0].min() >= -0.5 - 1e-6 and line[:, 0].max() <= w - 0.5 + 1e-6
    centre = tile_footprint(plan_tiles(0.0).tiles[0], h, w)
    assert len(centre) == 1
    # The frustum's top edge at yaw 0 passes pitch +45°: row (0.5 - 45/180) * h - 0.5.
    assert centre[0][:, 1].min() == pytest.approx((0.5 - 45 / 180) * h - 0.5, abs=0.5)
    assert centre[0][:, 0].min() == pytest.approx((0.5 - 45 / 360) * w - 0.5, abs=0.5)
    assert math.isclose(centre[0][:, 0].max(), (0.5 + 45 / 360) * w - 0.5, abs_tol=0.5)


def test_write_contact_sheet(panorama, tmp_path):
    _, img = panorama
    out = write_contact_sheet(img, plan_tiles(0.5), 32, tmp_path / "sub" / "sheet.png")
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.width > 200
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["sheet.png"]  # no temp file left behind
    with pytest.raises(InputError, match="uint8"):
        write_contact_sheet(img.astype(np.float32), plan_tiles(0.5), 32, tmp_path / "bad.png")


def test_tiles_command_writes_png(panorama, tmp_path):
    path, _ = panorama
    out = tmp_path / "sheet.png"
    code = main(["tiles", str(path), "--overlap", "0.25", "--fov", "80", "--pitch-rows", "-20", "20", "--size", "32",
                 "-o", str(out)])
    assert code == 0
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"


def test_tiles_command_missing_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    code = main(["tiles", str(missing), "-o", str(tmp_path / "sheet.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "panobench tiles: error: image file not found" in err and str(missing) in err
    assert not (tmp_path / "sheet.png").exists()


def test_tiles_command_bad_overlap_exits_2(panorama, tmp_path, capsys):
    path, _ = panorama
    assert main(["tiles", str(path), "--overlap", "1.0", "-o", str(tmp_path / "s.png")]) == 2
    assert "overlap must be in [0, 1)" in capsys.readouterr().err


@pytest.fixture
def two_row_config(tmp_path):
    """A resolved run config with two pitch rows and no global view, over a one-image test CSV."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(64, 128, 3), dtype=np.uint8)).save(tmp_path / "first.png")
    Image.new("RGB", (128, 64), (0, 0, 0)).save(tmp_path / "second.png")
    csv = tmp_path / "test.csv"
    csv.write_text("url,query,annotation\nfirst.png,what,a thing\nsecond.png,what,another thing\n")
    cfg = run_config_from_dict({"data": {"root": str(tmp_path), "test_csv": str(csv)},
                                "geometry": {"overlap": 0.25, "fov": 80.0, "pitch_rows": [-30.0, 30.0],
                                             "include_global": False}})
    dump_run_config(cfg, tmp_path / "cell.yaml")
    return tmp_path / "cell.yaml", cfg


def test_tiles_from_config_draw_the_tiling_the_model_sees(two_row_config, tmp_path, monkeypatch):
    """The workflow's sheet (``tiles --config``) shows the model's views: its tile plan (two pitch rows here) and
    its global-view setting, on the first panorama of the config's test CSV."""
    config_path, cfg = two_row_config
    drawn = []

    def spy(erp, plan, size, out_path, title=None, include_global=True):
        drawn.append((erp, plan, include_global))
        return write_contact_sheet(erp, plan, size, out_path, title=title, include_global=include_global)

    monkeypatch.setattr("panobench.geometry.sheet.write_contact_sheet", spy)
    out = tmp_path / "sheet.png"
    assert main(["tiles", "--config", str(config_path), "--size", "32", "-o", str(out)]) == 0
    (erp, plan, include_global), = drawn
    # What PanoVLM builds from the same config (models/vlm.py: plan_tiles(overlap, fov, pitch_rows) and renders
    # plan.num_views(include_global) views).
    model_plan = plan_tiles(cfg.geometry.overlap, cfg.geometry.fov, cfg.geometry.pitch_rows)
    assert plan == model_plan and include_global is cfg.geometry.include_global is False
    assert sorted({t.pitch_deg for t in plan.tiles}) == [-30.0, 30.0]
    assert plan.num_tiles == 2 * plan.tiles_per_row
    assert [(t.yaw_deg, t.pitch_deg) for t in plan.tiles] == [(t.yaw_deg, t.pitch_deg) for t in model_plan.tiles]
    assert np.array_equal(erp, load_rgb_image(tmp_path / "first.png"))
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"


def test_tiles_config_and_geometry_flags_are_exclusive(two_row_config, tmp_path, capsys):
    config_path, _ = two_row_config
    assert main(["tiles", "--config", str(config_path), "--pitch-rows", "0", "-o", str(tmp_path / "s.png")]) == 2
    assert "--config sets the tiling; drop --pitch-rows" in capsys.readouterr().err
    assert main(["tiles", "-o", str(tmp_path / "s.png")]) == 2
    assert "name a PANORAMA image, or a resolved run config with --config" in capsys.readouterr().err


def test_sheet_without_global_view_renders_only_the_tiles(panorama, tmp_path, monkeypatch):
    _, img = panorama
    plan = plan_tiles(0.0, pitch_rows=(-20.0, 20.0))
    rendered = []
    real = sheet_module.render_views
    monkeypatch.setattr(sheet_module, "render_views", lambda *a, **k: rendered.append(real(*a, **k)) or rendered[-1])
    write_contact_sheet(img, plan, 16, tmp_path / "a.png", include_global=False)
    write_contact_sheet(img, plan, 16, tmp_path / "b.png")
    assert [v.shape[0] for v in rendered] == [plan.num_tiles, plan.num_tiles + 1] == [8, 9]
