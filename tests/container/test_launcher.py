"""The bubblewrap launcher understands exactly the command lines Snakemake builds for Apptainer, and nothing else.

Fast checks without bubblewrap: Snakemake's own ``shellcmd`` (``snakemake/deployment/singularity.py``) produces
the command line, the launcher parses it; the mount plan is computed on a small fake image. That the plan works
is shown by tests/container/test_container_image.py, which runs the workflow through it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path, PurePosixPath

import pytest
from apptainer_launcher import (
    LOG_ENV,
    Bind,
    LauncherError,
    check_image,
    container_env,
    parse_args,
    root_ops,
    underlay_dirs,
)
from snakemake.deployment import singularity

LAUNCHER_DIR = Path(__file__).resolve().parent / "bin"


def snakemake_job_argv(monkeypatch: pytest.MonkeyPatch, cwd: Path, image: str, **kwargs) -> list[str]:
    """The argv Snakemake's job shell runs for a containerized job, as the launcher receives it."""
    monkeypatch.chdir(cwd)
    # Snakemake's check() sets the binary it found on PATH; without it shellcmd falls back to "singularity".
    monkeypatch.setattr(singularity.Singularity(), "binary", "apptainer")
    line = singularity.shellcmd(image, "set -euo pipefail; panobench score --out 'a b.json'",
                                shell_executable="/bin/bash", **kwargs)
    argv = shlex.split(line)
    assert argv[0] == "apptainer", line
    return argv[1:]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A fake sandbox: the layout of a Debian root filesystem (merged /usr) with Apptainer's metadata dir."""
    root = tmp_path / "image"
    for d in ("usr/bin", "etc", "root", "tmp", "var/tmp", "opt/venv", "dev", "proc", "sys", ".singularity.d/env"):
        (root / d).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "root" / ".profile").write_text("")
    (root / "root").chmod(0o700)
    return root


def test_parses_snakemake_job_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, image: Path) -> None:
    storage = tmp_path / "work" / ".snakemake" / "storage"
    storage.mkdir(parents=True)
    argv = snakemake_job_argv(monkeypatch, tmp_path / "work", str(image), bind=[storage, tmp_path / "absent"])
    inv = parse_args(argv)
    assert inv.action == "exec" and inv.image == str(image)
    assert inv.home == Bind(str(tmp_path / "work"), str(tmp_path / "work"))  # --home CWD: dest = src
    assert inv.binds == [Bind(str(storage), str(storage))]  # Snakemake drops binds of absent paths itself
    assert inv.command == ["bash", "-c", "set -euo pipefail; panobench score --out 'a b.json'"]
    assert inv.pwd is None and not inv.quiet


def test_parses_quiet_shadow_and_script_binds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, image: Path) -> None:
    (tmp_path / "work").mkdir()
    argv = snakemake_job_argv(monkeypatch, tmp_path / "work", str(image), quiet=True,
                              container_workdir=tmp_path / "work" / "shadow", is_python_script=True)
    inv = parse_args(argv)
    assert inv.quiet and inv.pwd == str(tmp_path / "work" / "shadow")
    # script: rules bind Snakemake's search paths as 'src':'/mnt/snakemake_searchpaths/item_i'
    assert inv.binds and all(b.dest.startswith("/mnt/snakemake_searchpaths/item_") for b in inv.binds)
    assert all(b.src != b.dest and not b.read_only for b in inv.binds)


def test_version_answers_snakemake_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snakemake's own check finds tests/container/bin/apptainer on PATH and accepts its version."""
    monkeypatch.setenv("PATH", f"{LAUNCHER_DIR}:{os.environ['PATH']}")
    found = singularity.Singularity()
    for name, value in (("checked", False), ("binary", None), ("_version", None)):
        monkeypatch.setattr(found, name, value)
    found.check()
    assert found.binary == "apptainer" and found.version.strip() == "apptainer version 1.3.4"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pull", "--name", "x.simg", "docker://ubuntu"], "unsupported command 'pull'"),
        (["build", "x.sif", "x.def"], "unsupported command 'build'"),
        (["exec", "--home", "/tmp", "--nv", "IMG", "bash"], "GPU options such as --nv"),
        (["exec", "--contain", "IMG", "bash"], "unsupported exec option '--contain'"),
        (["--debug", "exec", "IMG", "bash"], "unsupported global option '--debug'"),
        (["exec", "--bind", "/tmp:/x:nosuid", "IMG", "bash"], "only 'ro' and 'rw'"),
        (["exec", "IMG"], "no command given"),
        (["test", "IMG", "extra"], "takes only the image"),
    ],
)
def test_refuses_what_snakemake_does_not_send(argv: list[str], message: str) -> None:
    with pytest.raises(LauncherError, match=message):
        parse_args(argv)


def test_refuses_remote_and_sif_images(tmp_path: Path, image: Path) -> None:
    with pytest.raises(LauncherError, match="Snakemake would `apptainer pull` it"):
        check_image("docker://nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04")
    (tmp_path / "panobench.sif").write_bytes(b"SIF")
    with pytest.raises(LauncherError, match="need the real Apptainer"):
        check_image(str(tmp_path / "panobench.sif"))
    with pytest.raises(LauncherError, match="not an Apptainer sandbox"):
        check_image(str(tmp_path))
    assert check_image(str(image)) == image


def test_underlay_only_where_a_destination_is_missing(image: Path) -> None:
    need = underlay_dirs(image, ["/dev", "/tmp", "/tmp/pytest/work", "/etc/hosts", "/root/.cache/snakemake/sc"])
    # /tmp/pytest/work lies under the /tmp bind; /etc/hosts exists; /root lacks .cache: only / and /root rebuilt.
    assert need == {PurePosixPath("/"), PurePosixPath("/root")}
    assert underlay_dirs(image, ["/work/x"]) == {PurePosixPath("/")}
    with pytest.raises(LauncherError, match="symlink /bin"):
        underlay_dirs(image, ["/bin/extra"])


def test_root_ops_mirror_image_read_only(image: Path) -> None:
    ops = root_ops(image, {PurePosixPath("/"), PurePosixPath("/root")})
    triples = {tuple(ops[i : i + 3]) for i in range(len(ops) - 2)}
    assert ("--symlink", "usr/bin", "/bin") in triples
    assert ("--ro-bind", str(image / "usr"), "/usr") in triples
    assert ("--perms", "0700", "--dir") in triples and "/root" in ops
    assert ("--ro-bind", str(image / "root" / ".profile"), "/root/.profile") in triples
    assert "--bind" not in ops  # nothing of the image is writable


def test_environment_follows_apptainer(monkeypatch: pytest.MonkeyPatch, image: Path) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/host/lib")
    monkeypatch.setenv("APPTAINER_BIND", "/x")
    monkeypatch.setenv("APPTAINERENV_FOO", "bar")
    monkeypatch.setenv("SINGULARITYENV_BAZ", "qux")
    monkeypatch.setenv(LOG_ENV, "/tmp/log.jsonl")
    inv = parse_args(["exec", str(image), "true"])
    env = container_env(inv, "/home/u", image)
    assert env["OMP_NUM_THREADS"] == "1" and env["FOO"] == "bar" and env["BAZ"] == "qux"
    assert env["HOME"] == "/home/u" and env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["APPTAINER_CONTAINER"] == str(image)
    assert not {"LD_LIBRARY_PATH", "APPTAINER_BIND", "APPTAINERENV_FOO", LOG_ENV} & set(env)
