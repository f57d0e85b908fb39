"""QuIC-360-format caption CSVs (``url,query,annotation``): strict reading, reference grouping, a Dataset.

Everything that can be checked without decoding images is checked when the CSV is read — encoding,
columns, empty fields, duplicate rows, remote URLs, paths escaping the data root, missing image files —
so a bad dataset fails before training starts, with a message naming the CSV and its line.

Line numbers are physical lines of the file, 1-based, with the header on line 1, so the first data row is
normally line 2 (a quoted field spanning several lines makes later rows start further down; the number
is always the line on which the row starts). Messages read ``<csv> line <n>: ...``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import Dataset

from panobench.data.panorama import load_erp
from panobench.errors import InputError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("url", "query", "annotation")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_LISTED_MISSING = 5


def _line_of_byte(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _decode(csv_path: Path) -> str:
    try:
        raw = csv_path.read_bytes()
    except FileNotFoundError as err:
        raise InputError(f"CSV not found: {csv_path}") from err
    except OSError as err:
        raise InputError(f"cannot read CSV {csv_path}: {err}") from err
    return decode_csv_bytes(raw, csv_path)


def decode_csv_bytes(raw: bytes, csv_path: str | os.PathLike) -> str:
    """Decode a CSV's bytes as UTF-8 (optional BOM); ``csv_path`` (a path or URL) only names it in errors."""
    try:
        # utf-8-sig: tolerate the BOM that spreadsheet programs write.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{csv_path} is not valid UTF-8: byte offset {err.start} (0-based; line {_line_of_byte(raw, err.start)}) "
            f"has byte 0x{raw[err.start]:02x}; re-save the file as UTF-8"
        ) from err


