"""Caption metrics: the wrapper equals pycocoevalcap, reproduces published scores, groups references,
works with a read-only package dir, and fails clearly without Java / never downloads SPICE jars."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from panobench.cli import main
from panobench.errors import InputError
from panobench.evaluation import metrics
from panobench.evaluation.metrics import (
    JavaMissingError,
    MetricError,
    ptb_tokenize,
    pycocoevalcap_dir,
    score_captions,
)
from panobench.evaluation.predictions import (
    PREDICTION_COLUMNS,
    read_predictions,
    score_predictions_file,
    write_predictions,
)

SCORED = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
REPO_ROOT = Path(__file__).resolve().parents[2]

# Punctuation, capitals, an embedded newline, a non-ASCII word, brackets, a 6-reference group.
REFS = {
    "img1|sofa": ["A red sofa, next to the WINDOW.", "The sofa is red!\nIt faces the window.",
                  "red couch by a window"],
    "img2|sky": ["Blue sky (clear) -- no clouds...", "A cloudless blue sky; bright."],
    "img3|tree": ["A tall green tree.", "Green tree on the left.", "A tree stands at 90° yaw.",
                  "Tree, tall & green.", "The tree's leaves are green.", "One green tree."],
}
CANDS = {"img1|sofa": "A red sofa near the window.", "img2|sky": "The sky is blue, and clear!",
         "img3|tree": "a tall green tree"}


def _reference_cases() -> Path:
    for root in (REPO_ROOT.parent / "shared", Path("/work/shared")):
        path = root / "reference-cases" / "captions"
        if path.is_dir():
            return path
    pytest.fail(f"caption reference cases not found under {REPO_ROOT.parent / 'shared'} or /work/shared")


def _direct_pycocoevalcap(refs: dict, cands: dict) -> dict[str, float]:
    """The COCO pipeline called directly: PTBTokenizer then Bleu(4)/Meteor/Rouge/Cider."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": cands[k]}] for k in refs})
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": b for i, b in enumerate(bleu)})
    out["METEOR"], _ = Meteor().compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_ptb_tokenize_equals_pycocoevalcap_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {**REFS, "odd": ["Le test est en français.", "", "A dog's toy (red) costs $5... ok?", "“Quoted” text"]}
    expected = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    assert ptb_tokenize(captions) == expected
    assert expected["img1|sofa"][1] == "the sofa is red it faces the window"  # newline -> space, punct dropped


def test_line_separators_do_not_shift_captions():
    # pycocoevalcap would split "a\rb" into two lines and shift every later caption onto the wrong id.
    out = ptb_tokenize({"a": ["one\rtwo", "x\u2028y"], "b": ["three"]})
    assert out == {"a": ["one two", "x y"], "b": ["three"]}


def test_wrapper_equals_direct_pycocoevalcap():
    ours = score_captions(REFS, CANDS, spice=False, per_item=True)
    direct = _direct_pycocoevalcap(REFS, CANDS)
    for name in SCORED:
        assert ours[name] == pytest.approx(direct[name], abs=1e-9), name
    assert 0 < ours["CIDEr"] and 0 < ours["Bleu_4"] < 1
    assert ours["num_groups"] == 3 and ours["num_references"] == 11 and ours["empty_candidates"] == 0
    assert set(ours["per_item"]) == set(REFS) and set(ours["per_item"]["img3|tree"]) == set(SCORED)
    assert ours["SPICE"] is None and "off" in ours["SPICE_reason"]


def test_reproduces_visionmetrics_coco5k():
    case = _reference_cases() / "visionmetrics_coco5k"
    with gzip.open(case / "refs.json.gz", "rt", encoding="utf-8") as f:
        refs = json.load(f)
    with gzip.open(case / "cands.json.gz", "rt", encoding="utf-8") as f:
        cands = json.load(f)
    expected = json.loads((case / "expected.json").read_text())
    assert len(refs) == 5000 and any("\n" in r for rs in refs.values() for r in rs)
    ours = score_captions(refs, cands, spice=False)
    for name in SCORED:
        assert ours[name] == pytest.approx(expected[name], abs=1e-6), name
    assert ours["num_references"] == 25010


