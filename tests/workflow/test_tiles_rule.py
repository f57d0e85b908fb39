"""The report's contact sheets show the tiling the model sees, whatever the geometry config says."""

from __future__ import annotations

from pathlib import Path

import yaml
from workflow_helpers import run_snakemake

from panobench.config import load_run_config
from panobench.geometry.tiling import plan_tiles


def test_plot_tiles_draws_the_resolved_cell_geometry(workflow_dir: Path) -> None:
    """With two pitch rows and no global view, ``plot_tiles`` draws a cell's resolved tiling: 2 rows x 4 tiles at
    overlap 0 (FOV 90), 8 views, not the single-row tiling + global view that the overlap alone would give."""
    cfg = yaml.safe_load((workflow_dir / "config" / "small.yaml").read_text())
    cfg["run"]["geometry"] = {"fov": 90.0, "pitch_rows": [-30.0, 30.0], "include_global": False}
    (workflow_dir / "config" / "rows.yaml").write_text(yaml.safe_dump(cfg))
    run_snakemake(workflow_dir, "results/small/tiles/ov0.00.png", "--cores", "1", "--configfile", "config/rows.yaml")

    assert (workflow_dir / "results/small/tiles/ov0.00.png").read_bytes()[:4] == b"\x89PNG"
    cell = load_run_config(workflow_dir / "results/small/configs/ov0.00_fov90_mlp_vis-pretrained_seed0.yaml")
    plan = plan_tiles(cell.geometry.overlap, cell.geometry.fov, cell.geometry.pitch_rows)   # as PanoVLM builds it
    assert (plan.num_tiles, plan.num_views(cell.geometry.include_global)) == (8, 8)
    log = (workflow_dir / "logs/small/plot_tiles/ov0.00.log").read_text()
    assert "(8 views)" in log, log
