"""A stand-in for the ``apptainer`` binary in CI: ``apptainer exec IMAGE CMD...`` run with bubblewrap.

The project's machines have no Apptainer, so ``tests/container/bin/apptainer`` (this module) takes its place on
``PATH`` when the container test runs ``snakemake --use-apptainer``. It implements exactly what Snakemake >= 8 asks
of Apptainer (``snakemake/deployment/singularity.py``) and refuses everything else with exit status 255:

* ``apptainer --version``: Snakemake's check, answered ``apptainer version 1.3.4``.
* ``apptainer [--quiet --silent] exec --home DIR [--bind SRC[:DEST[:ro|rw]]]... [--pwd DIR] IMAGE bash -c CMD``:
  Snakemake's job command. ``IMAGE`` must be a local sandbox directory (a root filesystem with ``.singularity.d/``,
  which Apptainer also runs); ``docker://`` and other remote images (Snakemake would ``apptainer pull`` them) and
  SIF files are refused.
* ``apptainer test IMAGE``: runs the image's ``%test`` (``/.singularity.d/test``) like ``apptainer test``.

What it reproduces of Apptainer's defaults (``apptainer.conf`` as shipped; docs: "Bind Paths and Mounts"):

* the image is the root filesystem, read-only; bind destinations missing from the image are created in a
  temporary layer (Apptainer's "underlay"), never in the image;
* binds: ``$HOME`` (``--home SRC[:DEST]``, DEST = SRC when omitted), the working directory, ``/tmp``,
  ``/var/tmp``, ``/dev``, ``/proc``, ``/sys``, and the host's ``/etc/hosts``, ``/etc/resolv.conf`` and
  ``/etc/localtime`` where the image has a file to bind them on;
* environment (``internal/pkg/util/env/clean.go``): the host's variables are passed in except ``HOME``, ``PATH``,
  ``LD_LIBRARY_PATH`` and ``APPTAINER_*``/``SINGULARITY_*``; ``APPTAINERENV_X``/``SINGULARITYENV_X`` set ``X``;
  ``HOME`` is the home destination and ``PATH`` Apptainer's default; then the image's ``/.singularity.d/env/*.sh``
  (``%environment`` is ``90-environment.sh``) are sourced in order, and the command runs.

Not reproduced: the real runtime (SIF/squashfs mounts, setuid or user-namespace starter), GPU binds (``--nv`` is
refused), the ``/etc/passwd``/``/etc/group`` entries Apptainer adds for non-root users (CI runs as root, who is in
the image's ``/etc/passwd``).

With ``PANOBENCH_APPTAINER_LOG=FILE`` in its environment (the launcher's own setting, not passed into the
container), every invocation appends one JSON line to FILE: the image, working directory, binds, command, exit code
and, measured inside the container after ``%environment``, which ``python3`` and ``panobench`` the command finds and
the interpreter ``panobench``'s entry point runs under.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

VERSION_LINE = "apptainer version 1.3.4"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Apptainer's env.DefaultPath
LOG_ENV = "PANOBENCH_APPTAINER_LOG"
NOT_FORWARDED = {"HOME", "PATH", "LD_LIBRARY_PATH", LOG_ENV}
NOT_FORWARDED_PREFIXES = ("APPTAINER_", "SINGULARITY_")
ENV_PREFIXES = ("APPTAINERENV_", "SINGULARITYENV_")
GLOBAL_FLAGS = {"--quiet", "-q", "--silent", "-s"}
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/localtime")
REMOTE_IMAGE = re.compile(r"^[a-z]+://")

# Runs inside the container as `/bin/sh -c PRELUDE exec RECORD_FD CMD...`: what Apptainer's exec action does
# (source the image's environment scripts in order, then exec), plus the record for the log when RECORD_FD is set.
PRELUDE = r"""
record_fd=$1
shift
for script in /.singularity.d/env/*.sh; do
    if [ -f "$script" ]; then
        . "$script"
    fi
done
if [ -n "$record_fd" ]; then
    panobench_path=$(command -v panobench || true)
    interpreter=
    if [ -n "$panobench_path" ]; then
        interpreter=$(head -n 1 "$panobench_path" | sed -n 's/^#! *//p')
    fi
    eval 'printf "python3=%s\npanobench=%s\npanobench_interpreter=%s\n" \
        "$(command -v python3 || true)" "$panobench_path" "$interpreter" >&'"$record_fd"
    eval "exec $record_fd>&-"
