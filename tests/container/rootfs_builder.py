"""The CI image: containers/panobench.def's recipe executed in a Debian root filesystem made by debootstrap.

What ``apptainer build`` would do with the definition, done with the tools the project's machines have:

1. the base: ``debootstrap --variant=minbase bookworm`` from the host's Debian mirror (the ``.def``'s CUDA base
   image cannot be pulled here; Debian 12's Python 3.11 matches the host's CPU torch wheel);
2. ``%files``: each source copied from the repository to its destination;
3. ``%post``: it must be exactly one ``bash <install.sh> --mode gpu`` call; CI runs that script in CPU mode
   (``INSTALL_ARGS``) with bubblewrap, the root filesystem writable, network shared;
4. ``%environment``, ``%test``, ``%runscript``, ``%labels`` and the definition itself are written under
   ``/.singularity.d/`` where Apptainer keeps them (``env/90-environment.sh``, ``test``, ``runscript``,
   ``labels.json``, ``Singularity``);
5. ``%test`` runs through ``tests/container/bin/apptainer test`` on the finished, read-only image.

Build-machine settings are passed to step 3 only, explicitly, as builds behind a TLS-intercepting proxy do: the
host's pip settings (``pip config list``: CA bundle, local wheel folders and indexes, constraints) become ``PIP_*``
variables whose local paths are read-only binds under ``/run/panobench-build`` -- a tmpfs during the build, so
nothing of it stays in the image. The host's ``resolv.conf``/``hosts`` are bound for the build, not copied.

The result is cached in ``${XDG_CACHE_HOME:-~/.cache}/panobench/container-rootfs/<key>``, ``key`` a hash of
everything the build reads: the definition, every ``%files`` source (so ``install.sh`` and the project source),
this module, the Debian suite and mirror, the install arguments and the translated pip settings. A build goes into
``.building-<key>-<pid>`` and is renamed to ``<key>`` only after ``%test`` passed: a killed or failed build never
leaves a cache entry. ``<key>.lock`` is held shared while an image is in use and exclusively while it is built or
deleted; the two most recently used entries are kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from apptainer_deffile import DEF_PATH, REPO_ROOT, DefFile, parse_def, shell_commands

SUITE = "bookworm"
INSTALL_ARGS = ("--mode", "cpu", "--torch-index", "none", "--without-spice-jars")
BUILD_MOUNT = PurePosixPath("/run/panobench-build")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAUNCHER = Path(__file__).resolve().parent / "bin" / "apptainer"
MARKER = ".singularity.d/panobench-ci-build.json"
KEEP_ENTRIES = 2
# pip settings whose values name local files or directories (space-separated lists allowed).
PIP_PATH_KEYS = {"cert", "client-cert", "constraint", "find-links", "index-url", "extra-index-url"}
# Proxy variables are passed to the build as Apptainer passes them into containers (its alwaysPassKeys).
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


class BuildError(Exception):
    """A build step failed; the message names it and the log to read."""


@dataclass(frozen=True)
class BuildSettings:
    """What the build takes from the host: the Debian mirror and the pip settings (translated)."""

    mirror: str
    keyring: str | None
    pip_env: dict[str, str]
    binds: list[tuple[str, str]] = field(default_factory=list)  # (host path, path during the build)


@dataclass(frozen=True)
class Image:
    """A built image: the sandbox directory, its key, and what the build recorded (``MARKER``)."""

    path: Path
    key: str
    built_now: bool
    wait_s: float
    record: dict
    log: Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "panobench" / "container-rootfs"


def host_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = SUITE) -> tuple[str, str | None]:
    """The first ``deb`` source of ``suite`` in the host's apt sources: (URI, Signed-By keyring or None)."""
    stanzas: list[dict[str, str]] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for block in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if line.strip() and not line.startswith("#") and ":" in line and not line[0].isspace():
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            stanzas.append(fields)
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in (p for p in one_line if p.is_file()):
        for line in path.read_text().splitlines():
            match = re.match(r"^deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)", line)
            if match:
                signed = re.search(r"signed-by=(\S+)", match["opts"] or "")
                stanzas.append({"types": "deb", "uris": match["uri"], "suites": match["suite"],
                                "signed-by": signed[1] if signed else ""})
    for fields in stanzas:
        if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
            return fields["uris"].split()[0], fields.get("signed-by") or None
    raise BuildError(f"no 'deb' source for Debian {suite} in {apt_dir}/sources.list(.d): the root filesystem is "
                     "built from the host's Debian mirror")


