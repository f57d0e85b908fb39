"""Prepare a QuIC-360-format dataset from published CSVs whose ``url`` column holds image URLs (``prepare-data``).

QuIC-360 does not redistribute its images: each split is a CSV (``url,query,annotation``) whose ``url`` is a Flickr
URL. :func:`prepare_data` downloads every distinct URL once (concurrently, with timeouts, retries and resume),
verifies each download against the ERP policy that training applies, and writes a folder that
:func:`~panobench.data.csvdata.read_quic_csv` accepts with ``data_root`` = that folder::

    out/images/<h[:2]>/<h>.<ext>   h = SHA-256 of the published URL; ext from the decoded format (jpg, png, ...)
    out/{train,valid,test}.csv     the published rows (same columns, same order), ``url`` rewritten to the local
                                   path, the published URL kept in a last column ``source_url``
    out/dropped.csv                every published row that is not in the output, with its reason
    out/manifest.json              sources, per split row count and CSV SHA-256, per image URL/path/SHA-256/size,
                                   and the dataset fingerprint (:mod:`panobench.data.fingerprint`)
    out/.panobench-prepare-data    marks the folder as ours; locked while a run writes into it

Names are URL hashes, not content hashes: two published URLs serving identical bytes stay two images, so the
published (image, query) grouping is kept exactly (a content-addressed name would merge them and could turn
distinct rows into duplicates).

Resume: an image is written to a hidden temporary file and renamed to its final name only after it has been
verified, so a final name always holds a complete, verified image; a re-run reuses those (re-hashing them and
re-checking their size against the current policy) and fetches only what is missing. URLs that failed are tried
again on every run (a link may come back). The manifest holds no timestamps or timings, so an interrupted and
resumed run writes the same bytes as an uninterrupted one.

HTTP is the standard library's ``urllib``: it already gives per-attempt timeouts, redirects and streaming, the retry
policy (which failures are transient, backoff) is ours either way, and the package gains no dependency.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from panobench import __version__
from panobench.data.csvdata import REQUIRED_COLUMNS, decode_csv_bytes, parse_csv_rows
from panobench.data.fingerprint import FINGERPRINT_FORMAT, file_sha256, fingerprint_of
from panobench.data.panorama import ASPECT_TOLERANCE, ERP_ASPECT, check_erp_aspect, load_erp
from panobench.errors import ConfigError, InputError
from panobench.utils.io import write_text_atomic

logger = logging.getLogger(__name__)

GENERATOR = "panobench prepare-data"
MANIFEST_FORMAT = 1
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
DROPPED = "dropped.csv"
MARKER = ".panobench-prepare-data"
IMAGES_DIR = "images"
SOURCE_URL_COLUMN = "source_url"
ON_MISSING = ("fail", "drop")

# Real QuIC-360 panoramas are Flickr equirectangular photos; below 1024x512 an image is a thumbnail, and
# config/quic360.yaml would upscale it more than 2x to its 2048x1024 working size.
DEFAULT_MIN_WIDTH = 1024
DEFAULT_MIN_HEIGHT = 512
# A runaway response (a server streaming forever) must not fill the disk; the largest real ERPs are ~100 MB.
MAX_DOWNLOAD_BYTES = 512 << 20
_FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp", "GIF": "gif"}
# Statuses worth another attempt: the server says "later" or failed on its side.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 60.0
_HTTP_URL = re.compile(r"^https?://[^\s/]+", re.IGNORECASE)
_LISTED_FAILURES = 5
_CHUNK = 1 << 16


# ------------------------------------------------------------------------------------------ policies and results


@dataclass(frozen=True)
class FetchPolicy:
    """How images are downloaded (nothing here changes what is written, only how fast and how patiently)."""

    workers: int = 16           # concurrent downloads (the original QuIC-360 script used 16 threads)
    timeout_s: float = 30.0     # per attempt: connecting, and each wait for more bytes
    retries: int = 3            # further attempts after a transient failure (timeout, 5xx, 429, truncated body)
    backoff_s: float = 1.0      # wait before the first retry; doubles each retry (x0.5-1 jitter)

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout_s!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be a non-negative integer, got {self.retries!r}")
        if self.backoff_s < 0:
            raise ConfigError(f"backoff must be >= 0 seconds, got {self.backoff_s!r}")


@dataclass(frozen=True)
class ImagePolicy:
    """Which downloads are accepted: decodable in full, 2:1 (the ERP policy of ``load_erp``), at least this size."""

    min_width: int = DEFAULT_MIN_WIDTH
    min_height: int = DEFAULT_MIN_HEIGHT

    def __post_init__(self) -> None:
        for name in ("min_width", "min_height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def to_record(self) -> dict[str, Any]:
        return {"min_width": self.min_width, "min_height": self.min_height, "aspect": ERP_ASPECT,
                "aspect_tolerance": ASPECT_TOLERANCE}


@dataclass(frozen=True)
class StoredImage:
    """A verified image under its final name."""

    url: str
    path: str          # relative to the output folder, POSIX separators
    sha256: str
    bytes: int
    width: int
    height: int
    format: str        # PIL's name of the decoded format: JPEG, PNG, ...
    reused: bool       # found from an earlier run rather than downloaded now


@dataclass(frozen=True)
class FailedImage:
    """A URL that could not be obtained or whose image failed verification."""

    url: str
    reason: str        # short code: http_404, timeout, truncated, not_an_image, not_2to1, too_small, ...
    detail: str        # deterministic text (no timings, no temporary names): it is written to dropped.csv


@dataclass
class _SourceRow:
    line: int
    fields: list[str]
    url: str
    query: str
    annotation: str


@dataclass
class _SourceSplit:
    split: str
    location: str
    sha256: str
    header: list[str]
    published_rows: int
    rows: list[_SourceRow] = field(default_factory=list)                  # unique rows, file order
    duplicates: list[tuple[_SourceRow, int]] = field(default_factory=list)  # (row, line it duplicates)


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_data` did (the manifest is what it wrote)."""

    out_dir: Path
    manifest: dict[str, Any]
    downloaded: int
    reused: int
    failed: int