fi
exec "$@"
"""


class LauncherError(Exception):
    """An invocation this launcher does not implement, or a broken image; exit status 255 like Apptainer's."""


@dataclass(frozen=True)
class Bind:
    src: str
    dest: str
    read_only: bool = False


@dataclass
class Invocation:
    """One parsed command line: ``action`` is ``version``, ``exec`` or ``test``."""

    action: str
    image: str = ""
    command: list[str] = field(default_factory=list)
    home: Bind | None = None
    binds: list[Bind] = field(default_factory=list)
    pwd: str | None = None
    quiet: bool = False


def parse_bind(spec: str) -> list[Bind]:
    """``-B/--bind`` value: comma-separated ``src[:dest[:opts]]``, opts ``ro`` or ``rw``; dest defaults to src."""
    binds = []
    for item in spec.split(","):
        parts = item.split(":")
        if not parts[0] or len(parts) > 3:
            raise LauncherError(f"bind specification {item!r} is not src[:dest[:ro|rw]]")
        src, dest = parts[0], parts[1] if len(parts) > 1 and parts[1] else parts[0]
        opts = parts[2] if len(parts) == 3 else "rw"
        if opts not in ("ro", "rw"):
            raise LauncherError(f"bind option {opts!r} in {item!r}: only 'ro' and 'rw' are implemented")
        if not dest.startswith("/"):
            raise LauncherError(f"bind destination {dest!r} is not an absolute path")
        binds.append(Bind(os.path.abspath(src), os.path.normpath(dest), opts == "ro"))
    return binds


