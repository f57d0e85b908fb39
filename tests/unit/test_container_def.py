"""Static checks of containers/panobench.def (no Apptainer on the project's machines, SPEC §7).

A small parser splits the definition into header keys (``Bootstrap``, ``From``) and ``%section`` blocks;
the checks then tie the image to the project: pins consistent with pyproject.toml, fused Mamba kernels
built against the image's torch, Java and SPICE's CoreNLP jars present, a writable temp dir.
"""

from __future__ import annotations

import re
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
DEF_PATH = REPO_ROOT / "containers" / "panobench.def"
REQUIRED_SECTIONS = ("post", "environment", "test", "files", "labels", "help")
SECTION_LINE = re.compile(r"^%(\w+)\b(.*)$")


@dataclass(frozen=True)
class DefFile:
    """A parsed Apptainer definition: ``header`` keys and the raw text of each ``%section``."""

    header: dict[str, str]
    sections: dict[str, str]


def parse_def(text: str) -> DefFile:
    """Parse an Apptainer definition file.

    Raises:
        ValueError: a header line is not ``Key: value``, or a section appears twice.
    """
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        match = SECTION_LINE.match(line)
        if match:
            name = match[1]
            if name in sections:
                raise ValueError(f"line {lineno}: section %{name} appears twice")
            current = sections[name] = []
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            if not sep or not key.strip():
                raise ValueError(f"line {lineno}: header line is not 'Key: value': {line!r}")
            header[key.strip()] = value.strip()
    return DefFile(header, {name: "\n".join(lines) for name, lines in sections.items()})


def shell_commands(script: str) -> list[str]:
    """Logical shell lines of a section: comments dropped, backslash continuations joined."""
    commands, pending = [], ""
    for raw in script.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(" ".join((pending + line).split()))
        pending = ""
    return commands


def pip_installs(defn: DefFile) -> list[str]:
    """The ``pip install`` commands of %post, in order."""
    return [c for c in shell_commands(defn.sections["post"]) if re.search(r"\bpip install\b", c)]


def pinned(defn: DefFile, package: str) -> Version:
    """The version a ``pip install`` in %post pins ``package`` to (``package==X`` or ``package==${VAR}``)."""
    post = defn.sections["post"]
    for command in pip_installs(defn):
        match = re.search(rf"(?<![\w-]){re.escape(package)}==(\$\{{?(\w+)\}}?|[\w.+]+)", command)
        if match:
            if match[2]:  # pinned through a shell variable set earlier in %post
                value = re.search(rf"^\s*(?:export\s+)?{match[2]}=[\"']?([\w.+]+)", post, re.M)
                assert value, f"{package} pinned via ${match[2]}, which %post never sets"
                return Version(value[1])
            return Version(match[1])
    raise AssertionError(f"no `pip install {package}==<version>` in %post")


def check_mamba_builds(defn: DefFile) -> None:
    """The fused-kernel packages are compiled against the image's torch, with their build switches set."""
    installs = pip_installs(defn)
    torch_at = next(i for i, c in enumerate(installs) if re.search(r"\btorch==", c))
    for package in ("causal-conv1d", "mamba-ssm"):
        at = next((i for i, c in enumerate(installs) if re.search(rf"(?<![\w-]){package}==", c)), None)
        assert at is not None, f"%post never pip-installs {package}"
        assert "--no-build-isolation" in installs[at].split(), f"{package} built without --no-build-isolation"
        assert at > torch_at, f"{package} is built before torch is installed"
    post = defn.sections["post"]
    for var in ("MAMBA_FORCE_BUILD=TRUE", "CAUSAL_CONV1D_FORCE_BUILD=TRUE", "TORCH_CUDA_ARCH_LIST=", "MAX_JOBS="):
        assert re.search(rf"^\s*export {re.escape(var)}", post, re.M), f"%post does not export {var}"


@pytest.fixture(scope="module")
def defn() -> DefFile:
    return parse_def(DEF_PATH.read_text())


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


def test_torch_pin_satisfies_pyproject_and_matches_base_cuda(defn: DefFile, pyproject: dict) -> None:
    torch_version = pinned(defn, "torch")
    assert _requirement(pyproject, "torch").specifier.contains(torch_version)
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", defn.header["From"])
    index = f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}"
    torch_install = next(c for c in pip_installs(defn) if re.search(r"\btorch==", c))
    assert index in torch_install, f"torch not installed from {index} (the base image's CUDA)"
    # Later installs must not swap torch for another build.
    assert re.search(rf"torch==\$\{{?TORCH_VERSION\}}?|torch=={torch_version}", defn.sections["post"])
    later = pip_installs(defn)[pip_installs(defn).index(torch_install) + 1 :]
    assert later and all(" -c /opt/constraints.txt" in c for c in later), later


