"""Static checks of the container recipe: containers/panobench.def and the steps of containers/install.sh.

The GPU image cannot be built on the project's machines (no Apptainer, no CUDA base image, no GPU), so its recipe is
checked here: the definition is parsed (tests/container/apptainer_deffile.py), and install.sh's steps are read from
its ``--dry-run`` plan, which runs the script's own option handling and branching and prints every command it would
run. tests/container/ executes the same script in CPU mode and checks that the executed steps equal the CPU plan.
The checks tie the image to the project: pins consistent with pyproject.toml, fused Mamba kernels built against the
image's torch, Java and SPICE's CoreNLP jars present, a writable temp dir.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINER_TESTS = REPO_ROOT / "tests" / "container"
REQUIRED_SECTIONS = ("post", "environment", "test", "files", "labels", "help")
CONSTRAINTS = "/opt/constraints.txt"


def _load(name: str):
    """A module of tests/container (the parser and the CI builder share it with these checks), by its own name."""
    if str(CONTAINER_TESTS) not in sys.path:
        sys.path.insert(0, str(CONTAINER_TESTS))
    return importlib.import_module(name)


DEFFILE = _load("apptainer_deffile")
parse_def, shell_commands, DefFile = DEFFILE.parse_def, DEFFILE.shell_commands, DEFFILE.DefFile


@dataclass(frozen=True)
class Step:
    """One printed step of install.sh: ``env`` assignments of an ``env VAR=... cmd`` prefix, then the command."""

    env: dict[str, str]
    argv: list[str]

    @property
    def is_pip_install(self) -> bool:
        return self.argv[1:4] == ["-m", "pip", "install"]


def install_plan(*args: str) -> list[Step]:
    """install.sh's steps for ``args``, from ``--dry-run`` (nothing is executed)."""
    out = subprocess.run(["bash", str(DEFFILE.INSTALL_SCRIPT), *args, "--dry-run"], capture_output=True, text=True,
                         check=True).stdout
    steps = []
    for line in out.splitlines():
        assert line.startswith("+ "), line
        argv = shlex.split(line[2:])
        env: dict[str, str] = {}
        if argv[0] == "env":
            argv = argv[1:]
            while "=" in argv[0]:
                key, value = argv.pop(0).split("=", 1)
                env[key] = value
        steps.append(Step(env, argv))
    return steps


def pip_installs(plan: list[Step]) -> list[Step]:
    return [s for s in plan if s.is_pip_install]


def installed(step: Step, package: str) -> str | None:
    """The version ``step`` pins ``package`` to (``package==X``), or None."""
    for arg in step.argv:
        if arg.startswith(f"{package}=="):
            return arg.split("==", 1)[1]
    return None


def pinned(plan: list[Step], package: str) -> Version:
    versions = [v for s in pip_installs(plan) if (v := installed(s, package))]
    assert len(versions) == 1, f"expected one `pip install {package}==<version>`, got {versions}"
    return Version(versions[0])


def check_mamba_builds(plan: list[Step]) -> None:
    """The fused-kernel packages are compiled against the image's torch, with their build switches set."""
    installs = pip_installs(plan)
    torch_at = next(i for i, s in enumerate(installs) if installed(s, "torch"))
    for package in ("causal-conv1d", "mamba-ssm"):
        at = next((i for i, s in enumerate(installs) if installed(s, package)), None)
        assert at is not None, f"install.sh never pip-installs {package}"
        assert "--no-build-isolation" in installs[at].argv, f"{package} built without --no-build-isolation"
        assert at > torch_at, f"{package} is built before torch is installed"
        env = installs[at].env
        assert env.get("MAMBA_FORCE_BUILD") == "TRUE" and env.get("CAUSAL_CONV1D_FORCE_BUILD") == "TRUE", env
        assert env.get("TORCH_CUDA_ARCH_LIST") and env.get("MAX_JOBS"), env


@pytest.fixture(scope="module")
def defn() -> DefFile:
    return DEFFILE.load_def()


@pytest.fixture(scope="module")
def gpu_plan(defn: DefFile) -> list[Step]:
    """The steps %post runs: its one command is `bash install.sh --mode gpu` (test_post_only_runs_install_sh)."""
    return install_plan("--mode", "gpu")