def _places5(actual: float, expected: float) -> bool:
    return round(actual - expected, 5) == 0  # unittest's assertAlmostEqual(places=5)


def test_reproduces_nlgeval_example_without_ptb():
    case = _reference_cases() / "nlgeval_example"
    refs = json.loads((case / "refs.json").read_text())
    cands = json.loads((case / "cands.json").read_text())
    expected = json.loads((case / "expected.json").read_text())
    ours = score_captions(refs, cands, spice=False, tokenize=False)
    for name in SCORED:
        assert _places5(ours[name], expected[name]), (name, ours[name], expected[name])
    for example in expected["individual_examples"]:
        single = score_captions({"x": example["refs"]}, {"x": example["cand"]}, spice=False, tokenize=False)
        for name, value in example["expected"].items():
            assert _places5(single[name], value), (example["cand"], name, single[name], value)


def test_ptb_changes_meteor_on_french_example():
    # The published value holds only without PTB ("français." keeps its period): tokenize=True must differ,
    # which shows the flag really switches the tokenizer.
    example = json.loads((_reference_cases() / "nlgeval_example" / "expected.json").read_text())["individual_examples"][1]
    tokenized = score_captions({"x": example["refs"]}, {"x": example["cand"]}, spice=False)
    assert not _places5(tokenized["METEOR"], example["expected"]["METEOR"])


def test_input_validation():
    with pytest.raises(InputError, match="without a candidate"):
        score_captions({"a": ["x"], "b": ["y"]}, {"a": "x"}, spice=False)
    with pytest.raises(InputError, match="without references"):
        score_captions({"a": ["x"]}, {"a": "x", "zz": "y"}, spice=False)
    with pytest.raises(InputError, match="non-empty list"):
        score_captions({"a": []}, {"a": "x"}, spice=False)
    with pytest.raises(InputError, match="empty or non-string reference"):
        score_captions({"a": ["ok", " "]}, {"a": "x"}, spice=False)


def _group_rows() -> list[dict]:
    return [
        {"sample_id": "p1|lamp", "image": "p1.png", "query": "lamp",
         "prediction": "a small yellow lamp stands on the wooden desk near the door",
         "references": ["there is a lamp", "a small yellow lamp stands on the wooden desk near the door",
                        "lamp, yellow"]},
        {"sample_id": "p1|door", "image": "p1.png", "query": "door", "prediction": "",
         "references": ["a white door", "the door is white and closed"]},
        {"sample_id": "p2|car", "image": "p2.png", "query": "car", "prediction": "a blue car parked outside",
         "references": ["a blue car", "blue car parked on the street", "a parked car, blue"]},
    ]


def test_grouping_scores_each_candidate_against_all_its_references(tmp_path):
    rows = _group_rows()
    write_predictions(tmp_path / "predictions.csv", rows)
    (tmp_path / "generation.json").write_text(json.dumps({"decoding": {"do_sample": False}, "samples_per_s": 3.5}))
    out = score_predictions_file(tmp_path / "predictions.csv", tmp_path / "metrics.json", spice="off",
                                 extra={"cell": "ov0.50_mlp"})
    assert json.loads((tmp_path / "metrics.json").read_text()) == out
    assert out["num_groups"] == 3 and out["num_references"] == 8 and out["empty_predictions"] == 1
    assert out["generation"]["samples_per_s"] == 3.5 and out["cell"] == "ov0.50_mlp"
    assert out["mean_prediction_length_words"] == pytest.approx((12 + 0 + 5) / 3)
    assert out["tokenizer"] == metrics.TOKENIZER_NAME and out["metrics"]["SPICE"] is None

    frame = read_predictions(tmp_path / "predictions.csv")
    refs = dict(zip(frame["sample_id"], frame["references"], strict=True))
    cands = dict(zip(frame["sample_id"], frame["prediction"], strict=True))
    grouped = score_captions(refs, cands, spice=False, per_item=True)["per_item"]
    first_only = score_captions({k: v[:1] for k, v in refs.items()}, cands, spice=False, per_item=True)["per_item"]
    # The lamp candidate equals its 2nd reference: perfect only when all references count.
    assert grouped["p1|lamp"]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert first_only["p1|lamp"]["Bleu_4"] < 0.1
    assert grouped["p1|door"]["Bleu_1"] == 0.0 and grouped["p1|door"]["CIDEr"] == 0.0