def _pip_config() -> dict[str, str]:
    """The host's effective pip settings for ``pip install`` (env > install section > global section)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in out.stdout.splitlines():
        match = re.match(r"^(?P<section>[^.]+)\.(?P<key>[\w-]+)='(?P<value>.*)'$", line)
        if match and match["section"] in rank:
            key, value, r = match["key"], match["value"], rank[match["section"]]
            if key == "timeout":  # one option: `timeout` in config files, PIP_DEFAULT_TIMEOUT in the environment
                key = "default-timeout"
            if key not in found or r >= found[key][0]:
                found[key] = (r, value)
    return {key: value for key, (_, value) in found.items()}


def host_build_settings() -> BuildSettings:
    """The mirror and the host's pip settings, local paths rewritten to read-only binds under BUILD_MOUNT."""
    mirror, keyring = host_mirror()
    binds: dict[str, str] = {}

    def bound(path: str) -> str:
        real = os.path.abspath(path)
        if not os.path.exists(real):
            raise BuildError(f"pip setting names {path}, which does not exist on this host")
        binds[real] = str(BUILD_MOUNT / "host" / real.lstrip("/"))
        return binds[real]

    pip_env = {}
    settings = _pip_config()
    if "cert" not in settings:  # the build trusts exactly what the host's TLS trusts
        cafile = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
        settings["cert"] = cafile
    for key, value in sorted(settings.items()):
        if key in PIP_PATH_KEYS:
            items = []
            for item in value.split():
                if item.startswith("file://"):
                    local = urlparse(item).path
                    # An index's pages may link to files beside it (e.g. simple/torch/ -> ../../files/x.whl):
                    # bind the index directory's parent and keep the URL's path below it.
                    if key.endswith("index-url"):
                        bound(os.path.dirname(local.rstrip("/")))
                        items.append("file://" + str(BUILD_MOUNT / "host" / local.lstrip("/")))
                    else:
                        items.append("file://" + bound(local))
                elif "://" in item:
                    items.append(item)
                else:
                    items.append(bound(item))
            value = " ".join(items)
        pip_env["PIP_" + key.upper().replace("-", "_")] = value
    return BuildSettings(mirror, keyring, pip_env, sorted(binds.items()))