def parse_home(spec: str) -> Bind:
    """``--home src[:dest]``: dest is src when omitted (Apptainer's launcher: SetHomeDest(homeSlice[0]))."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 2:
        raise LauncherError(f"--home {spec!r} is not src[:dest]")
    dest = parts[1] if len(parts) == 2 else parts[0]
    return Bind(os.path.abspath(parts[0]), os.path.normpath(dest))


def _option_value(argv: list[str], i: int) -> tuple[str, int]:
    """The value of the option at argv[i] (``--opt VALUE`` or ``--opt=VALUE``) and the index after it."""
    opt = argv[i]
    if "=" in opt and opt.startswith("--"):
        return opt.split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise LauncherError(f"{opt} needs a value")
    return argv[i + 1], i + 2


def parse_args(argv: list[str]) -> Invocation:
    """Parse a command line; anything Snakemake does not send is a :class:`LauncherError`."""
    i, quiet = 0, False
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--version":
            if len(argv) != 1:
                raise LauncherError(f"--version takes no other arguments: {argv}")
            return Invocation("version")
        if argv[i] not in GLOBAL_FLAGS:
            raise LauncherError(f"unsupported global option {argv[i]!r} (implemented: --version, {sorted(GLOBAL_FLAGS)})")
        quiet, i = True, i + 1
    if i >= len(argv):
        raise LauncherError("no command given")
    action, i = argv[i], i + 1
    if action not in ("exec", "test"):
        raise LauncherError(
            f"unsupported command {action!r}: Snakemake runs `apptainer --version` and `apptainer exec`"
            " (and `apptainer pull` for remote images, which this launcher refuses: give a local image)"
        )
    inv = Invocation(action, quiet=quiet)
    while i < len(argv) and argv[i].startswith("-"):
        name = argv[i].split("=", 1)[0]
        if name not in ("--home", "--bind", "-B", "--pwd") or (action == "test" and name not in ("--bind", "-B")):
            raise LauncherError(
                f"unsupported {action} option {argv[i]!r}: this launcher implements what Snakemake passes"
                " (--home, --bind/-B, --pwd); GPU options such as --nv need the real Apptainer"
            )
        value, i = _option_value(argv, i)
        if name == "--home":
            inv.home = parse_home(value)
        elif name == "--pwd":
            if not value.startswith("/"):
                raise LauncherError(f"--pwd {value!r} is not an absolute path")
            inv.pwd = value
        else:
            inv.binds += parse_bind(value)
    if i >= len(argv):
        raise LauncherError(f"apptainer {action}: no image given")
    inv.image, inv.command = argv[i], argv[i + 1 :]
    if action == "exec" and not inv.command:
        raise LauncherError("apptainer exec: no command given after the image")
    if action == "test" and inv.command:
        raise LauncherError(f"apptainer test takes only the image, got {inv.command}")
    return inv


def check_image(image: str) -> Path:
    """The image as a sandbox directory; remote images and SIF files are refused."""
    if REMOTE_IMAGE.match(image):
        raise LauncherError(
            f"remote image {image!r}: Snakemake would `apptainer pull` it; this launcher runs local sandbox"
            " directories only"
        )
    path = Path(image).absolute()
    if path.is_file():
        raise LauncherError(f"{image}: SIF/squashfs image files need the real Apptainer; give a sandbox directory")
    if not (path / ".singularity.d").is_dir():
        raise LauncherError(f"{image}: not an Apptainer sandbox (no .singularity.d/ directory)")
    return path


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def system_binds(image: Path, inv: Invocation, cwd: str) -> list[tuple[str, Bind]]:
    """Apptainer's default mounts, then the invocation's binds, as (bwrap option, bind) in mount order."""
    home = inv.home or Bind(pwd.getpwuid(os.getuid()).pw_dir, pwd.getpwuid(os.getuid()).pw_dir)
    mounts: list[tuple[str, Bind]] = [
        ("--dev-bind", Bind("/dev", "/dev")),
        ("--proc", Bind("proc", "/proc")),
        ("--ro-bind", Bind("/sys", "/sys", read_only=True)),
        ("--bind", Bind("/tmp", "/tmp")),
        ("--bind", Bind("/var/tmp", "/var/tmp")),
    ]
    for host_file in HOST_FILES:
        if os.path.isfile(host_file) and (image / host_file[1:]).is_file() and not (image / host_file[1:]).is_symlink():
            mounts.append(("--ro-bind", Bind(host_file, host_file, read_only=True)))
    mounts.append(("--bind", home))
    mounts.append(("--bind", Bind(cwd, cwd)))
    mounts += [("--ro-bind" if b.read_only else "--bind", b) for b in inv.binds]
    for _, bind in mounts:
        if bind.src != "proc" and not os.path.exists(bind.src):
            raise LauncherError(f"mount source {bind.src} does not exist")
    # A bind that an earlier identity bind already covers is skipped, as Apptainer skips the working directory
    # when it lies under $HOME. Shallow destinations first: a deeper bind must not be hidden by a later one.
    kept: list[tuple[str, Bind]] = []
    for opt, bind in sorted(mounts, key=lambda m: len(PurePosixPath(m[1].dest).parts)):
        covered = any(
            k.src == k.dest and bind.src == bind.dest and _under(bind.dest, k.dest) and kopt == opt
            for kopt, k in kept
        )
        if not covered:
            kept.append((opt, bind))
    return kept


def underlay_dirs(image: Path, dests: list[str]) -> set[PurePosixPath]:
    """Image directories to rebuild in a temporary layer so that every bind destination can be created.

    A destination missing from the (read-only) image needs its deepest existing ancestor, and that one's own
    ancestors, to be writable: those become temporary directories holding read-only binds of the image's entries.
    Destinations under an earlier bind are created in the bound host directory instead.
    """
    need = {PurePosixPath("/")}
    done: list[str] = []
    for dest in dests:
        if any(_under(dest, d) for d in done):
            done.append(dest)
            continue
        done.append(dest)
        current = PurePosixPath("/")
        for name in PurePosixPath(dest).parts[1:]:
            nxt = current / name
            in_image = image / str(nxt).lstrip("/")
            if in_image.is_symlink():
                raise LauncherError(f"bind destination {dest} passes through the symlink {nxt} in the image")
            if not in_image.exists():
                need.update({current, *current.parents})
                break
            if not in_image.is_dir() and str(nxt) != dest:
                raise LauncherError(f"bind destination {dest} passes through the file {nxt} in the image")
            current = nxt
    return need


def root_ops(image: Path, need: set[PurePosixPath]) -> list[str]:
    """bwrap options that show the image at / read-only, with the ``need`` directories rebuilt in bwrap's tmpfs."""
    ops: list[str] = []

    def mirror(directory: PurePosixPath) -> None:
        with os.scandir(image / str(directory).lstrip("/")) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                target = directory / entry.name
                if entry.is_symlink():
                    ops.extend(["--symlink", os.readlink(entry.path), str(target)])
                elif entry.is_dir(follow_symlinks=False) and target in need:
                    mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                    ops.extend(["--perms", f"{mode:04o}", "--dir", str(target)])
                    mirror(target)
                elif entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
                    ops.extend(["--ro-bind", entry.path, str(target)])
                else:
                    raise LauncherError(f"{entry.path}: special file in an image directory that needs an underlay")

    mirror(PurePosixPath("/"))
    return ops


