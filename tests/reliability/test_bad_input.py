"""Bad input: one clear error line naming the file/row/key, exit status 2, no partial output.

Each case calls the real CLI (``panobench.cli.main``) in-process against the reference run's tiny models, so one
case costs a model build, not an interpreter start; two cases also run ``python -m panobench`` as a subprocess to
prove the exact stderr contract. Image-mode cases (greyscale, RGBA, 16-bit, palette) must *work*, converted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from reliability_helpers import CELL_A, RECIPE, reliability_config, run_snakemake, stage_dir, write_config

from panobench.cli import main

H, W = 64, 128


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def env(reference_run, tmp_path, monkeypatch):
    """cwd = the reference run (relative model paths resolve); a private data root with one good image."""
    monkeypatch.chdir(reference_run.workdir)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    good = reference_run.workdir / "data" / "synthetic" / "images" / "test" / "000000.png"
    shutil.copy(good, root / "images" / "good.png")
    cfg = yaml.safe_load((reference_run.workdir / "results" / "small" / "configs" / f"{CELL_A}.yaml").read_text())
    cfg["data"].update(root=str(root), test_csv=str(root / "test.csv"))
    cfg_path = tmp_path / "cell.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return {"root": root, "cfg": cfg, "cfg_path": cfg_path, "tmp": tmp_path, "workdir": reference_run.workdir}


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run ``panobench ARGV``; return the exit status and the stderr lines that the CLI itself printed."""
    capsys.readouterr()
    status = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, [ln for ln in err.splitlines() if ln.startswith("panobench ")]


def assert_one_error(status: int, lines: list[str], command: str, *needles: str) -> str:
    assert status == 2
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"panobench {command}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def write_csv(root: Path, rows: list[str], header: str = "url,query,annotation", name: str = "test.csv") -> Path:
    path = root / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def generate(capsys, env, csv: Path) -> tuple[int, list[str], Path]:
    out = env["tmp"] / "out"
    status, lines = cli(capsys, "generate", "--config", str(env["cfg_path"]), "--stage", "baseline",
                        "--csv-input", str(csv), "--out", str(out))
    return status, lines, out


