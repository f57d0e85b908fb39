"""Apptainer definition files: a small parser shared by the static checks and the CI image builder.

``parse_def`` splits a definition into header keys (``Bootstrap``, ``From``) and the raw text of each ``%section``;
``shell_commands`` turns a section into logical shell lines. (A uniquely named module: several test folders have a
``conftest``, so tests never import from one.)
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEF_PATH = REPO_ROOT / "containers" / "panobench.def"
INSTALL_SCRIPT = REPO_ROOT / "containers" / "install.sh"
SECTION_LINE = re.compile(r"^%(\w+)\b(.*)$")


@dataclass(frozen=True)
class DefFile:
    """A parsed Apptainer definition: ``header`` keys and the raw text of each ``%section``."""

    header: dict[str, str]
    sections: dict[str, str]

    def script(self, name: str) -> str:
        """A section's text as the script Apptainer writes into the image (common indentation removed)."""
        return textwrap.dedent(self.sections[name]).strip("\n") + "\n"

    def files(self) -> list[tuple[str, str]]:
        """The ``%files`` entries as (source relative to the build directory, destination in the image)."""
        pairs = []
        for line in shell_commands(self.sections["files"]):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"%files line is not 'SOURCE DEST': {line!r}")
            pairs.append((parts[0], parts[1]))
        return pairs


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


def load_def(path: Path = DEF_PATH) -> DefFile:
    return parse_def(path.read_text())
