"""Caption metrics: pycocoevalcap's PTB tokenizer, BLEU 1-4, METEOR, ROUGE-L, CIDEr and (optional) SPICE.

Scoring is over **grouped references** (SPEC §2.5): each group id (one image + query) has exactly one
candidate and all of its references; BLEU/CIDEr are corpus-level over the groups, METEOR/ROUGE-L are the
pycocoevalcap means over the groups.

Two deliberate departures from calling pycocoevalcap naively, both output-identical on ordinary input:

* **Tokenization** runs the same Java command as ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``
  (the ``stanford-corenlp-3.4.1.jar`` shipped inside the installed pycocoevalcap,
  ``edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase``, then the same punctuation list
  removed), but with its temporary input file and working directory in a fresh writable temp dir
  (``tempfile``, i.e. ``$TMPDIR``) instead of the package directory, which is read-only inside a container
  image. The jar is read in place; nothing is written next to it.
  Captions are joined one per line, so pycocoevalcap replaces ``"\\n"`` inside a caption by a space; it does
  not do so for the other characters the tokenizer also treats as line breaks (``"\\r"``, ``"\\u2028"``,
  ...), which silently shifts every later caption onto the wrong id. We replace every character that
  :meth:`str.splitlines` breaks on, and check that the tokenizer returns exactly one line per caption.
* **SPICE** is run only when the Stanford CoreNLP 3.6.0 jars are already on disk
  (``PANOBENCH_SPICE_LIB`` / the ``spice_lib`` argument / pycocoevalcap's ``spice/lib``); pycocoevalcap's
  ``Spice()`` would download them mid-run, so it is never constructed. Its LMDB cache and temp files go to a
  writable temp dir.

METEOR uses pycocoevalcap's ``Meteor`` class unchanged: it runs ``java -jar -Xmx2G meteor-1.5.jar - - -stdio
-l en -norm`` with cwd = its package dir, which it only reads (the jar and ``data/paraphrase-en.gz``); all
I/O goes through stdin/stdout. One such process is kept per Python process (its start-up costs ~10 s of CPU);
each ``EVAL`` line is scored from the statistics sent with it, so calls do not influence each other.
Bleu/Rouge/Cider are pure Python.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from panobench.errors import InputError, PanobenchError

logger = logging.getLogger(__name__)

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
PTB_JAR = "stanford-corenlp-3.4.1.jar"
TOKENIZER_NAME = "PTB (stanford-corenlp-3.4.1)"
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_LIB_ENV = "PANOBENCH_SPICE_LIB"
JAVA_HINT = ("Java (JRE >= 8) is required by pycocoevalcap's PTB tokenizer and METEOR; "
             "install e.g. `apt-get install default-jre-headless`")
# How to get the SPICE jars onto a machine (the container image does this at build time).
SPICE_HINT = (f"provide {' and '.join(SPICE_CORENLP_JARS)} (from stanford-corenlp-full-2015-12-09.zip) in a "
              f"directory named by ${SPICE_LIB_ENV} or in pycocoevalcap's spice/lib/; panobench never downloads them")


class JavaMissingError(PanobenchError):
    """No usable ``java`` executable: the PTB tokenizer and METEOR cannot run."""


class MetricError(PanobenchError):
    """An external scorer (Java) failed or returned output that does not line up with its input."""


def pycocoevalcap_dir() -> Path:
    """Directory of the installed pycocoevalcap package (a namespace package: no ``__init__.py``)."""
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__))).resolve()


def pycocoevalcap_version() -> str:
    try:
        return metadata.version("pycocoevalcap")
    except metadata.PackageNotFoundError:  # vendored / source checkout
        return "unknown"


def check_java() -> str:
    """Return the first line of ``java -version``; raise :class:`JavaMissingError` if Java cannot run."""
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(f"{JAVA_HINT} (no `java` on PATH)")
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise JavaMissingError(f"{JAVA_HINT} (`{java} -version` failed: {err})") from err
    if proc.returncode != 0:
        raise JavaMissingError(f"{JAVA_HINT} (`{java} -version` exited {proc.returncode}: {proc.stderr.strip()[:200]})")
    return (proc.stderr or proc.stdout).strip().splitlines()[0]


def _one_line(text: str) -> str:
    """Replace every line-break character (as :meth:`str.splitlines` sees them) by a space."""
    return " ".join(text.splitlines()) if text else text


def ptb_tokenize(captions: Mapping[str, Sequence[str]], *, package_dir: str | os.PathLike | None = None
                 ) -> dict[str, list[str]]:
    """Tokenize like ``PTBTokenizer().tokenize`` without writing into the pycocoevalcap package dir.

    Args:
        captions: ``{id: [caption, ...]}`` (plain strings, not pycocoevalcap's ``{"caption": ...}`` dicts).
        package_dir: pycocoevalcap package directory holding ``tokenizer/stanford-corenlp-3.4.1.jar``;
            default: the installed one.

    Returns:
        ``{id: [lowercased, PTB-tokenized caption with punctuation tokens removed, ...]}`` in input order.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(f"{JAVA_HINT} (no `java` on PATH)")
    jar = Path(package_dir or pycocoevalcap_dir()) / "tokenizer" / PTB_JAR
    if not jar.is_file():
        raise MetricError(f"PTB tokenizer jar not found: {jar} (is pycocoevalcap installed completely?)")
    ids = [key for key, caps in captions.items() for _ in caps]
    lines = [_one_line(cap) for caps in captions.values() for cap in caps]
    if not lines:
        return {key: [] for key in captions}
    with tempfile.TemporaryDirectory(prefix="panobench-ptb-") as tmp:
        tmp_file = Path(tmp) / "captions.txt"
        tmp_file.write_bytes("\n".join(lines).encode("utf-8"))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               tmp_file.name]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise MetricError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    logger.debug("PTB tokenizer: %s", proc.stderr.decode(errors="replace").strip())
    out_lines = proc.stdout.decode().split("\n")
    # The tokenizer ends its output with a newline; anything but one line per caption would misalign ids.
    if out_lines and out_lines[-1] == "" and len(out_lines) == len(lines) + 1:
        out_lines = out_lines[:-1]
    if len(out_lines) != len(lines):
        raise MetricError(f"PTB tokenizer returned {len(out_lines)} lines for {len(lines)} captions")
    tokenized: dict[str, list[str]] = {key: [] for key in captions}
    for key, line in zip(ids, out_lines, strict=True):
        tokenized[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS))
    return tokenized