def parse_csv_rows(csv_path: str | os.PathLike, text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Split CSV text into its header and ``(line, fields)`` rows; blank lines are skipped.

    Checks the structure only (fields per row, duplicate or missing required columns, no data rows);
    ``csv_path`` names the file in errors.
    """
    if not text.strip():
        raise InputError(f"{csv_path} is empty; expected a header {','.join(REQUIRED_COLUMNS)} and data rows")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    rows: list[tuple[int, list[str]]] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise InputError(f"{csv_path} line {start}: malformed CSV: {err}") from err
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if header is None:
            header, header_line = fields, start
            continue
        if len(fields) != len(header):
            raise InputError(
                f"{csv_path} line {start}: {len(fields)} fields but the header (line {header_line}) has "
                f"{len(header)} ({','.join(header)})"
            )
        rows.append((start, fields))
    assert header is not None  # text is not blank, so some row was read
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise InputError(f"{csv_path} line {header_line}: duplicate column name(s) {duplicated}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"{csv_path}: missing required column(s) {missing}; found {header} (expected {list(REQUIRED_COLUMNS)})"
        )
    if not rows:
        raise InputError(f"{csv_path}: header only, no data rows")
    return header, rows


def _resolve_image(csv_path: Path, line: int, url: str, root: Path) -> Path:
    """Resolve ``url`` against ``root`` (following symlinks) and refuse anything outside it."""
    if _URL_SCHEME.match(url):
        raise InputError(
            f"{csv_path} line {line}: url {url!r} is a remote URL; download the images first and use a path "
            f"relative to the data root ({root})"
        )
    try:
        candidate = Path(url)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{csv_path} line {line}: invalid image path {url!r}: {err}") from err
    if not resolved.is_relative_to(root):
        raise InputError(
            f"{csv_path} line {line}: image path {url!r} resolves to {resolved}, outside the data root {root}"
        )
    return resolved


def read_quic_csv(csv_path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read and validate a QuIC-360-format CSV.

    Fields are kept as text exactly as written (the file is parsed with the ``csv`` module, so ``"NA"`` or
    ``"null"`` never become missing values, and each row's physical line is known). Extra columns are
    allowed and dropped.

    Args:
        csv_path: The CSV file (UTF-8, optional BOM).
        data_root: Directory that image paths are relative to; defaults to the CSV's directory. Every image
            must resolve (symlinks followed) to a file inside it.

    Returns:
        One row per CSV data row, in file order, with columns ``url``, ``query``, ``annotation`` (as
        written), ``path`` (absolute resolved image path, str), ``row`` (the row's line number in the file,
        header = line 1) and ``image_id`` (the url as written).

    Raises:
        InputError: Naming the CSV and line: not UTF-8, empty, header only, missing column, wrong number of
            fields, empty url/query/annotation, duplicate row, remote URL, path outside the data root,
            missing image file.
    """
    csv_path = Path(csv_path)
    root = Path(data_root if data_root is not None else csv_path.parent).resolve()
    if not root.is_dir():
        raise InputError(f"data root {root} (for {csv_path}) is not a directory")
    header, rows = parse_csv_rows(csv_path, _decode(csv_path))
    index = {c: header.index(c) for c in REQUIRED_COLUMNS}
    seen: dict[tuple[str, str, str], int] = {}
    missing_files: list[tuple[int, str, Path]] = []
    records: list[dict[str, Any]] = []
    for line, fields in rows:
        url, query, annotation = (fields[index[c]] for c in REQUIRED_COLUMNS)
        for column, value in zip(REQUIRED_COLUMNS, (url, query, annotation), strict=True):
            if not value.strip():
                raise InputError(f"{csv_path} line {line}: empty {column!r}")
        key = (url, query, annotation)
        if key in seen:
            raise InputError(
                f"{csv_path} line {line}: duplicate of line {seen[key]} (same url, query and annotation: {url!r}, "
                f"{query!r})"
            )
        seen[key] = line
        path = _resolve_image(csv_path, line, url, root)
        if not path.is_file():
            missing_files.append((line, url, path))
        records.append({"url": url, "query": query, "annotation": annotation, "path": str(path), "row": line,
                        "image_id": url})
    if missing_files:
        listed = "; ".join(f"line {ln}: {u!r} -> {p}" for ln, u, p in missing_files[:_MAX_LISTED_MISSING])
        more = f" (and {len(missing_files) - _MAX_LISTED_MISSING} more)" if len(missing_files) > _MAX_LISTED_MISSING else ""
        raise InputError(f"{csv_path}: {len(missing_files)} image file(s) not found: {listed}{more}")
    frame = pd.DataFrame.from_records(records, columns=["url", "query", "annotation", "path", "row", "image_id"])
    frame["row"] = frame["row"].astype("int64")
    logger.debug("read %s: %d rows, %d images", csv_path, len(frame), frame["url"].nunique())
    return frame


def make_sample_id(url: str, query: str) -> str:
    """Stable id of an (image, query) group: first 16 hex digits of SHA-1 over ``url \\x1f query``.

    A hash rather than a running index, so ids survive reordering or sub-setting the CSV and predictions
    can be joined to references across runs.
    """
    return hashlib.sha1(f"{url}\x1f{query}".encode()).hexdigest()[:16]


def group_references(df: pd.DataFrame) -> pd.DataFrame:
    """Group rows by (image, query): one candidate will be scored against all references of a group.

    Groups are keyed by ``(url, query)`` exactly as written and listed in order of first appearance.

    Args:
        df: Output of :func:`read_quic_csv`.

    Returns:
        One row per group with columns ``sample_id`` (:func:`make_sample_id`), ``url``, ``image_id``,
        ``path``, ``query``, ``references`` (list of annotations, file order) and ``rows`` (list of lines).
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in df.itertuples(index=False):
        key = (rec.url, rec.query)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"sample_id": make_sample_id(rec.url, rec.query), "url": rec.url,
                                   "image_id": rec.url, "path": rec.path, "query": rec.query, "references": [],
                                   "rows": []}
        group["references"].append(rec.annotation)
        group["rows"].append(int(rec.row))
    out = pd.DataFrame(list(groups.values()),
                       columns=["sample_id", "url", "image_id", "path", "query", "references", "rows"])
    if out["sample_id"].duplicated().any():  # pragma: no cover - a 64-bit SHA-1 prefix collision
        dup = out.loc[out["sample_id"].duplicated(keep=False), ["url", "query"]].to_dict("records")
        raise InputError(f"sample id collision between groups {dup}")
    return out


class PanoramaCaptionDataset(Dataset):
    """Caption samples from a QuIC-360-format CSV; the ERP is decoded lazily in ``__getitem__``.

    The CSV is fully validated (including image existence) at construction. ``grouped=False`` yields one
    sample per CSV row (training); ``grouped=True`` one per (image, query) group with all its references
    (evaluation).

    Each sample is a dict::

        erp:        uint8 [3, H, W]  (H, W) = erp_size
        query:      str
        annotation: str              (grouped=False)
        references: list[str]        (grouped=True)
        sample_id:  str              id of the (image, query) group, see make_sample_id
        url:        str
        row:        int              CSV line of the row (grouped: of the group's first row)
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        data_root: str | os.PathLike | None = None,
        erp_size: tuple[int, int] | None = (256, 512),
        grouped: bool = False,
    ) -> None:
        self.csv_path = Path(csv_path)
        self.erp_size = tuple(erp_size) if erp_size is not None else None
        self.grouped = grouped
        frame = read_quic_csv(self.csv_path, data_root)
        if grouped:
            table = group_references(frame)
            self._samples = [
                {"path": r.path, "query": r.query, "references": list(r.references), "sample_id": r.sample_id,
                 "url": r.url, "row": r.rows[0]}
                for r in table.itertuples(index=False)
            ]
        else:
            self._samples = [
                {"path": r.path, "query": r.query, "annotation": r.annotation,
                 "sample_id": make_sample_id(r.url, r.query), "url": r.url, "row": int(r.row)}
                for r in frame.itertuples(index=False)
            ]

    def __len__(self) -> int:
        return len(self._samples)

    def rows(self) -> list[dict[str, Any]]:
        """Every sample's fields as read from the CSV (url, query, annotation or references, sample_id, row),
        without decoding an image."""
        return [{k: v for k, v in sample.items() if k != "path"} for sample in self._samples]

    def query(self, index: int) -> str:
        """The query of sample ``index``, without decoding its image (generation sizes its prompts from these)."""
        return str(self._samples[index]["query"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self._samples[index]
        try:
            erp = load_erp(sample["path"], size=self.erp_size)
        except InputError as err:
            raise InputError(f"{self.csv_path} line {sample['row']} (url {sample['url']!r}): {err}") from err
        item: dict[str, Any] = {k: v for k, v in sample.items() if k != "path"}
        if "references" in item:
            item["references"] = list(item["references"])
        item["erp"] = erp
        return item

