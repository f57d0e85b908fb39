"""Security: checkpoints never unpickle code, YAML never builds objects, config strings never reach a shell
unquoted, CSV image paths stay inside the data root, and the workflow writes only where it is configured to."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from reliability_helpers import (
    CELL_A,
    OUTPUT_DIRS,
    REPO,
    all_files,
    copy_workflow,
    reliability_config,
    run_snakemake,
    write_config,
)
from reliability_helpers import stage_dir as run_stage_dir

from panobench.cli import main

SRC = REPO / "src" / "panobench"


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _calls(text: str, name: str) -> list[str]:
    """Every ``name(...)`` call in ``text`` with its balanced argument list (calls may span lines)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.start():i])
    return out


def test_every_torch_load_is_weights_only():
    """Guarantee: every checkpoint load in src/ is ``torch.load(..., weights_only=True)`` (or safetensors): no code
    path can unpickle arbitrary objects; Lightning's resume is called with ``weights_only=True`` too."""
    loads, fits = [], []
    for path in _sources():
        text = path.read_text()
        loads += [(path, c) for c in _calls(text, "torch.load")]
        fits += [(path, c) for c in _calls(text, ".fit")]
        assert "pickle.load" not in text and "dill" not in text, path
    assert loads, "no torch.load found: the scan is broken"
    unsafe = [f"{p.relative_to(REPO)}: {c}" for p, c in loads if "weights_only=True" not in c]
    assert not unsafe, unsafe
    resumes = [(p, c) for p, c in fits if "ckpt_path" in c]
    assert resumes and all("weights_only=True" in c for _, c in resumes), resumes