def container_env(inv: Invocation, home_dest: str, image: Path) -> dict[str, str]:
    """The environment the command starts with, before the image's environment scripts run."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in NOT_FORWARDED and not k.startswith(NOT_FORWARDED_PREFIXES + ENV_PREFIXES)
    }
    for key, value in os.environ.items():
        for prefix in ENV_PREFIXES:
            if key.startswith(prefix) and key[len(prefix) :]:
                name = key[len(prefix) :]
                if name in ("HOME", "PATH", "PREPEND_PATH", "APPEND_PATH"):
                    raise LauncherError(f"{key}: setting {name} this way is not implemented by this launcher")
                env[name] = value
    env["HOME"] = home_dest
    env["PATH"] = DEFAULT_PATH
    for prefix in ("APPTAINER", "SINGULARITY"):
        env[f"{prefix}_CONTAINER"] = str(image)
        env[f"{prefix}_NAME"] = image.name
    return env


def bwrap_argv(inv: Invocation, image: Path, cwd: str, record_fd: int | None) -> list[str]:
    mounts = system_binds(image, inv, cwd)
    need = underlay_dirs(image, [b.dest for _, b in mounts])
    argv = ["bwrap", "--die-with-parent", *root_ops(image, need)]
    for opt, bind in mounts:
        argv += [opt, bind.dest] if opt == "--proc" else [opt, bind.src, bind.dest]
    argv += ["--remount-ro", "/", "--chdir", inv.pwd or cwd, "--clearenv"]
    home_dest = (inv.home or Bind("", pwd.getpwuid(os.getuid()).pw_dir)).dest
    for key, value in sorted(container_env(inv, home_dest, image).items()):
        argv += ["--setenv", key, value]
    if inv.action == "test":
        if not (image / ".singularity.d" / "test").is_file():
            raise LauncherError(f"{image}: no %test script (.singularity.d/test)")
        command = ["/bin/sh", "/.singularity.d/test"]
    else:
        command = inv.command
    action = f"/.singularity.d/actions/{inv.action}"
    return [*argv, "/bin/sh", "-c", PRELUDE, action, "" if record_fd is None else str(record_fd), *command]


def _append_log(path: str, record: dict) -> None:
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as log:
        fcntl.flock(log, fcntl.LOCK_EX)  # parallel jobs append whole lines
        log.write(line)


def run(argv: list[str]) -> int:
    inv = parse_args(argv)
    if inv.action == "version":
        print(VERSION_LINE)
        return 0
    image = check_image(inv.image)
    cwd = os.getcwd()
    log_path = os.environ.get(LOG_ENV)
    read_fd, write_fd = os.pipe() if log_path else (None, None)
    command = bwrap_argv(inv, image, cwd, write_fd)
    start = time.time()
    proc = subprocess.Popen(command, pass_fds=(write_fd,) if write_fd is not None else ())
    if write_fd is not None:
        os.close(write_fd)
    returncode = proc.wait()
    if log_path and read_fd is not None:
        with os.fdopen(read_fd) as pipe:
            seen = dict(line.split("=", 1) for line in pipe.read().splitlines() if "=" in line)
        _append_log(log_path, {
            "action": inv.action, "image": str(image), "cwd": cwd, "pwd": inv.pwd,
            "home": asdict(inv.home) if inv.home else None, "binds": [asdict(b) for b in inv.binds],
            "command": inv.command, "exit_code": returncode, "start": start, "wall_s": round(time.time() - start, 3),
            "in_image": seen,
        })
    return returncode


def main() -> None:
    try:
        sys.exit(run(sys.argv[1:]))
    except LauncherError as err:
        print(f"FATAL:   apptainer (tests/container bubblewrap launcher): {err}", file=sys.stderr)
        sys.exit(255)


if __name__ == "__main__":
    main()