class _FetchFailure(Exception):
    def __init__(self, reason: str, detail: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.transient, self.retry_after = reason, detail, transient, retry_after


# ------------------------------------------------------------------------------------------ HTTP


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (Flickr moves photos between hosts) but never off HTTP(S), e.g. to ``ftp:`` or ``file:``."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl)).scheme.lower()
        if scheme not in ("http", "https"):
            raise _FetchFailure("bad_redirect", f"HTTP {code} redirect to a non-HTTP URL ({scheme}:)", transient=False)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _is_url(location: str) -> bool:
    return bool(_HTTP_URL.match(location))


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value and value.strip().isdigit():
        return min(float(value.strip()), _MAX_RETRY_AFTER_S)
    return None


def _get(url: str, sink: IO[bytes], timeout_s: float) -> tuple[str, int]:
    """One GET of ``url`` streamed into ``sink``; returns ``(sha256 hex, bytes)``.

    Raises:
        _FetchFailure: HTTP error status, timeout, connection failure, truncated or oversized body.
    """
    request = urllib.request.Request(url, headers={"User-Agent": f"panobench/{__version__} (dataset preparation)",
                                                   "Accept": "image/*,*/*;q=0.5"})
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        response = opener.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        raise _FetchFailure(f"http_{err.code}", f"HTTP {err.code}", transient=err.code in _TRANSIENT_STATUS,
                            retry_after=_retry_after(err.headers)) from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise _FetchFailure("timeout", "no response within the timeout", transient=True) from None
        raise _FetchFailure("connection_error", f"cannot connect ({type(err.reason).__name__})",
                            transient=True) from None
    except TimeoutError:
        raise _FetchFailure("timeout", "no response within the timeout", transient=True) from None
    except (OSError, http.client.HTTPException) as err:
        raise _FetchFailure("connection_error", f"connection failed ({type(err).__name__})", transient=True) from None
    with response:
        header = response.headers.get("Content-Length")
        expected = int(header) if header and header.strip().isdigit() else None
        if expected is not None and expected > MAX_DOWNLOAD_BYTES:
            raise _FetchFailure("too_large", f"Content-Length {expected} > {MAX_DOWNLOAD_BYTES} bytes", transient=False)
        digest = hashlib.sha256()
        size = 0
        while True:
            try:
                block = response.read(_CHUNK)
            except TimeoutError:
                raise _FetchFailure("timeout", "the body stalled past the timeout", transient=True) from None
            except http.client.IncompleteRead:
                raise _FetchFailure("truncated", "the body ended early", transient=True) from None
            except (OSError, http.client.HTTPException) as err:
                raise _FetchFailure("connection_error", f"connection lost ({type(err).__name__})",
                                    transient=True) from None
            if not block:
                break
            size += len(block)
            if size > MAX_DOWNLOAD_BYTES:
                raise _FetchFailure("too_large", f"body larger than {MAX_DOWNLOAD_BYTES} bytes", transient=False)
            digest.update(block)
            sink.write(block)  # local write errors (disk full) are not network failures: they propagate
    # http.client returns a short body without complaint when the server closes early; Content-Length says so.
    if expected is not None and size != expected:
        raise _FetchFailure("truncated", "the body is shorter than its Content-Length", transient=True)
    return digest.hexdigest(), size


def _with_retries(url: str, policy: FetchPolicy, attempt_once: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``attempt_once`` until it succeeds or fails permanently; returns ``(result, attempts)``.

    Raises:
        _FetchFailure: the last failure, its detail extended by the attempt count.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return attempt_once(), attempt
        except _FetchFailure as err:
            if not err.transient or attempt > policy.retries:
                plural = "s" if attempt > 1 else ""
                raise _FetchFailure(err.reason, f"{err.detail} ({attempt} attempt{plural})",
                                    transient=err.transient) from None
            # Jitter, so that workers that failed together do not retry in step.
            wait = policy.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            wait = max(wait, err.retry_after or 0.0)
            logger.debug("%s: %s; retry %d/%d in %.2f s", url, err, attempt, policy.retries, wait)
            time.sleep(wait)


def fetch_bytes(url: str, policy: FetchPolicy) -> bytes:
    """Download a small file (a published CSV) into memory, with the same timeouts and retries as images.

    Raises:
        InputError: the download failed.
    """
    def once() -> bytes:
        buffer = io.BytesIO()
        _get(url, buffer, policy.timeout_s)
        return buffer.getvalue()

    try:
        return _with_retries(url, policy, once)[0]
    except _FetchFailure as err:
        raise InputError(f"cannot download {url}: {err.reason}: {err.detail}") from None


# ------------------------------------------------------------------------------------------ images


def url_key(url: str) -> str:
    """The local name of a published URL: the hex SHA-256 of its exact text."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _ImageFetcher:
    """Obtain one URL's image (reuse, or download + verify + rename); safe to call from many threads."""

    def __init__(self, images_dir: Path, fetch: FetchPolicy, image: ImagePolicy) -> None:
        self.images_dir = images_dir
        self.out_dir = images_dir.parent
        self.fetch = fetch
        self.image = image
        # Decoding a large ERP in full takes ~100 MB and a core; more at once than cores only costs memory.
        self._decode_slots = threading.BoundedSemaphore(max(1, min(fetch.workers, os.cpu_count() or 1)))
        self._mode = 0o666 & ~_umask()

    def __call__(self, url: str) -> StoredImage | FailedImage:
        key = url_key(url)
        folder = self.images_dir / key[:2]
        existing = sorted(folder.glob(f"{key}.*"))  # temporary files start with "." and never match
        if existing:
            reused = self._reuse(url, existing[0])
            if reused is not None:
                return reused
        try:
            stored, _ = _with_retries(url, self.fetch, lambda: self._download(url, folder, key))
        except _FetchFailure as err:
            logger.debug("%s: %s: %s", url, err.reason, err.detail)
            return FailedImage(url, err.reason, err.detail)
        return stored

    def _reuse(self, url: str, path: Path) -> StoredImage | FailedImage | None:
        """An image a previous run stored (verified in full before its rename): re-check its size, hash it."""
        try:
            with Image.open(path) as img:
                fmt, (width, height) = img.format or "unknown", img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            # Only a file changed behind our back gets here; it is replaced, not trusted.
            logger.warning("stored image %s is no longer readable (%s); downloading it again", path, err)
            path.unlink()
            return None
        try:
            self._check_size(width, height)
        except _FetchFailure as err:
            return FailedImage(url, err.reason, err.detail)
        return StoredImage(url=url, path=path.relative_to(self.out_dir).as_posix(), sha256=file_sha256(path),
                           bytes=path.stat().st_size, width=width, height=height, format=fmt, reused=True)

    def _download(self, url: str, folder: Path, key: str) -> StoredImage:
        tmp: Path | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{key}.", suffix=".part", dir=folder)
            tmp = Path(name)
            with os.fdopen(fd, "wb") as sink:
                sha256, size = _get(url, sink, self.fetch.timeout_s)  # network errors become _FetchFailure
                sink.flush()
                os.fsync(sink.fileno())  # the final name must never point at bytes still in flight
            fmt, width, height = self._verify(tmp)
            final = folder / f"{key}.{_FORMAT_EXTENSIONS.get(fmt, fmt.lower())}"
            os.chmod(tmp, self._mode)  # mkstemp makes 0600 files; outputs are shared like any other file
            os.replace(tmp, final)
        except OSError as err:  # local storage (disk full, permissions): no row is to blame, so it stops the run
            raise InputError(f"cannot store the download of {url} under {folder}: {err}") from err
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return StoredImage(url=url, path=final.relative_to(self.out_dir).as_posix(), sha256=sha256, bytes=size,
                           width=width, height=height, format=fmt, reused=False)

    def _check_size(self, width: int, height: int) -> None:
        if not check_erp_aspect(width, height):
            raise _FetchFailure("not_2to1", f"{width}x{height} (W x H) is not 2:1 within {ASPECT_TOLERANCE:.0%}",
                                transient=False)
        if width < self.image.min_width or height < self.image.min_height:
            raise _FetchFailure("too_small", f"{width}x{height} is below the minimum "
                                f"{self.image.min_width}x{self.image.min_height}", transient=False)

    def _verify(self, path: Path) -> tuple[str, int, int]:
        """Accept a download only if training could read it: identifiable, 2:1, large enough, decodable in full."""
        try:
            with Image.open(path) as img:
                fmt, (width, height) = img.format or "unknown", img.size
        except UnidentifiedImageError:
            raise _FetchFailure("not_an_image", "the body is not an image file", transient=False) from None
        except Image.DecompressionBombError:
            # load_erp refuses these too (PIL's pixel limit): training could not read the image.
            raise _FetchFailure("too_large", "more pixels than PIL's decompression-bomb limit", transient=False) \
                from None
        except (OSError, SyntaxError, ValueError):
            raise _FetchFailure("corrupt_image", "the image header cannot be read", transient=True) from None
        self._check_size(width, height)
        with self._decode_slots:
            try:
                load_erp(path)  # the very decode training does: modes, truncation, aspect
            except InputError as err:
                logger.debug("decode of %s failed: %s", path, err)
                # Without a Content-Length a cut body only shows here, so another attempt may succeed.
                raise _FetchFailure("corrupt_image", "the image cannot be decoded in full", transient=True) from None
        return fmt, width, height


def _fetch_all(urls: list[str], fetcher: _ImageFetcher, workers: int, progress: bool
               ) -> dict[str, StoredImage | FailedImage]:
    outcomes: dict[str, StoredImage | FailedImage] = {}
    counts: Counter[str] = Counter()
    bar = tqdm(total=len(urls), desc="prepare-data", unit="img", disable=not progress, mininterval=0.5)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare-data")
    try:
        futures = [pool.submit(fetcher, url) for url in urls]
        for future in concurrent.futures.as_completed(futures):
            outcome = future.result()
            outcomes[outcome.url] = outcome
            counts["failed" if isinstance(outcome, FailedImage) else "reused" if outcome.reused else "downloaded"] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return outcomes


# ------------------------------------------------------------------------------------------ CSVs


def read_published_csv(split: str, location: str, fetch: FetchPolicy) -> _SourceSplit:
    """Read a published split (path or http(s) URL): strict structure, every url an http(s) URL.

    Exact duplicate rows (same url, query and annotation — what training rejects) are set aside, not fatal.

    Raises:
        InputError: naming the CSV and line: unreadable, not UTF-8, malformed, missing column, empty field,
            a url that is not http(s), a header that already has a ``source_url`` column.
    """
    if _is_url(location):
        raw = fetch_bytes(location, fetch)
    else:
        try:
            raw = Path(location).read_bytes()
        except FileNotFoundError as err:
            raise InputError(f"published {split} CSV not found: {location}") from err
        except OSError as err:
            raise InputError(f"cannot read published {split} CSV {location}: {err}") from err
    header, rows = parse_csv_rows(location, decode_csv_bytes(raw, location))
    if SOURCE_URL_COLUMN in header:
        raise InputError(f"{location}: already has a {SOURCE_URL_COLUMN!r} column; give the published CSV, not a "
                         "prepared one")
    index = {c: header.index(c) for c in REQUIRED_COLUMNS}
    out = _SourceSplit(split=split, location=location, sha256=hashlib.sha256(raw).hexdigest(), header=header,
                       published_rows=len(rows))
    first_line: dict[tuple[str, str, str], int] = {}
    for line, fields in rows:
        url, query, annotation = (fields[index[c]] for c in REQUIRED_COLUMNS)
        for column, value in zip(REQUIRED_COLUMNS, (url, query, annotation), strict=True):
            if not value.strip():
                raise InputError(f"{location} line {line}: empty {column!r}")
        if not _is_url(url):
            raise InputError(f"{location} line {line}: url {url!r} is not an http(s) URL (prepare-data downloads "
                             "published image URLs; a CSV of local paths needs no preparation)")
        row = _SourceRow(line=line, fields=fields, url=url, query=query, annotation=annotation)
        key = (url, query, annotation)
        if key in first_line:
            out.duplicates.append((row, first_line[key]))
        else:
            first_line[key] = line
            out.rows.append(row)
    return out


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ the output folder


@contextlib.contextmanager
def _output_folder(out: Path) -> Iterator[None]:
    """Claim ``out`` for this run: refuse a folder we did not make, and hold an exclusive lock on our marker."""
    import fcntl  # POSIX only, like the clusters this runs on; imported here so the module imports anywhere

    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise InputError(f"output folder {out} is not empty and was not made by prepare-data (no {MARKER}); "
                         "refusing to write into it: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    with open(marker, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another prepare-data run is writing to {out} (its {MARKER} is locked)") from None
        if handle.tell() == 0:  # "a+" opens at the end: empty means new
            handle.write("folder written by panobench prepare-data; locked while a run writes into it\n")
            handle.flush()
        yield


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _clear_outputs(out: Path) -> None:
    """Remove the previous run's outputs, manifest first: a folder without a manifest is not a prepared dataset."""
    for name in (MANIFEST, DROPPED, *(f"{split}.csv" for split in SPLITS)):
        _remove(out / name)
    stale = sorted((out / IMAGES_DIR).glob("*/.*.part"))
    for path in stale:  # left by a killed run; the lock guarantees no live run owns them
        _remove(path)
    if stale:
        logger.info("removed %d partial download(s) left by an interrupted run", len(stale))


def _prune(out: Path, keep: set[str]) -> int:
    """Delete stored images that the prepared CSVs do not name (failed the current policy, or no longer listed)."""
    removed = 0
    for path in sorted((out / IMAGES_DIR).glob("*/*")):
        if path.is_file() and not path.name.startswith(".") and path.relative_to(out).as_posix() not in keep:
            path.unlink()
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------ prepare


def _failure_message(failed_rows: list[tuple[_SourceSplit, _SourceRow, FailedImage]], images: int) -> str:
    listed = "; ".join(f"{s.location} line {r.line}: {r.url}: {f.reason} ({f.detail})"
                       for s, r, f in failed_rows[:_LISTED_FAILURES])
    more = f"; and {len(failed_rows) - _LISTED_FAILURES} more" if len(failed_rows) > _LISTED_FAILURES else ""
    return (f"{len(failed_rows)} row(s) ({images} image URL(s)) could not be obtained or failed verification "
            f"(on_missing: fail): {listed}{more}. Images already stored are kept for a re-run; "
            "--on-missing drop (source.on_missing: drop) drops these rows and lists them in dropped.csv")


def prepare_data(
    sources: Mapping[str, str],
    out_dir: str | os.PathLike,
    *,
    on_missing: str = "fail",
    image_policy: ImagePolicy | None = None,
    fetch_policy: FetchPolicy | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Download, verify and pin a dataset given its published CSVs ``{train, valid, test: path or URL}``.

    Args:
        sources: The published CSV of each split (``url,query,annotation`` plus any extra columns).
        out_dir: The prepared folder (new, empty, or an earlier output of this function).
        on_missing: ``fail``: any row whose image cannot be obtained or fails verification fails the run
            (``InputError`` naming the count and the first rows; no CSV or manifest is written, stored images are
            kept). ``drop``: such rows are dropped and listed in ``dropped.csv``.
        image_policy: Minimum size (the 2:1 aspect and full decodability are not negotiable).
        fetch_policy: Concurrency, timeout, retries, backoff.
        progress: Show a progress bar (stderr).

    Returns:
        Counts and the manifest written.

    Raises:
        InputError: a published CSV is missing or malformed, the output folder is foreign or locked, images are
            missing under ``on_missing: fail``, or a split ends up with no rows.
        ConfigError: a bad policy value or split set.
    """
    image_policy = image_policy or ImagePolicy()
    fetch_policy = fetch_policy or FetchPolicy()
    if on_missing not in ON_MISSING:
        raise ConfigError(f"on_missing must be one of {list(ON_MISSING)}, got {on_missing!r}")
    if sorted(sources) != sorted(SPLITS):
        raise ConfigError(f"prepare-data needs exactly the splits {list(SPLITS)}, got {sorted(sources)}")
    out = Path(out_dir)
    for split in SPLITS:
        location = sources[split]
        if not _is_url(location) and Path(location).resolve().is_relative_to(out.resolve()):
            raise InputError(f"published {split} CSV {location} lies inside the output folder {out}; keep the "
                             "published CSVs elsewhere (the prepared CSVs are written there)")
    published = {split: read_published_csv(split, sources[split], fetch_policy) for split in SPLITS}
    urls = list(dict.fromkeys(row.url for split in SPLITS for row in published[split].rows))
    logger.info("published CSVs: %s rows, %d exact duplicates, %d distinct image URLs",
                {s: p.published_rows for s, p in published.items()},
                sum(len(p.duplicates) for p in published.values()), len(urls))

    with _output_folder(out):
        _clear_outputs(out)
        fetcher = _ImageFetcher(out / IMAGES_DIR, fetch_policy, image_policy)
        outcomes = _fetch_all(urls, fetcher, fetch_policy.workers, progress)
        stored = {u: o for u, o in outcomes.items() if isinstance(o, StoredImage)}
        failed = {u: o for u, o in outcomes.items() if isinstance(o, FailedImage)}
        for failure in sorted(failed.values(), key=lambda f: f.url):
            logger.info("unavailable: %s: %s (%s)", failure.url, failure.reason, failure.detail)
        failed_rows = [(published[s], row, failed[row.url]) for s in SPLITS for row in published[s].rows
                       if row.url in failed]
        if failed_rows and on_missing == "fail":
            raise InputError(_failure_message(failed_rows, len(failed)))

        csv_sha: dict[str, str] = {}
        texts: dict[str, str] = {}
        split_records: dict[str, dict[str, Any]] = {}
        dropped_rows: list[list[str]] = []
        for split in SPLITS:
            source = published[split]
            url_index = source.header.index("url")
            kept: list[list[str]] = []
            reasons: Counter[str] = Counter()
            dropped_here: list[tuple[int, list[str]]] = []
            for row, first in source.duplicates:
                reasons["duplicate_row"] += 1
                dropped_here.append((row.line, [split, str(row.line), row.url, row.query, row.annotation,
                                                "duplicate_row", f"same url, query and annotation as line {first}"]))
            for row in source.rows:
                if row.url in failed:
                    failure = failed[row.url]
                    reasons[failure.reason] += 1
                    dropped_here.append((row.line, [split, str(row.line), row.url, row.query, row.annotation,
                                                    failure.reason, failure.detail]))
                    continue
                fields = list(row.fields)
                fields[url_index] = stored[row.url].path
                kept.append([*fields, row.url])
            if not kept:
                raise InputError(f"published {split} CSV {source.location}: no row is left after dropping "
                                 f"{sum(reasons.values())} ({dict(sorted(reasons.items()))})")
            dropped_rows.extend(fields for _, fields in sorted(dropped_here, key=lambda item: item[0]))
            texts[split] = _csv_text([*source.header, SOURCE_URL_COLUMN], kept)
            csv_sha[split] = _sha256_text(texts[split])
            split_records[split] = {
                "csv": f"{split}.csv", "sha256": csv_sha[split], "rows": len(kept),
                "images": len({fields[url_index] for fields in kept}),
                "dropped_rows": dict(sorted(reasons.items())),
            }
            logger.info("%s: %d published rows -> %d kept; dropped: %s", split, source.published_rows, len(kept),
                        dict(sorted(reasons.items())) or "none")

        referenced = {stored[row.url].path: stored[row.url] for s in SPLITS for row in published[s].rows
                      if row.url in stored}
        pruned = _prune(out, set(referenced))
        if pruned:
            logger.info("removed %d stored image(s) that the prepared CSVs do not use", pruned)
        dropped_text = _csv_text(["split", "line", "source_url", "query", "annotation", "reason", "detail"],
                                 dropped_rows)
        manifest = {
            "generator": GENERATOR,
            "format": MANIFEST_FORMAT,
            "fingerprint": fingerprint_of(csv_sha, {p: img.sha256 for p, img in referenced.items()}),
            "fingerprint_format": FINGERPRINT_FORMAT,
            "policy": {"on_missing": on_missing, **image_policy.to_record()},
            "sources": {s: {"location": published[s].location, "sha256": published[s].sha256,
                            "rows": published[s].published_rows, "duplicate_rows": len(published[s].duplicates)}
                        for s in SPLITS},
            "splits": split_records,
            "dropped": {"csv": DROPPED, "sha256": _sha256_text(dropped_text), "rows": len(dropped_rows)},
            "images": [{"path": img.path, "source_url": img.url, "sha256": img.sha256, "bytes": img.bytes,
                        "width": img.width, "height": img.height, "format": img.format}
                       for _, img in sorted(referenced.items())],
        }
        for split in SPLITS:
            write_text_atomic(out / f"{split}.csv", texts[split])
        write_text_atomic(out / DROPPED, dropped_text)
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: it marks completion

    downloaded = sum(1 for img in stored.values() if not img.reused)
    logger.info("prepared %s: %d images (%d downloaded now, %d reused), %d image URLs failed, %d rows dropped; "
                "fingerprint %s", out, len(referenced), downloaded, len(stored) - downloaded, len(failed),
                len(dropped_rows), manifest["fingerprint"])
    return PrepareResult(out_dir=out, manifest=manifest, downloaded=downloaded, reused=len(stored) - downloaded,
                         failed=len(failed))


# ------------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class VerifyReport:
    """How a prepared folder differs from its manifest."""

    out_dir: Path
    files: int                        # files the manifest lists (CSVs, dropped.csv, images)
    changed: list[str]                # relative paths whose SHA-256 differs
    missing: list[str]
    extra: list[str]                  # files the manifest does not list (the manifest and marker excepted)
    fingerprint: str                  # the manifest's
    fingerprint_consistent: bool      # the manifest's fingerprint equals the one its own hashes give

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra) and self.fingerprint_consistent


def _manifest_path(out: Path, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise InputError(f"{out / MANIFEST}: {what} path {value!r} is not a relative path inside the folder")
    return value


def _load_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} not found: {out} is not a prepared dataset (or its preparation did not finish)") \
            from None
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR \
            or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path} is not a {GENERATOR} manifest of format {MANIFEST_FORMAT}")
    return manifest


def verify_prepared(out_dir: str | os.PathLike, *, workers: int = 8, progress: bool = True) -> VerifyReport:
    """Re-hash a prepared folder and compare it with its ``manifest.json`` (what a second lab runs first).

    Raises:
        InputError: the manifest is missing, unreadable or not ours.
    """
    out = Path(out_dir)
    manifest = _load_manifest(out)
    try:
        splits = {split: (_manifest_path(out, rec["csv"], f"splits.{split}.csv"), rec["sha256"])
                  for split, rec in manifest["splits"].items()}
        expected = {path: sha for path, sha in splits.values()}
        expected[_manifest_path(out, manifest["dropped"]["csv"], "dropped.csv")] = manifest["dropped"]["sha256"]
        images = {_manifest_path(out, img["path"], "image"): img["sha256"] for img in manifest["images"]}
        fingerprint = manifest["fingerprint"]
    except (KeyError, TypeError) as err:
        raise InputError(f"{out / MANIFEST}: malformed manifest ({type(err).__name__}: {err})") from err
    expected.update(images)
    consistent = fingerprint_of({s: sha for s, (_, sha) in splits.items()}, images) == fingerprint

    def actual(rel: str) -> str | None:
        path = out / rel
        return file_sha256(path) if path.is_file() else None

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        hashes = dict(zip(expected, tqdm(pool.map(actual, expected), total=len(expected), desc="verify",
                                         unit="file", disable=not progress, mininterval=0.5), strict=True))
    missing = sorted(rel for rel, sha in hashes.items() if sha is None)
    changed = sorted(rel for rel, sha in hashes.items() if sha is not None and sha != expected[rel])
    present = {Path(root, name).relative_to(out).as_posix() for root, _, names in os.walk(out) for name in names}
    extra = sorted(present - set(expected) - {MANIFEST, MARKER})
    return VerifyReport(out_dir=out, files=len(expected), changed=changed, missing=missing, extra=extra,
                        fingerprint=str(fingerprint), fingerprint_consistent=consistent)