def test_predictions_round_trip_keeps_commas_quotes_newlines(tmp_path):
    rows = [{"sample_id": "a", "image": "x.png", "query": "q, \"quoted\"", "prediction": "p,\nq",
             "references": ["one, two", "line1\nline2", 'say "hi"']}]
    write_predictions(tmp_path / "p.csv", rows)
    frame = read_predictions(tmp_path / "p.csv")
    assert list(frame.columns) == PREDICTION_COLUMNS
    assert frame.iloc[0].to_dict() == rows[0]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('sample_id,image,query,prediction\na,x,q,p\n', r"line 1: missing column\(s\) \['references'\]"),
        ('sample_id,image,query,prediction,references\na,x,q,p,"[""r""]"\nb,x,q,p,[not json\n',
         r"line 3: references is not valid JSON"),
        ('sample_id,image,query,prediction,references\na,x,q,p,"[""r""]"\na,y,q,p,"[""s""]"\n',
         r"line 3: duplicate sample_id 'a' \(first on line 2\)"),
        ('sample_id,image,query,prediction,references\na,x,q,"multi\nline",[]\n',
         r"line 2: references must be a non-empty JSON list"),
        ('sample_id,image,query,prediction,references\na,x,q,"p\nq","[""r""]"\nb,x,q\n', r"line 4: expected 5 fields"),
        ("", r"empty file"),
    ],
)
def test_read_predictions_names_the_bad_line(tmp_path, body, match):
    path = tmp_path / "bad.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        read_predictions(path)


