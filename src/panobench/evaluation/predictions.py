"""The predictions file shared by generation and scoring, and scoring such a file into ``metrics.json``.

``predictions.csv`` has one row per reference group (one image + query; SPEC §2.5) and the columns
:data:`PREDICTION_COLUMNS`. ``references`` holds a JSON-encoded list of strings, so commas, quotes and
newlines inside references survive the CSV round trip. Extra columns are allowed and kept.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from panobench.errors import InputError
from panobench.evaluation import metrics
from panobench.utils.io import atomic_path, read_json, write_json_atomic

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["sample_id", "image", "query", "prediction", "references"]
# Written by the generate step beside predictions.csv; merged into metrics.json under "generation".
GENERATION_SIDECAR = "generation.json"


def write_predictions(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` (each with :data:`PREDICTION_COLUMNS`; ``references`` a list of str) atomically."""
    rows = list(rows)
    extra_cols = [c for c in (rows[0] if rows else {}) if c not in PREDICTION_COLUMNS]
    seen: set[str] = set()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS + extra_cols)
        writer.writeheader()
        for i, row in enumerate(rows):
            missing = [c for c in PREDICTION_COLUMNS if c not in row]
            if missing:
                raise InputError(f"{path}: prediction row {i} lacks {missing}")
            refs = row["references"]
            if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
                raise InputError(f"{path}: row {i} (sample_id {row['sample_id']!r}): references must be a list of "
                                 f"strings, got {refs!r}")
            sample_id = str(row["sample_id"])
            if sample_id in seen:
                raise InputError(f"{path}: duplicate sample_id {sample_id!r} (row {i})")
            seen.add(sample_id)
            writer.writerow({**row, "sample_id": sample_id, "references": json.dumps(list(refs), ensure_ascii=False)})


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a predictions CSV; ``references`` comes back as a list of str per row.

    Raises:
        InputError: naming the file and line of a missing column, a short/long row, references that are
            not a non-empty JSON list of strings, or a duplicate ``sample_id``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"predictions file not found: {path}")
    records: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise InputError(f"{path}: empty file (expected header {','.join(PREDICTION_COLUMNS)})")
        missing = [c for c in PREDICTION_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path}: line 1: missing column(s) {missing}; header is {header}")
        line = reader.line_num + 1  # first line of the next record (records may span lines)
        try:
            for row in reader:
                where = f"{path}: line {line}"
                if None in row or None in row.values():
                    raise InputError(f"{where}: expected {len(header)} fields, got a row with a different count")
                try:
                    refs = json.loads(row["references"])
                except json.JSONDecodeError as err:
                    raise InputError(f"{where}: references is not valid JSON ({err.msg}): "
                                     f"{row['references'][:80]!r}") from err
                if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                    raise InputError(f"{where}: references must be a non-empty JSON list of strings, got "
                                     f"{row['references'][:80]!r}")
                sample_id = row["sample_id"]
                if sample_id in first_line:
                    raise InputError(f"{where}: duplicate sample_id {sample_id!r} (first on line "
                                     f"{first_line[sample_id]})")
                first_line[sample_id] = line
                records.append({**row, "references": refs})
                line = reader.line_num + 1
        except csv.Error as err:
            raise InputError(f"{path}: line {reader.line_num}: malformed CSV ({err})") from err
    if not records:
        raise InputError(f"{path}: no prediction rows")
    return pd.DataFrame.from_records(records, columns=list(header))


def _first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,;:!?\"'") if words else ""


def first_word_matches(prediction: str, references: Sequence[str]) -> bool:
    """Whether the prediction's first word (lower-cased, punctuation stripped) is the first word of some reference."""
    first = _first_word(prediction)
    return bool(first) and any(first == _first_word(ref) for ref in references)


def score_predictions_files(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], *,
                            spice: bool | str = "auto", spice_lib: str | os.PathLike | None = None
                            ) -> list[dict[str, Any]]:
    """Score several ``(predictions.csv, metrics.json)`` pairs; each file is scored on its own (CIDEr's document
    frequencies come from that file alone), but the Java start-ups are shared: every caption of every file is
    PTB-tokenized in one run, and METEOR's process (whose paraphrase table takes seconds to load) is reused.

    All files are read and checked before anything is scored or written.
    """
    frames = [read_predictions(Path(csv)) for csv, _ in pairs]
    texts = [text for frame in frames for refs in frame["references"] for text in refs]
    texts += [text for frame in frames for text in frame["prediction"]]
    tokenized = metrics.ptb_tokenize_texts(texts)
    return [score_predictions_file(csv, out, spice=spice, spice_lib=spice_lib, frame=frame, tokenized=tokenized)
            for (csv, out), frame in zip(pairs, frames, strict=True)]


def score_predictions_file(predictions_csv: str | os.PathLike, out_json: str | os.PathLike, *,
                           extra: Mapping[str, Any] | None = None, spice: bool | str = "auto",
                           spice_lib: str | os.PathLike | None = None, frame: pd.DataFrame | None = None,
                           tokenized: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Score ``predictions_csv`` and write ``metrics.json`` atomically; return what was written.

    If ``generation.json`` (decoding config, generation speed, ... from the generate step) sits beside
    ``predictions_csv`` it is copied in under ``"generation"``; ``extra`` keys are merged at the top level.
    ``frame``/``tokenized``: the file already read and its captions already tokenized (``score_predictions_files``).
    """
    predictions_csv = Path(predictions_csv)
    if frame is None:
        frame = read_predictions(predictions_csv)
    references = dict(zip(frame["sample_id"], frame["references"], strict=True))
    candidates = dict(zip(frame["sample_id"], frame["prediction"], strict=True))
    scores = metrics.score_captions(references, candidates, spice=spice, spice_lib=spice_lib, tokenized=tokenized)
    lengths = [len(text.split()) for text in frame["prediction"]]
    first_words = [first_word_matches(pred, refs) for pred, refs in zip(frame["prediction"], frame["references"],
                                                                         strict=True)]
    payload: dict[str, Any] = {
        "metrics": {name: scores[name] for name in metrics.METRIC_NAMES},
        "SPICE_reason": scores["SPICE_reason"],
        "num_groups": scores["num_groups"],
        "num_references": scores["num_references"],
        "empty_predictions": scores["empty_candidates"],
        "mean_prediction_length_words": sum(lengths) / len(lengths),
        # Share of predictions whose first word starts at least one reference: a caption that loses its first word
        # ("are three objects …") is visible here at once, while n-gram metrics only drift.
        "first_word_match_rate": sum(first_words) / len(first_words),
        "tokenizer": metrics.TOKENIZER_NAME,
        "pycocoevalcap_version": metrics.pycocoevalcap_version(),
        "predictions": str(predictions_csv),
    }
    sidecar = predictions_csv.parent / GENERATION_SIDECAR
    if sidecar.is_file():
        try:
            payload["generation"] = read_json(sidecar)
        except json.JSONDecodeError as err:
            raise InputError(f"{sidecar}: invalid JSON ({err})") from err
    payload.update(extra or {})
    write_json_atomic(out_json, payload)
    logger.info("scored %d groups (%d references) from %s -> %s: CIDEr %.4f, Bleu_4 %.4f",
                payload["num_groups"], payload["num_references"], predictions_csv, out_json,
                payload["metrics"]["CIDEr"], payload["metrics"]["Bleu_4"])
    return payload