def test_fused_kernel_pins_satisfy_gpu_extra(defn: DefFile, pyproject: dict) -> None:
    for package in ("mamba-ssm", "causal-conv1d"):
        assert _requirement(pyproject, package, "gpu").specifier.contains(pinned(defn, package)), package


def test_mamba_kernels_built_without_build_isolation(defn: DefFile) -> None:
    check_mamba_builds(defn)


def test_mamba_build_check_catches_isolated_build(defn: DefFile) -> None:
    broken = DefFile(
        defn.header,
        {**defn.sections, "post": defn.sections["post"].replace("--no-build-isolation -c", "-c", 1)},
    )
    with pytest.raises(AssertionError, match="without --no-build-isolation"):
        check_mamba_builds(broken)


def test_project_installed_with_all_its_dependencies(defn: DefFile, pyproject: dict) -> None:
    # Every pyproject dependency reaches the image by pip-installing the project itself (copied via %files).
    files = dict(line.split() for line in shell_commands(defn.sections["files"]))
    dest = files.get("src", "").removesuffix("/src")
    assert dest and files.get("pyproject.toml") == f"{dest}/pyproject.toml", files
    assert files.get(pyproject["project"]["readme"]) == f"{dest}/{pyproject['project']['readme']}"
    project_install = [c for c in pip_installs(defn) if f'"{dest}[' in c or f"{dest}[" in c]
    assert len(project_install) == 1, pip_installs(defn)
    extras = set(re.search(rf"{re.escape(dest)}\[([\w,]+)\]", project_install[0])[1].split(","))
    assert {"workflow", "gpu"} <= extras <= set(pyproject["project"]["optional-dependencies"])
    assert "-e" not in project_install[0].split()  # an editable install would point into %files' copy only


def test_files_sources_exist_in_repo(defn: DefFile) -> None:
    # `apptainer build` (run from the repo root) fails on a missing %files source; pip needs the readme.
    sources = [line.split()[0] for line in shell_commands(defn.sections["files"])]
    missing = [s for s in sources if not (REPO_ROOT / s).exists()]
    assert not missing, f"%files copies {missing}, which the repo lacks"


def test_java_installed(defn: DefFile) -> None:
    apt = [c for c in shell_commands(defn.sections["post"]) if "apt-get install" in c]
    assert any("default-jre-headless" in c.split() for c in apt), apt
    assert "java -version" in defn.sections["test"]


def test_corenlp_jars_fetched_at_build_time(defn: DefFile) -> None:
    # Same archive and jar names as pycocoevalcap's own downloader, which would otherwise run mid-job.
    from pycocoevalcap.spice import get_stanford_models as gsm

    post = defn.sections["post"]
    assert re.search(r"^\s*CORENLP=" + re.escape(gsm.CORENLP) + r"\s*$", post, re.M)
    assert "nlp.stanford.edu/software/${CORENLP}.zip" in post
    for jar in (f"{gsm.JAR}.jar", f"{gsm.JAR}-models.jar"):
        assert f"${{CORENLP}}/{jar}" in post, jar
    assert re.search(r'"spice" / "lib"', post)  # into pycocoevalcap's spice/lib, where SPICE looks
    assert "find_spice_jars" in defn.sections["test"]


def test_test_section_imports_fused_kernels(defn: DefFile) -> None:
    imported = set(re.findall(r"^\s*import (\w+)", defn.sections["test"], re.M))
    assert {"torch", "panobench", "selective_scan_cuda", "causal_conv1d_cuda"} <= imported


def test_environment_gives_writable_tmpdir_and_leaves_hf_offline_to_caller(defn: DefFile) -> None:
    env = shell_commands(defn.sections["environment"])
    assert 'export TMPDIR="${TMPDIR:-/tmp}"' in env  # keep the job's TMPDIR; /tmp is bound writable
    assert "export PYTHONNOUSERSITE=1" in env  # $HOME's ~/.local must not shadow the image's packages
    assert any(c.startswith('export PATH="/opt/venv/bin:') for c in env)
    assert not any("HF_HUB_OFFLINE" in c for c in env)  # documented decision: set by the caller