@pytest.fixture(scope="module")
def cpu_plan() -> list[Step]:
    return install_plan("--mode", "cpu")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _requirement(pyproject: dict, name: str, extra: str | None = None) -> Requirement:
    deps = pyproject["project"]["optional-dependencies"][extra] if extra else pyproject["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == name)


def test_parser_splits_header_and_sections() -> None:
    parsed = parse_def("Bootstrap: docker\n# a comment\nFrom: x:1\n\n%post\n  a \\\n  b\n# c\n%test\n  t\n")
    assert parsed.header == {"Bootstrap": "docker", "From": "x:1"}
    assert set(parsed.sections) == {"post", "test"}
    assert shell_commands(parsed.sections["post"]) == ["a b"]
    assert parsed.script("test") == "t\n"
    with pytest.raises(ValueError, match="appears twice"):
        parse_def("Bootstrap: docker\n%post\n%post\n")
    with pytest.raises(ValueError, match="Key: value"):
        parse_def("Bootstrap docker\n")


def test_required_sections_present(defn: DefFile) -> None:
    assert set(REQUIRED_SECTIONS) <= set(defn.sections)
    assert all(defn.sections[name].strip() for name in REQUIRED_SECTIONS)


def test_cuda_devel_base_image(defn: DefFile) -> None:
    assert defn.header["Bootstrap"] == "docker"
    # nvcc (devel) is needed to compile mamba-ssm / causal-conv1d; runtime images lack it.
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn-)?devel-ubuntu\d+\.\d+", defn.header["From"])


def test_post_only_runs_install_sh(defn: DefFile) -> None:
    """%post is one call of install.sh (copied by %files) in GPU mode: CI's CPU build then runs all of %post."""
    files = dict(defn.files())
    assert files.get("containers/install.sh") == "/opt/panobench/containers/install.sh", files
    assert shell_commands(defn.sections["post"]) == ["bash /opt/panobench/containers/install.sh --mode gpu"]
    builder = _load("rootfs_builder")
    assert builder.install_command(defn)[1:3] == ["/opt/panobench/containers/install.sh", "--mode"]
    broken = DefFile(defn.header, {**defn.sections, "post": defn.sections["post"] + "\n    pip install extra\n"})
    with pytest.raises(builder.BuildError, match="%post must be exactly"):
        builder.install_command(broken)


def test_install_script_rejects_bad_arguments() -> None:
    for args in ([], ["--mode", "tpu"], ["--mode", "cpu", "--bogus"]):
        proc = subprocess.run(["bash", str(DEFFILE.INSTALL_SCRIPT), *args, "--dry-run"], capture_output=True,
                              text=True)
        assert proc.returncode == 2 and "usage:" in proc.stderr, (args, proc.stderr)


def test_torch_pin_satisfies_pyproject_and_matches_base_cuda(defn: DefFile, gpu_plan: list[Step],
                                                             pyproject: dict) -> None:
    torch_version = pinned(gpu_plan, "torch")
    assert _requirement(pyproject, "torch").specifier.contains(torch_version)
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", defn.header["From"])
    torch_install = next(s for s in pip_installs(gpu_plan) if installed(s, "torch"))
    index = torch_install.argv[torch_install.argv.index("--index-url") + 1]
    assert index == f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}", "torch not from the base image's CUDA"
    # Later installs must not swap torch for another build: the constraints file pins it.
    assert ["write", CONSTRAINTS, f"torch=={torch_version}"] in [s.argv for s in gpu_plan]
    later = pip_installs(gpu_plan)[pip_installs(gpu_plan).index(torch_install) + 1 :]
    assert later and all(s.argv[s.argv.index("-c") + 1] == CONSTRAINTS for s in later), later


def test_fused_kernel_pins_satisfy_gpu_extra(gpu_plan: list[Step], pyproject: dict) -> None:
    for package in ("mamba-ssm", "causal-conv1d"):
        assert _requirement(pyproject, package, "gpu").specifier.contains(pinned(gpu_plan, package)), package


def test_mamba_kernels_built_without_build_isolation(gpu_plan: list[Step]) -> None:
    check_mamba_builds(gpu_plan)


def test_mamba_build_check_catches_isolated_build(gpu_plan: list[Step]) -> None:
    broken = [Step(s.env, [a for a in s.argv if a != "--no-build-isolation"]) if installed(s, "mamba-ssm") else s
              for s in gpu_plan]
    with pytest.raises(AssertionError, match="without --no-build-isolation"):
        check_mamba_builds(broken)