def _validate(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> None:
    ref_ids, cand_ids = set(references), set(candidates)
    if ref_ids != cand_ids:
        no_cand = sorted(ref_ids - cand_ids, key=str)
        no_ref = sorted(cand_ids - ref_ids, key=str)
        raise InputError(f"reference and candidate ids differ: {len(no_cand)} id(s) without a candidate "
                         f"(e.g. {no_cand[:5]}), {len(no_ref)} id(s) without references (e.g. {no_ref[:5]})")
    if not references:
        raise InputError("nothing to score: no reference groups")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise InputError(f"group {key!r}: references must be a non-empty list of strings, got {refs!r}")
        for ref in refs:
            if not isinstance(ref, str) or not ref.strip():
                raise InputError(f"group {key!r}: empty or non-string reference {ref!r}")
        if not isinstance(candidates[key], str):
            raise InputError(f"group {key!r}: candidate must be a string, got {candidates[key]!r}")


def _normalize_spice(spice: bool | str) -> bool | str:
    if spice in (True, "on", "true"):
        return True
    if spice in (False, "off", "false"):
        return False
    if spice == "auto":
        return "auto"
    raise ValueError(f"spice={spice!r}; expected one of True, False, 'auto', 'on', 'off'")


def find_spice_jars(spice_lib: str | os.PathLike | None = None) -> tuple[list[Path] | None, str]:
    """Locate the CoreNLP 3.6.0 jars SPICE needs, without downloading anything.

    Looks in ``spice_lib``, else ``$PANOBENCH_SPICE_LIB``, else pycocoevalcap's ``spice/lib``.

    Returns:
        ``(jar paths, where)`` when both jars exist, else ``(None, reason)``.
    """
    if spice_lib is not None:
        lib, origin = Path(spice_lib), "spice_lib argument"
    elif os.environ.get(SPICE_LIB_ENV):
        lib, origin = Path(os.environ[SPICE_LIB_ENV]), f"${SPICE_LIB_ENV}"
    else:
        lib, origin = pycocoevalcap_dir() / "spice" / "lib", "pycocoevalcap spice/lib"
    jars = [lib / name for name in SPICE_CORENLP_JARS]
    missing = [j.name for j in jars if not j.is_file()]
    if missing:
        return None, f"SPICE skipped: {', '.join(missing)} not found in {lib} ({origin}); {SPICE_HINT}"
    return jars, f"{lib} ({origin})"


# One METEOR Java process per Python process: starting it loads the paraphrase table (~10 s of CPU), which
# would otherwise dominate scoring a small split. Meteor.compute_score serialises callers with its own lock.
_METEOR: Any = None


def _meteor() -> Any:
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def _close_meteor() -> None:
    """Stop the shared METEOR process (after a failure; a healthy one simply ends with the interpreter)."""
    global _METEOR
    meteor, _METEOR = _METEOR, None
    if meteor is not None:
        meteor.meteor_p.kill()
        if meteor.lock.locked():  # compute_score keeps its lock when it fails; Meteor.__del__ would then hang
            meteor.lock.release()


def _run_spice(gts: Mapping[str, list[str]], res: Mapping[str, list[str]], corenlp_jars: list[Path]
               ) -> tuple[float, dict[str, float]]:
    """Run ``spice-1.0.jar`` like pycocoevalcap's ``Spice.compute_score`` but with all files in a temp dir."""
    spice_dir = pycocoevalcap_dir() / "spice"
    # The spice jar's manifest names its lib/ jars relative to itself; the CoreNLP jars may live elsewhere,
    # so they are put on the classpath explicitly.
    classpath = os.pathsep.join([str(spice_dir / "spice-1.0.jar"), str(spice_dir / "lib" / "*"),
                                 *(str(j) for j in corenlp_jars)])
    ids = sorted(gts)
    with tempfile.TemporaryDirectory(prefix="panobench-spice-") as tmp:
        in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
        in_file.write_text(json.dumps([{"image_id": i, "test": res[i][0], "refs": list(gts[i])} for i in ids]),
                           encoding="utf-8")
        cmd = ["java", "-Xmx8G", "-cp", classpath, "edu.anu.spice.SpiceScorer", str(in_file),
               "-cache", str(Path(tmp) / "cache"), "-out", str(out_file), "-subset", "-silent"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not out_file.is_file():
            raise MetricError(f"SPICE failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        results = json.loads(out_file.read_text(encoding="utf-8"))

    def as_float(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    per_item = {str(item["image_id"]): as_float(item["scores"]["All"]["f"]) for item in results}
    if set(per_item) != set(ids):
        raise MetricError(f"SPICE returned scores for {len(per_item)} ids, expected {len(ids)}")
    return sum(per_item.values()) / len(per_item), per_item


def ptb_tokenize_texts(texts: Sequence[str], *, package_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """``{text: tokenized}`` for every distinct text, in one tokenizer run (one JVM start for many files).

    ``-preserveLines`` tokenizes each line on its own, so the result equals tokenizing every text separately.
    """
    unique = list(dict.fromkeys(texts))
    tokenized = ptb_tokenize({str(i): [text] for i, text in enumerate(unique)}, package_dir=package_dir)
    return {text: tokenized[str(i)][0] for i, text in enumerate(unique)}


def score_captions(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str], *,
                   spice: bool | str = "auto", tokenize: bool = True, per_item: bool = False,
                   spice_lib: str | os.PathLike | None = None,
                   tokenized: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Score one candidate per group against all of that group's references.

    Args:
        references: ``{group_id: [reference, ...]}`` (non-empty lists of non-empty strings).
        candidates: ``{group_id: candidate}``; the same ids. An empty candidate is scored as empty.
        spice: ``"auto"`` (run SPICE if its jars are present; a run-time failure gives null + reason),
            ``True`` (jars must be present and SPICE must succeed, else an error), ``False`` (never).
        tokenize: PTB-tokenize (the COCO pipeline). ``False`` only ``str.strip()``s the text, as nlg-eval does.
        per_item: also return ``"per_item": {group_id: {metric: score}}``.
        spice_lib: directory holding the CoreNLP 3.6.0 jars (overrides ``$PANOBENCH_SPICE_LIB``).
        tokenized: ``{text: PTB-tokenized text}`` covering every reference and candidate, from
            ``ptb_tokenize_texts`` (scoring several files with one tokenizer run); used instead of tokenizing here.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr": float, "SPICE": float | None,
        "SPICE_reason": str | None, "num_groups": int, "num_references": int, "empty_candidates": int}``
        (+ ``"per_item"``).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    spice_mode = _normalize_spice(spice)
    _validate(references, candidates)
    check_java()
    spice_jars, spice_where = find_spice_jars(spice_lib) if spice_mode is not False else (None, "")
    if spice_mode is True and spice_jars is None:  # fail before the minutes of scoring, not after
        raise MetricError(spice_where)
    ids = list(references)
    empty = [key for key in ids if not candidates[key].strip()]
    if empty:
        logger.warning("%d of %d candidates are empty (e.g. %s); they are scored as empty strings",
                       len(empty), len(ids), empty[:3])

    if tokenize and tokenized is not None:
        gts = {key: [tokenized[ref] for ref in references[key]] for key in ids}
        res = {key: [tokenized[candidates[key]]] for key in ids}
    elif tokenize:
        gts = ptb_tokenize({key: list(references[key]) for key in ids})
        res = ptb_tokenize({key: [candidates[key]] for key in ids})
    else:
        for key in ids:
            if any(len(text.splitlines()) > 1 for text in [*references[key], candidates[key]]):
                raise InputError(f"group {key!r}: a caption contains a line break; with tokenize=False captions "
                                 "must be single lines (METEOR's stdin protocol is line based)")
        gts = {key: [ref.strip() for ref in references[key]] for key in ids}
        res = {key: [candidates[key].strip()] for key in ids}

    result: dict[str, Any] = {}
    items: dict[str, dict[str, float]] = {key: {} for key in ids}

    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        result[f"Bleu_{n + 1}"] = float(bleu[n])
        for key, value in zip(ids, bleu_items[n], strict=True):
            items[key][f"Bleu_{n + 1}"] = float(value)

    meteor = _meteor()
    try:
        value, meteor_items = meteor.compute_score(gts, res)
    except (ValueError, BrokenPipeError) as err:  # the jar died: its stdout ended early
        _close_meteor()
        raise MetricError(f"METEOR failed: {err}") from err
    result["METEOR"] = float(value)
    for key, v in zip(ids, meteor_items, strict=True):
        items[key]["METEOR"] = float(v)

    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        value, scores = scorer.compute_score(gts, res)
        result[name] = float(value)
        for key, v in zip(ids, scores, strict=True):
            items[key][name] = float(v)

    result["SPICE"], result["SPICE_reason"] = None, None
    if spice_mode is False:
        result["SPICE_reason"] = "SPICE disabled (spice=off)"
    elif spice_jars is None:
        result["SPICE_reason"] = spice_where
    else:
        try:
            value, spice_items = _run_spice(gts, res, spice_jars)
        except MetricError as err:
            if spice_mode is True:
                raise
            result["SPICE_reason"] = f"SPICE failed with jars from {spice_where}: {err}"
        else:
            result["SPICE"] = float(value)
            for key in ids:
                items[key]["SPICE"] = spice_items[key]
    if result["SPICE_reason"]:
        logger.info("%s", result["SPICE_reason"])

    result["num_groups"] = len(ids)
    result["num_references"] = sum(len(references[key]) for key in ids)
    result["empty_candidates"] = len(empty)
    if per_item:
        result["per_item"] = items
    return result
