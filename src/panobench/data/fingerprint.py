"""A fingerprint of a dataset: the three CSVs and every image file they name, hashed (SPEC §5b "data is pinned").

Two runs used the same data exactly when their fingerprints are equal. The fingerprint is the SHA-256 of a
canonical JSON document holding the SHA-256 of each split's CSV and, for every distinct image the CSVs name, its
path relative to the data root and the SHA-256 of its bytes. Paths are relative, so moving or copying the data
folder keeps the fingerprint; renaming, re-encoding or replacing any image changes it.

``panobench prepare-data`` writes the same fingerprint into its ``manifest.json``; every cell records it (through
the workflow's ``fingerprint_data`` rule), and the report's provenance shows it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from panobench.data.csvdata import read_quic_csv
from panobench.errors import InputError

logger = logging.getLogger(__name__)

FINGERPRINT_FORMAT = 1


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks: panoramas can be tens of MB)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk_bytes), b""):
                digest.update(block)
    except OSError as err:
        raise InputError(f"cannot read {path} to hash it: {err}") from err
    return digest.hexdigest()


def fingerprint_of(csv_sha256: Mapping[str, str], image_sha256: Mapping[str, str]) -> str:
    """The dataset fingerprint from per-split CSV hashes and ``{relative image path: sha256}``."""
    doc = {"format": FINGERPRINT_FORMAT, "csv": dict(sorted(csv_sha256.items())),
           "images": sorted(image_sha256.items())}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def dataset_fingerprint(csv_paths: Mapping[str, str | os.PathLike], data_root: str | os.PathLike,
                        *, progress: bool = True) -> dict[str, Any]:
    """Hash the CSVs ``{split: path}`` and every image they name (validated as training reads them).

    Returns:
        ``{"fingerprint": hex, "format": 1, "data_root": str, "csv": {split: {"path", "sha256", "rows"}},
        "num_images": int, "image_bytes": int}``.

    Raises:
        InputError: a CSV or image is missing/unreadable, or a path escapes the data root.
    """
    root = Path(data_root).resolve()
    csv_info: dict[str, dict[str, Any]] = {}
    images: dict[str, Path] = {}
    for split, csv_path in csv_paths.items():
        frame = read_quic_csv(csv_path, root)
        csv_info[split] = {"path": str(csv_path), "sha256": file_sha256(csv_path), "rows": int(len(frame))}
        for path in frame["path"].unique():
            images[Path(path).relative_to(root).as_posix()] = Path(path)
    image_sha: dict[str, str] = {}
    total = 0
    for rel in tqdm(sorted(images), desc="fingerprint images", unit="img", disable=not progress):
        image_sha[rel] = file_sha256(images[rel])
        total += images[rel].stat().st_size
    fingerprint = fingerprint_of({s: info["sha256"] for s, info in csv_info.items()}, image_sha)
    logger.info("data fingerprint %s: %d CSVs, %d images, %.1f MB", fingerprint[:16], len(csv_info), len(image_sha),
                total / 1e6)
    return {"fingerprint": fingerprint, "format": FINGERPRINT_FORMAT, "data_root": str(data_root), "csv": csv_info,
            "num_images": len(image_sha), "image_bytes": total}