def test_cpu_mode_builds_no_cuda_extension(cpu_plan: list[Step], pyproject: dict) -> None:
    assert pinned(cpu_plan, "torch") == Version("2.13.0+cpu")
    assert _requirement(pyproject, "torch").specifier.contains(Version("2.13.0"))
    torch_install = next(s for s in pip_installs(cpu_plan) if installed(s, "torch"))
    assert torch_install.argv[torch_install.argv.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    text = " ".join(" ".join(s.argv) for s in cpu_plan)
    for absent in ("mamba-ssm", "causal-conv1d", "--no-build-isolation", "build-essential", "python3-dev", "ninja"):
        assert absent not in text, absent
    # The CPU image's torch is the one the README's quick start and CI install.
    assert "pip install torch==2.13.0 " in (REPO_ROOT / "README.md").read_text()
    assert "pip install --quiet torch==2.13.0\n" in (REPO_ROOT / ".ci" / "run").read_text()
    ci_torch = next(s for s in pip_installs(install_plan("--mode", "cpu", "--torch-index", "none"))
                    if installed(s, "torch"))
    assert "--index-url" not in ci_torch.argv  # "none": the build machine's own pip settings


def test_project_installed_with_all_its_dependencies(defn: DefFile, gpu_plan: list[Step], cpu_plan: list[Step],
                                                     pyproject: dict) -> None:
    # Every pyproject dependency reaches the image by pip-installing the project itself (copied via %files).
    files = dict(defn.files())
    dest = files.get("src", "").removesuffix("/src")
    assert dest == "/opt/panobench" and files.get("pyproject.toml") == f"{dest}/pyproject.toml", files
    assert files.get(pyproject["project"]["readme"]) == f"{dest}/{pyproject['project']['readme']}"
    for plan, want in ((gpu_plan, {"workflow", "gpu"}), (cpu_plan, {"workflow"})):
        project = [s for s in pip_installs(plan) if any(a.startswith(f"{dest}[") for a in s.argv)]
        assert len(project) == 1, [s.argv for s in pip_installs(plan)]
        extras = set(re.search(rf"{re.escape(dest)}\[([\w,]+)\]", " ".join(project[0].argv))[1].split(","))
        assert extras == want and extras <= set(pyproject["project"]["optional-dependencies"])
        assert "-e" not in project[0].argv  # an editable install would point into %files' copy only


def test_files_sources_exist_in_repo(defn: DefFile) -> None:
    # `apptainer build` (run from the repo root) fails on a missing %files source; pip needs the readme.
    missing = [src for src, _ in defn.files() if not (REPO_ROOT / src).exists()]
    assert not missing, f"%files copies {missing}, which the repo lacks"


def test_java_installed(defn: DefFile, gpu_plan: list[Step], cpu_plan: list[Step]) -> None:
    for plan in (gpu_plan, cpu_plan):
        apt = [s.argv for s in plan if s.argv[:2] == ["apt-get", "install"]]
        assert len(apt) == 1 and "default-jre-headless" in apt[0], apt
    assert "java -version" in defn.sections["test"]


def test_corenlp_jars_fetched_at_build_time(defn: DefFile, gpu_plan: list[Step]) -> None:
    # Same archive and jar names as pycocoevalcap's own downloader, which would otherwise run mid-job.
    from pycocoevalcap.spice import get_stanford_models as gsm

    wget = [s.argv for s in gpu_plan if s.argv[0] == "wget"]
    assert len(wget) == 1 and wget[0][-1] == f"https://nlp.stanford.edu/software/{gsm.CORENLP}.zip", wget
    unzip = next(s.argv for s in gpu_plan if s.argv[:2] == ["unzip", "-q"])
    for jar in (f"{gsm.JAR}.jar", f"{gsm.JAR}-models.jar"):
        assert f"{gsm.CORENLP}/{jar}" in unzip, jar
    # Into pycocoevalcap's spice/lib, where panobench's find_spice_jars looks.
    assert unzip[unzip.index("-d") + 1] == "<pycocoevalcap>/spice/lib"
    assert 'pycocoevalcap_dir() / "spice/lib"' in DEFFILE.INSTALL_SCRIPT.read_text()
    assert "find_spice_jars" in defn.sections["test"]
    assert not [s for s in install_plan("--mode", "gpu", "--without-spice-jars") if s.argv[0] in ("wget", "unzip")]


def test_test_section_checks_what_install_sh_built(defn: DefFile, gpu_plan: list[Step], cpu_plan: list[Step]) -> None:
    imported = set(re.findall(r"^\s*import (\w+)", defn.sections["test"], re.M))
    assert {"torch", "panobench", "selective_scan_cuda", "causal_conv1d_cuda"} <= imported
    # %test reads the build-info install.sh writes: the mode, the torch pin, whether SPICE's jars are in.
    assert ["write", "/opt/panobench/build-info", "mode=gpu", "torch=2.8.0", "spice_jars=1"] in [s.argv for s in gpu_plan]
    assert ["write", "/opt/panobench/build-info", "mode=cpu", "torch=2.13.0+cpu", "spice_jars=1"] in [
        s.argv for s in cpu_plan]
    assert "python - /opt/panobench/build-info <<'PY'" in defn.sections["test"]


def test_environment_gives_writable_tmpdir_and_leaves_hf_offline_to_caller(defn: DefFile) -> None:
    env = shell_commands(defn.sections["environment"])
    assert 'export TMPDIR="${TMPDIR:-/tmp}"' in env  # keep the job's TMPDIR; /tmp is bound writable
    assert "export PYTHONNOUSERSITE=1" in env  # $HOME's ~/.local must not shadow the image's packages
    assert any(c.startswith('export PATH="/opt/venv/bin:') for c in env)
    assert not any("HF_HUB_OFFLINE" in c for c in env)  # documented decision: set by the caller