def test_yaml_is_only_safe_loaded():
    """Guarantee: YAML is read with ``yaml.safe_load`` only (no ``yaml.load``, ``unsafe_load``, custom ``Loader=``)."""
    offenders = []
    for path in [*_sources(), REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        text = path.read_text()
        for pattern in (r"\byaml\.load\(", r"unsafe_load", r"Loader\s*=", r"yaml\.full_load", r"yaml\.load_all\("):
            offenders += [f"{path.relative_to(REPO)}: {pattern}" for _ in re.finditer(pattern, text)]
    assert not offenders, offenders


class _Payload:
    """Unpickling this calls ``open(path, "w")``: the file appears iff the payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"state_dict": {}, "panobench": {"stage": "vision"}, "payload": _Payload(marker)}, path)
    return path


def test_pickle_payload_checkpoint_is_refused_by_train_and_eval(reference_run, tmp_path, monkeypatch, capsys):
    """Guarantee: a checkpoint carrying a pickle payload, given to ``panobench train --resume``, ``panobench eval`` or
    ``panobench generate --checkpoint``, is refused (exit 2, one line naming the file) and the payload never runs."""
    import torch

    monkeypatch.chdir(reference_run.workdir)
    marker = tmp_path / "payload-ran"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    cfg = f"results/small/configs/{CELL_A}.yaml"

    # a run directory (real config + metadata) whose best.ckpt is the hostile file
    run_dir = tmp_path / "rundir"
    shutil.copytree(reference_run.workdir / run_stage_dir(Path("."), CELL_A, "resampler"), run_dir,
                    ignore=shutil.ignore_patterns("*.ckpt", "eval", "logs"))
    shutil.copy(evil, run_dir / "best.ckpt")
    commands = [
        ("train", ["train", "--config", cfg, "--stage", "resampler", "--resume", str(evil),
                   "--run-dir", str(tmp_path / "train")], str(evil)),
        ("eval", ["eval", "--checkpoint-dir", str(run_dir), "--out", str(tmp_path / "eval"), "--spice", "off"],
         str(run_dir / "best.ckpt")),
        ("generate", ["generate", "--config", cfg, "--stage", "resampler", "--checkpoint", str(evil),
                      "--out", str(tmp_path / "gen")], str(evil)),
    ]
    for command, argv, named in commands:
        capsys.readouterr()
        assert main(argv) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("panobench ")]
        assert len(lines) == 1 and lines[0].startswith(f"panobench {command}: error: ") and named in lines[0], lines
        assert not marker.exists(), f"payload ran during {command}"
    assert not (tmp_path / "eval").exists() and not (tmp_path / "gen").exists()
    # control: the payload is real — an unsafe load runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()


INJECT = "; touch pwned_{tag} #"


@pytest.mark.parametrize("where", ["resampler", "vision_checkpoint_name", "config_name"])
def test_shell_metacharacters_in_names_are_rejected_by_the_schema(tmp_path, where):
    """Guarantee: a resampler, vision-checkpoint or config name containing ``; touch pwned`` is rejected when the
    workflow config is validated (names become file names and wildcards), and no command runs."""
    workdir = copy_workflow(tmp_path / "wf")
    cfg = reliability_config()
    bad = "mlp" + INJECT.format(tag=where)
    if where == "resampler":
        cfg["matrix"]["resamplers"] = [bad]
    elif where == "vision_checkpoint_name":
        cfg["matrix"]["vision_checkpoints"][0]["name"] = bad
    else:
        cfg["name"] = bad
    configfile = write_config(workdir, cfg)
    proc = run_snakemake(workdir, "--cores", "1", "--configfile", configfile, check=False)
    assert proc.returncode != 0
    assert "does not match" in proc.stdout + proc.stderr
    assert not [p for p in workdir.rglob("pwned*")]
    assert not any((workdir / d).exists() for d in ("data", "runs", "results", "resources"))


def test_free_form_config_strings_are_quoted_in_every_shell_command(tmp_path):
    """Guarantee: free-form config strings that reach shell commands (runs_dir, synthetic/tiny-model output dirs,
    the data root, a vision checkpoint path, the prompt) are quoted: real jobs run and the error handler
    (``onerror``) runs, and no injected command executes."""
    workdir = copy_workflow(tmp_path / "wf")
    marker = tmp_path / "pwned_abs"
    payloads = {k: f"x; touch {marker} ; touch pwned_{k} $(touch pwned_sub_{k}) `touch pwned_bt_{k}`"
                for k in ("runs", "synth", "tiny", "root", "ckpt", "prompt")}
    cfg = reliability_config()
    cfg["runs_dir"] = "runs/" + payloads["runs"]
    data = "data/" + payloads["synth"]
    cfg["synthetic"] = {**cfg["synthetic"], "out": data, "width": 100}   # synth_data then fails (not 2:1)
    cfg["tiny_models"] = {**cfg["tiny_models"], "out": "resources/" + payloads["tiny"]}
    cfg["run"]["data"] = {**cfg["run"]["data"], "root": data, "train_csv": f"{data}/train.csv",
                          "valid_csv": f"{data}/valid.csv", "test_csv": f"{data}/test.csv"}
    cfg["run"]["prompt_instruction"] = "Describe the {query}. " + payloads["prompt"]
    ckpt = workdir / "resources" / payloads["ckpt"]
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    cfg["matrix"]["vision_checkpoints"].append({"name": "given", "path": str(ckpt.relative_to(workdir))})
    configfile = write_config(workdir, cfg)
    # The cells' configs are written when the DAG is built (no job); plan_matrix runs and the onerror handler runs.
    targets = ["results/small/manifest.json", f"{data}/summary.json"]
    proc = run_snakemake(workdir, *targets, "--cores", "2", "--keep-going", "--configfile", configfile,
                         check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0                                   # synth_data fails (width != 2 x height) ...
    assert (workdir / "results/small/manifest.json").is_file()    # ... while the quoted jobs ran
    assert (workdir / f"results/small/configs/{CELL_A}.yaml").is_file()   # the payloads kept verbatim (below)
    assert list((workdir / "logs/small").glob("partial_report.log")), out[-3000:]   # the onerror handler ran
    resolved = yaml.safe_load((workdir / f"results/small/configs/{CELL_A}.yaml").read_text())
    assert resolved["runs_dir"] == cfg["runs_dir"] and resolved["data"]["root"] == cfg["run"]["data"]["root"]
    assert not marker.exists()
    created = {f"pwned{kind}_{k}" for k in payloads for kind in ("", "_sub", "_bt")}   # what the payloads touch
    ran = [p for p in workdir.rglob("*") if p.name in created]
    assert not ran, ran


def test_workflow_writes_only_inside_its_output_dirs(reference_run):
    """Guarantee: a full workflow run writes files only under data/, resources/, results/, runs/, logs/,
    benchmarks/, reports/ and .snakemake/ of the working directory (nothing beside the checkout's files, no
    stray lightning_logs/, no temp files left in the output folders)."""
    new = all_files(reference_run.workdir) - reference_run.before
    assert new, "the reference run wrote nothing?"
    outside = sorted(str(p) for p in new if p.parts[0] not in OUTPUT_DIRS)
    assert not outside, outside
    leftovers = sorted(str(p) for p in new if p.parts[0] != ".snakemake" and
                       (p.name.startswith(".") or p.suffix in (".tmp", ".partial"))
                       and p.name != ".snakemake_timestamp")   # Snakemake's own marker in directory() outputs
    assert not leftovers, leftovers
    changed = [p for p in reference_run.before if p.parts[0] not in OUTPUT_DIRS and
               not (reference_run.workdir / p).is_file()]
    assert not changed, changed

