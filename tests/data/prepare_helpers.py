"""Synthetic panoramas served by a :class:`~loopback_http.LoopbackServer` as "published" QuIC-360 CSVs.

(A uniquely named module, imported by the tests of this folder and by ``benchmarks/prepare_data_speed.py``.)
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from loopback_http import LoopbackServer, Route
from PIL import Image

from panobench.data.synthetic import generate_synthetic

SPLITS = ("train", "valid", "test")
Rows = dict[str, list[tuple[str, str, str]]]


def synthetic_dataset(dest: Path, *, n_train: int, n_valid: int, n_test: int, width: int = 64,
                      height: int = 32) -> tuple[dict[str, bytes], Rows]:
    """The seeded synthetic ERP dataset: ``({relative image path: PNG bytes}, {split: [(url, query, annotation)]})``."""
    generate_synthetic(dest, seed=0, n_train=n_train, n_valid=n_valid, n_test=n_test, width=width, height=height)
    rows: Rows = {}
    images: dict[str, bytes] = {}
    for split in SPLITS:
        with open(dest / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows[split] = [(r["url"], r["query"], r["annotation"]) for r in csv.DictReader(f)]
        for url, _, _ in rows[split]:
            images.setdefault(url, (dest / url).read_bytes())
    return images, rows


def image_bytes(width: int, height: int, *, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A small noise image (distinct bytes per seed) in the given format."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def serve_images(server: LoopbackServer, images: dict[str, bytes], prefix: str = "/img/") -> dict[str, str]:
    """Register every image under ``prefix``; returns ``{relative path: URL}``."""
    urls = {}
    for rel, body in images.items():
        server.routes[prefix + rel] = Route(body=body)
        urls[rel] = server.url(prefix + rel)
    return urls


def write_published(dest: Path, rows: dict[str, list[tuple[str, str, str]]]) -> dict[str, str]:
    """Write ``{split}.csv`` with an extra leading ``id`` column (published CSVs may carry more than the three)."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "url", "query", "annotation"])
        writer.writerows([f"{split}-{i}", *row] for i, row in enumerate(rows[split]))
        paths[split] = str(dest / f"{split}.csv")
        Path(paths[split]).write_text(buffer.getvalue(), encoding="utf-8")
    return paths


def published_rows(server: LoopbackServer, images: dict[str, bytes], rows: Rows, prefix: str = "/img/") -> Rows:
    """The synthetic rows with each local path replaced by its URL on ``server`` (images registered there)."""
    urls = serve_images(server, images, prefix)
    return {split: [(urls[u], q, a) for u, q, a in rows[split]] for split in SPLITS}


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) by relative POSIX path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