def test_tokenization_with_read_only_package_dir(tmp_path):
    pkg = tmp_path / "pycocoevalcap"
    shutil.copytree(pycocoevalcap_dir() / "tokenizer", pkg / "tokenizer", ignore=shutil.ignore_patterns("__pycache__"))
    for p in [pkg, *pkg.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before_copy, before_real = _listing(pkg), _listing(pycocoevalcap_dir())
    try:
        if os.geteuid() != 0:  # root ignores permission bits; then the listings below are the guarantee
            with pytest.raises(PermissionError):
                (pkg / "tokenizer" / "probe").write_text("x")
        assert ptb_tokenize(REFS, package_dir=pkg) == ptb_tokenize(REFS)
        score_captions(REFS, CANDS, spice=False)  # METEOR runs with cwd = its (real) package dir
    finally:
        after_copy, after_real = _listing(pkg), _listing(pycocoevalcap_dir())
        for p in [pkg, *pkg.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert after_copy == before_copy
    assert after_real == before_real  # nothing written into the installed package (tokenizer, METEOR, SPICE)


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(JavaMissingError, match=r"Java \(JRE >= 8\) is required .*apt-get install default-jre-headless"):
        score_captions({"a": ["x"]}, {"a": "x"}, spice=False)
    with pytest.raises(JavaMissingError, match="no `java` on PATH"):
        ptb_tokenize({"a": ["x"]})


def test_broken_java_is_a_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "java"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(JavaMissingError, match="exited 1: cannot start"):
        metrics.check_java()


def _forbid_downloads(monkeypatch):
    import urllib.request

    import pycocoevalcap.spice.get_stanford_models as gsm
    import pycocoevalcap.spice.spice as spice_mod

    def no_network(*args, **kwargs):
        raise AssertionError("attempted to download SPICE models")

    monkeypatch.setattr(gsm, "get_stanford_models", no_network)
    monkeypatch.setattr(gsm, "urlretrieve", no_network)
    monkeypatch.setattr(spice_mod, "get_stanford_models", no_network)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)


def test_spice_without_jars_is_null_with_reason(monkeypatch, tmp_path):
    _forbid_downloads(monkeypatch)
    monkeypatch.setenv(metrics.SPICE_LIB_ENV, str(tmp_path))  # an empty directory: no CoreNLP jars
    out = score_captions(REFS, CANDS, spice="auto")
    assert out["SPICE"] is None
    assert "stanford-corenlp-3.6.0.jar" in out["SPICE_reason"] and str(tmp_path) in out["SPICE_reason"]
    assert metrics.SPICE_LIB_ENV in out["SPICE_reason"] and "never downloads" in out["SPICE_reason"]
    assert out["CIDEr"] > 0
    with pytest.raises(MetricError, match="stanford-corenlp-3.6.0-models.jar not found"):
        score_captions(REFS, CANDS, spice=True)


def test_spice_failure_is_null_in_auto_and_error_when_requested(monkeypatch, tmp_path):
    _forbid_downloads(monkeypatch)
    for name in metrics.SPICE_CORENLP_JARS:  # jars "present" but not real: SPICE fails at run time
        (tmp_path / name).write_bytes(b"not a jar")
    refs, cands = {"a": ["a red sofa"]}, {"a": "a red sofa"}
    out = score_captions(refs, cands, spice="auto", spice_lib=tmp_path)
    assert out["SPICE"] is None and out["SPICE_reason"].startswith("SPICE failed")
    with pytest.raises(MetricError, match="SPICE failed"):
        score_captions(refs, cands, spice="on", spice_lib=tmp_path)


def test_score_cli_writes_metrics_json(tmp_path):
    write_predictions(tmp_path / "predictions.csv", _group_rows())
    rc = main(["score", "--predictions", str(tmp_path / "predictions.csv"), "--out", str(tmp_path / "m" / "metrics.json"),
               "--spice", "off"])
    assert rc == 0
    written = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(written["metrics"]) == set(metrics.METRIC_NAMES)
    assert written["num_groups"] == 3 and written["metrics"]["CIDEr"] > 0


def test_score_cli_malformed_csv_exits_2_naming_the_line(tmp_path, capsys):
    bad = tmp_path / "predictions.csv"
    bad.write_text('sample_id,image,query,prediction,references\na,x,q,p,"[""r""]"\nb,x,q,p,[oops\n')
    rc = main(["score", "--predictions", str(bad), "--out", str(tmp_path / "metrics.json")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0] and "references is not valid JSON" in err[0]
    assert not (tmp_path / "metrics.json").exists()


def test_scoring_many_files_at_once_equals_scoring_each_alone(tmp_path):
    """The score job's batch path (one tokenizer run, one METEOR process) gives each file exactly the metrics that
    scoring it alone gives; CIDEr's document frequencies stay per file (the two files differ in size)."""
    rows = _group_rows()
    variants = {"a": rows, "b": [dict(r, prediction=r["prediction"].upper() + ".") for r in rows[:2]]}
    for name, rs in variants.items():
        write_predictions(tmp_path / name / "predictions.csv", rs)
    alone = {name: score_predictions_file(tmp_path / name / "predictions.csv", tmp_path / name / "alone.json",
                                          spice="off") for name in variants}
    rc = main(["score", "--predictions", *(str(tmp_path / n / "predictions.csv") for n in variants),
               "--out", *(str(tmp_path / n / "metrics.json") for n in variants), "--spice", "off"])
    assert rc == 0
    for name in variants:
        together = json.loads((tmp_path / name / "metrics.json").read_text())
        assert together["metrics"] == alone[name]["metrics"], name
    assert alone["a"]["metrics"]["CIDEr"] != alone["b"]["metrics"]["CIDEr"]


def test_score_cli_needs_one_output_per_predictions_file(tmp_path, capsys):
    write_predictions(tmp_path / "predictions.csv", _group_rows())
    rc = main(["score", "--predictions", str(tmp_path / "predictions.csv"), str(tmp_path / "predictions.csv"),
               "--out", str(tmp_path / "metrics.json")])
    assert rc == 2 and "2 file(s) but --out 1" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()