def _files_of(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(
        p for p in source.rglob("*")
        if p.is_file() and not any(part == "__pycache__" or part.endswith(".egg-info") for part in p.parts)
        and p.suffix != ".pyc"
    )


def cache_key(defn: DefFile, def_bytes: bytes, settings: BuildSettings) -> str:
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    add("def", def_bytes)
    for src, dest in defn.files():
        for path in _files_of(REPO_ROOT / src):
            add(f"files:{dest}:{path.relative_to(REPO_ROOT)}:{os.access(path, os.X_OK)}", path.read_bytes())
    add("builder", Path(__file__).read_bytes())
    add("deffile", (Path(__file__).parent / "apptainer_deffile.py").read_bytes())
    add("base", f"debootstrap minbase {SUITE} {settings.mirror} {settings.keyring}".encode())
    add("install", " ".join(INSTALL_ARGS).encode())
    add("pip", json.dumps(settings.pip_env, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def install_command(defn: DefFile) -> list[str]:
    """The CPU-mode command CI runs for %post, after checking that %post is only the GPU-mode install.sh call."""
    script = dict((src, dest) for src, dest in defn.files()).get("containers/install.sh")
    post = shell_commands(defn.sections.get("post", ""))
    if script is None or post != [f"bash {script} --mode gpu"]:
        raise BuildError(f"%post must be exactly `bash <%files destination of containers/install.sh> --mode gpu` "
                         f"(CI runs that script in CPU mode, nothing else), got {post}")
    return ["/bin/bash", script, *INSTALL_ARGS]


def _run(argv: list[str], log: Path, step: str, env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n=== {step}: {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(f"{step} failed (exit {proc.returncode}); build log {log}:\n{tail}")
    return round(time.monotonic() - start, 1)


def copy_files(defn: DefFile, rootfs: Path) -> None:
    """%files: each source (relative to the repository root, where `apptainer build` runs) to its destination."""
    for src, dest in defn.files():
        source, target = REPO_ROOT / src, rootfs / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=COPY_IGNORE, symlinks=True)
        else:
            shutil.copy2(source, target)


def write_metadata(defn: DefFile, def_text: str, rootfs: Path) -> None:
    """The files `apptainer build` writes under /.singularity.d/ from the definition."""
    meta = rootfs / ".singularity.d"
    (meta / "env").mkdir(parents=True, exist_ok=True)
    (meta / "env" / "90-environment.sh").write_text("#!/bin/sh\n" + defn.script("environment"))
    for name in ("test", "runscript"):
        (meta / name).write_text("#!/bin/sh\n" + defn.script(name))
        (meta / name).chmod(0o755)
    labels = dict(line.split(None, 1) for line in shell_commands(defn.sections.get("labels", "")))
    (meta / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    (meta / "Singularity").write_text(def_text)


def build(dest: Path, defn: DefFile, def_text: str, settings: BuildSettings, log: Path) -> dict:
    """Build the image into a temporary sibling of ``dest`` and rename it to ``dest`` when %test passed."""
    tmp = dest.parent / f".building-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    phases: dict[str, float] = {}
    try:
        keyring = [f"--keyring={settings.keyring}"] if settings.keyring else []
        phases["debootstrap"] = _run(
            ["debootstrap", "--variant=minbase", *keyring, SUITE, str(tmp), settings.mirror], log, "debootstrap")
        # debootstrap copies the host's resolver and name into the target: the image gets neutral ones (the
        # build and the launcher bind the host's at run time, as Apptainer does).
        (tmp / "etc" / "resolv.conf").write_text("")
        (tmp / "etc" / "hostname").write_text("localhost\n")
        (tmp / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        copy_files(defn, tmp)
        argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--bind", str(tmp), "/", "--dev", "/dev",
                "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp", "--tmpfs", "/run",
                "--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf", "--ro-bind", "/etc/hosts", "/etc/hosts"]
        for host_path, build_path in settings.binds:
            argv += ["--ro-bind", host_path, build_path]
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", **settings.pip_env,
               **{k: os.environ[k] for k in PROXY_VARS if k in os.environ}}
        argv += ["--clearenv", *[a for k, v in sorted(env.items()) for a in ("--setenv", k, v)], "--chdir", "/"]
        phases["install.sh"] = _run([*argv, *install_command(defn)], log, "%post: install.sh (CPU mode)")
        write_metadata(defn, def_text, tmp)
        phases["%test"] = _run([str(LAUNCHER), "test", str(tmp)], log, "%test: apptainer test")
        freeze = subprocess.run([str(LAUNCHER), "exec", str(tmp), "/opt/venv/bin/python", "-m", "pip", "freeze"],
                                capture_output=True, text=True, check=True)
        record = {"key": dest.name, "phases_s": phases, "build_s": round(sum(phases.values()), 1),
                  "install_args": list(INSTALL_ARGS), "pip_env": settings.pip_env, "mirror": settings.mirror,
                  "suite": SUITE, "pip_freeze": freeze.stdout.splitlines()}
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        os.rename(tmp, dest)
        return record
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(root: Path, current: str) -> None:
    """Delete entries beyond the KEEP_ENTRIES most recently used, and abandoned builds, if no one holds them."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    old = [p for p in entries if p.name != current][KEEP_ENTRIES - 1 :]
    old += [p for p in root.glob(".building-*") if p.is_dir() and p.name.split("-")[1] != current]
    for path in old:
        key = path.name.split("-")[1] if path.name.startswith(".building-") else path.name
        with open(root / f"{key}.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use or being built by another run
            shutil.rmtree(path, ignore_errors=True)
            if not path.name.startswith("."):
                (root / f"{key}.log").unlink(missing_ok=True)


@contextmanager
def cached_image() -> Iterator[Image]:
    """The CI image for the current recipe: reused from the cache, else built; held (shared lock) while in use."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    def_text = DEF_PATH.read_text()
    defn = parse_def(def_text)
    settings = host_build_settings()
    key = cache_key(defn, def_text.encode(), settings)
    dest, log = root / key, root / f"{key}.log"
    start = time.monotonic()
    with open(root / f"{key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key; waits for a concurrent one
        built_now = not (dest / MARKER).is_file()
        if built_now:
            for stale in root.glob(f".building-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            log.write_text(f"panobench CI image {key}\n")
            build(dest, defn, def_text, settings, log)
        fcntl.flock(lock, fcntl.LOCK_SH)  # others may use it too; nobody may delete it
        os.utime(dest)
        _prune(root, key)
        record = json.loads((dest / MARKER).read_text())
        yield Image(dest, key, built_now, round(time.monotonic() - start, 1), record, log)