def assert_no_output(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


GOOD_ROW = "images/good.png,red box,a red box is ahead."


# ------------------------------------------------------------------------------------------------ data: images
def _bad_image(root: Path, kind: str) -> str:
    path = root / "images" / f"bad_{kind}.png"
    good = (root / "images" / "good.png").read_bytes()
    if kind == "missing":
        pass
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "not_an_image":
        path.write_text("<html>definitely not a PNG</html>\n")
    elif kind == "not_2to1":
        Image.new("RGB", (100, 64), (10, 20, 30)).save(path)
    return f"images/{path.name}"


@pytest.mark.parametrize("kind,needle", [("missing", "not found"), ("truncated", "cannot decode"),
                                         ("not_an_image", "not a readable image"), ("not_2to1", "2:1")])
def test_bad_image_is_one_error_naming_file_and_row(env, capsys, kind, needle):
    """Guarantee: a missing, truncated/corrupt, non-image (image extension) or non-2:1 panorama fails with one line
    naming the CSV, its line and the image; exit 2; no predictions written."""
    url = _bad_image(env["root"], kind)
    csv = write_csv(env["root"], [GOOD_ROW, f"{url},red box,a red box is ahead."])
    status, lines, out = generate(capsys, env, csv)
    assert_one_error(status, lines, "generate", str(csv), "line 3", Path(url).name, needle)
    assert_no_output(out)


def test_greyscale_rgba_16bit_palette_images_work(env, capsys):
    """Guarantee: greyscale (L), RGBA, 16-bit (I;16) and palette (P) panoramas are converted to RGB and used."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    images = {
        "grey": Image.fromarray(rgb[..., 0], mode="L"),
        "rgba": Image.fromarray(np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=2), mode="RGBA"),
        "sixteen": Image.fromarray(rgb[..., 1].astype(np.uint16) * 257),   # mode I;16
        "palette": Image.fromarray(rgb).convert("P"),
    }
    rows = []
    for name, img in images.items():
        img.save(env["root"] / "images" / f"{name}.png")
        assert Image.open(env["root"] / "images" / f"{name}.png").mode == img.mode
        rows.append(f"images/{name}.png,red box,a red box is ahead.")
    csv = write_csv(env["root"], rows)
    status, lines, out = generate(capsys, env, csv)
    assert (status, lines) == (0, [])
    predictions = (out / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + len(images)


# ------------------------------------------------------------------------------------------------ data: CSVs
CSV_CASES = {
    "missing_column": (["images/good.png,red box"], "url,query", ["missing required column", "annotation"]),
    "empty_csv": ([], "", ["is empty"]),
    "empty_annotation": ([GOOD_ROW, "images/good.png,red box,"], None, ["line 3", "empty 'annotation'"]),
    "duplicate_rows": ([GOOD_ROW, GOOD_ROW], None, ["line 3", "duplicate of line 2"]),
    "escapes_root": (["../outside.png,red box,a red box is ahead."], None, ["line 2", "outside the data root"]),
    "absolute_outside_root": (["/etc/hostname,red box,a red box is ahead."], None, ["line 2", "outside the data root"]),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_csv_is_one_error_naming_file_and_row(env, capsys, case):
    """Guarantee: a CSV missing a required column, empty, with an empty annotation, duplicate rows, or a url that
    escapes the data root (``../``, absolute) fails with one line naming the CSV (and line); exit 2; no output."""
    rows, header, needles = CSV_CASES[case]
    if case == "escapes_root":
        (env["root"].parent / "outside.png").write_bytes((env["root"] / "images" / "good.png").read_bytes())
    if case == "empty_csv":
        csv = env["root"] / "test.csv"
        csv.write_text("")
    else:
        csv = write_csv(env["root"], rows, **({"header": header} if header is not None else {}))
    status, lines, out = generate(capsys, env, csv)
    assert_one_error(status, lines, "generate", str(csv), *needles)
    assert_no_output(out)


def test_non_utf8_csv_is_one_error(env, capsys):
    """Guarantee: a CSV that is not UTF-8 fails with one line naming the file, the line and the byte."""
    csv = env["root"] / "test.csv"
    csv.write_bytes(b"url,query,annotation\nimages/good.png,red box,caf\xe9 ahead.\n")
    status, lines, out = generate(capsys, env, csv)
    assert_one_error(status, lines, "generate", str(csv), "not valid UTF-8", "line 2", "0xe9")
    assert_no_output(out)


def test_subprocess_prints_exactly_one_error_line(env):
    """Guarantee: the real ``python -m panobench`` process prints the error as exactly one stderr line (the last;
    everything else on stderr is timestamped log output), no traceback, and exits 2."""
    csv = write_csv(env["root"], ["images/good.png,red box"], header="url,query")
    out = env["tmp"] / "out"
    proc = subprocess.run([sys.executable, "-m", "panobench", "generate", "--config", str(env["cfg_path"]),
                           "--stage", "baseline", "--csv-input", str(csv), "--out", str(out)],
                          capture_output=True, text=True, cwd=env["workdir"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors == [lines[-1]]
    assert lines[-1].startswith("panobench generate: error: ") and str(csv) in lines[-1]
    assert_no_output(out)


# ------------------------------------------------------------------------------------------------ config
CONFIG_CASES = {
    "unknown_key": ({"geometry": {"overlapp": 0.5}}, ["unknown config key geometry.overlapp"]),
    "wrong_type": ({"stages": {"resampler": {"max_steps": "ten"}}}, ["stages.resampler.max_steps", "'ten'"]),
    "overlap_1": ({"geometry": {"overlap": 1.0}}, ["geometry.overlap", "outside [0, 1)"]),
    "overlap_negative": ({"geometry": {"overlap": -0.1}}, ["geometry.overlap", "outside [0, 1)"]),
    "fov_0": ({"geometry": {"fov": 0.0}}, ["geometry.fov", "outside (0, 180)"]),
    "fov_180": ({"geometry": {"fov": 180.0}}, ["geometry.fov", "outside (0, 180)"]),
    "unknown_resampler": ({"resampler": {"type": "transformerxl", "params": {}}}, ["unknown resampler",
                                                                                   "'transformerxl'"]),
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and v else v
    return out


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_run_config_is_one_error_naming_the_key(env, capsys, case):
    """Guarantee: a run config with an unknown key, a wrong type, overlap outside [0, 1), FOV outside (0, 180) or an
    unknown resampler fails ``panobench train`` with one line naming the key/value; exit 2; nothing is written."""
    change, needles = CONFIG_CASES[case]
    bad = env["tmp"] / "bad.yaml"
    bad.write_text(yaml.safe_dump(_merge(env["cfg"], change)))
    run_dir = env["tmp"] / "run"
    status, lines = cli(capsys, "train", "--config", str(bad), "--stage", "resampler", "--run-dir", str(run_dir))
    assert_one_error(status, lines, "train", *needles)
    assert_no_output(run_dir)


@pytest.mark.parametrize("case,change,needle", [
    ("unknown_key", {"matrix_typo": 1}, "matrix_typo"),
    ("unknown_resampler", {"matrix": {"resamplers": ["transformerxl"]}}, "transformerxl"),
])
def test_bad_workflow_config_fails_before_any_job(tmp_path, case, change, needle):
    """Guarantee: a workflow config with an unknown key (schema) or an unknown resampler (matrix expansion) stops
    Snakemake when the DAG is built, naming the key, before any job runs."""
    from reliability_helpers import copy_workflow

    workdir = copy_workflow(tmp_path / "wf")
    cfg = reliability_config()
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    configfile = write_config(workdir, cfg)
    proc = run_snakemake(workdir, "-n", "--configfile", configfile, check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    assert not any((workdir / d).exists() for d in ("data", "runs", "results", "resources"))


# ------------------------------------------------------------------------------------------------ --resume
def _vision_ckpt(env) -> Path:
    return env["workdir"] / stage_dir(Path("."), RECIPE, "vision") / "best.ckpt"


def _resume_case(env, case: str) -> tuple[Path, list[str]]:
    src = _vision_ckpt(env)
    path = env["tmp"] / f"{case}.ckpt"
    if case == "truncated":
        blob = src.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        return path, ["not a readable weights-only checkpoint"]
    if case == "not_a_checkpoint":
        path.write_text("model: resnet50\n")
        return path, ["not a readable weights-only checkpoint"]
    if case == "other_architecture":
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
        ckpt["panobench"]["model_signature"]["vision"]["arch"] = {"hidden_size": 1152, "num_hidden_layers": 27}
        torch.save(ckpt, path)
        return path, ["vision checkpoint was trained from", "1152"]
    if case == "other_shapes":
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
        key = next(k for k, v in ckpt["state_dict"].items() if k.startswith("model.vision") and v.dim() == 2)
        ckpt["state_dict"][key] = torch.zeros(3, 5)
        torch.save(ckpt, path)
        return path, [key, "(3, 5)"]
    if case == "stage2_checkpoint":
        shutil.copy(env["workdir"] / stage_dir(Path("."), CELL_A, "resampler") / "best.ckpt", path)
        return path, ["expected a stage-1 (vision) checkpoint", "'resampler'"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "not_a_checkpoint", "other_architecture", "other_shapes",
                                  "stage2_checkpoint"])
def test_bad_resume_checkpoint_is_one_error(env, capsys, case):
    """Guarantee: ``panobench train --stage resampler --resume X`` with X truncated, not a checkpoint, of another
    architecture (signature or tensor shapes) or of another stage fails with one line naming X; exit 2; no
    checkpoint or record is written."""
    path, needles = _resume_case(env, case)
    run_dir = env["tmp"] / "run"
    status, lines = cli(capsys, "train", "--config", str(env["cfg_path"]), "--stage", "resampler",
                        "--resume", str(path), "--run-dir", str(run_dir))
    assert_one_error(status, lines, "train", str(path), *needles)
    assert_no_output(run_dir)
