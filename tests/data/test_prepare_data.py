"""prepare-data against a real HTTP server on 127.0.0.1: the fault table, resume, the on_missing policy, --verify."""

from __future__ import annotations

import csv
import fcntl
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from loopback_http import LoopbackServer, Route
from prepare_helpers import SPLITS, folder_bytes, image_bytes, published_rows, write_published

from panobench import cli
from panobench.data.csvdata import read_quic_csv
from panobench.data.fingerprint import dataset_fingerprint, file_sha256
from panobench.data.prepare import MARKER, FetchPolicy, ImagePolicy, prepare_data, url_key
from panobench.errors import InputError

pytestmark = pytest.mark.loopback

TIMEOUT_S = 0.5
RETRIES = 1
FAST = FetchPolicy(workers=4, timeout_s=TIMEOUT_S, retries=RETRIES, backoff_s=0.01)
SMALL = ImagePolicy(min_width=64, min_height=32)
OUTPUTS = ("train.csv", "valid.csv", "test.csv", "dropped.csv", "manifest.json")


def cli_args(sources: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["prepare-data", "--csv", sources["train"], sources["valid"], sources["test"], "--out", str(out),
            "--min-width", "64", "--min-height", "32", "--workers", "4", "--timeout", str(TIMEOUT_S),
            "--retries", str(RETRIES), "--backoff", "0.01", "--no-progress", *extra]


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fault_cases() -> dict[str, tuple[str, Route | None, str, int | None]]:
    """case -> (path on the server or a URL elsewhere, route (None: not served), expected outcome, expected requests
    (None: not on the server))."""
    truncated = image_bytes(64, 32, seed=4)
    html = b"<!doctype html><html><body><h1>This photo is no longer available</h1></body></html>"
    return {
        "404": ("/faults/gone.png", None, "http_404", 1),
        "500 then 200": ("/faults/flaky.png", Route(body=image_bytes(64, 32, seed=2), fail_first=1), "stored", 2),
        "500 always": ("/faults/broken.png", Route(body=image_bytes(64, 32, seed=3), fail_first=100), "http_500",
                       1 + RETRIES),
        "stall past the timeout": ("/faults/stall.png", Route(stall_s=5.0), "timeout", 1 + RETRIES),
        "truncated body": ("/faults/truncated.png", Route(body=truncated, truncate_to=len(truncated) // 2),
                           "truncated", 1 + RETRIES),
        "HTML page named .jpg": ("/faults/page.jpg", Route(body=html, content_type="text/html"), "not_an_image", 1),
        "redirect": ("/faults/moved.png", Route(redirect_to="/elsewhere/moved.png"), "stored", 1),
        "redirect to ftp:": ("/faults/ftp.png", Route(redirect_to="ftp://127.0.0.1/moved.png"), "bad_redirect", 1),
        "connection refused": (f"http://127.0.0.1:{closed_port()}/refused.png", None, "connection_error", None),
        "not 2:1": ("/faults/square.png", Route(body=image_bytes(64, 48, seed=5)), "not_2to1", 1),
        "below the minimum size": ("/faults/tiny.png", Route(body=image_bytes(32, 16, seed=6)), "too_small", 1),
        "JPEG": ("/faults/photo.jpg", Route(body=image_bytes(64, 32, fmt="JPEG", seed=7), content_type="image/jpeg"),
                 "stored", 1),
    }


@dataclass
class Published:
    sources: dict[str, str]
    rows: dict[str, list[tuple[str, str, str]]]   # published (url, query, annotation) per split, file order
    served: dict[str, bytes]                       # what a correct download of each URL holds
    cases: dict[str, tuple[str, Route | None, str, int | None]]


@pytest.fixture
def faulty(server: LoopbackServer, synthetic, tmp_path: Path) -> Published:
    """The synthetic dataset plus one train row per fault case, a failing URL and a train image reused in test,
    and an exact duplicate row."""
    images, rows = synthetic
    rows = published_rows(server, images, rows)
    served = {server.url("/img/" + rel): body for rel, body in images.items()}
    cases = fault_cases()
    server.routes["/elsewhere/moved.png"] = Route(body=image_bytes(64, 32, seed=8))
    for case, (path, route, outcome, _) in cases.items():
        if route is not None:
            server.routes[path] = route
        rows["train"].append((case_url(server, path), "faults", f"the {case} case"))
        if outcome == "stored":
            served[server.url(path)] = route.body if route.redirect_to is None else \
                server.routes[route.redirect_to].body
    rows["train"].append(rows["train"][0])                                   # an exact duplicate row
    rows["test"].append((rows["train"][0][0], "shared", "a train image used again in test"))
    rows["test"].append((server.url("/faults/gone.png"), "gone", "the 404 image in a second split"))
    return Published(write_published(tmp_path / "published", rows), rows, served, cases)


def case_url(server: LoopbackServer, path: str) -> str:
    return path if "://" in path else server.url(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_fault_table_outcomes_outputs_and_request_counts(server: LoopbackServer, faulty: Published,
                                                         tmp_path: Path) -> None:
    """Each fault ends as the table says, with bounded requests; the outputs are what training and cells read."""
    out = tmp_path / "prepared"
    result = prepare_data(faulty.sources, out, on_missing="drop", image_policy=SMALL, fetch_policy=FAST,
                          progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    images = {img["source_url"]: img for img in manifest["images"]}
    dropped = read_csv(out / "dropped.csv")
    reason = {d["source_url"]: d["reason"] for d in dropped if d["reason"] != "duplicate_row"}

    for case, (path, _, outcome, requests) in faulty.cases.items():
        url = case_url(server, path)
        sent = server.counts[path] if requests is not None else None
        assert (("stored" if url in images else reason.get(url)), sent) == (outcome, requests), case
    assert server.counts["/elsewhere/moved.png"] == 1
    # Every synthetic image is fetched once however many rows (and splits) name it.
    assert {p: n for p, n in server.counts.items() if p.startswith("/img/")} == \
        {p: 1 for p in server.routes if p.startswith("/img/")}

    # Stored bytes are the served bytes (nothing converted), under the hash of the *published* URL.
    for url, img in images.items():
        assert (out / img["path"]).read_bytes() == faulty.served[url]
        assert img["sha256"] == file_sha256(out / img["path"]) and img["bytes"] == len(faulty.served[url])
        assert Path(img["path"]).stem == url_key(url)
        assert (img["width"], img["height"]) == (64, 32)
    assert images[server.url("/faults/photo.jpg")]["path"].endswith(".jpg")
    assert images[server.url("/faults/moved.png")]["format"] == "PNG"
    assert set(images) == set(faulty.served)
    assert (result.downloaded, result.reused, result.failed) == (len(faulty.served), 0, 9)

    # dropped.csv: the failing rows (both splits of the 404 image) and the exact duplicate, in split/line order.
    train_lines = {row: i + 2 for i, row in reversed(list(enumerate(faulty.rows["train"])))}  # first occurrence
    duplicate_line = len(faulty.rows["train"]) + 1
    assert [(d["split"], int(d["line"]), d["reason"]) for d in dropped] == [
        *[("train", train_lines[(case_url(server, p), "faults", f"the {c} case")], o)
          for c, (p, _, o, _) in faulty.cases.items() if o != "stored"],
        ("train", duplicate_line, "duplicate_row"),
        ("test", len(faulty.rows["test"]) + 1, "http_404"),
    ]
    assert dropped[-2]["detail"] == "same url, query and annotation as line 2"

    # The prepared CSVs: the published rows minus the dropped ones, url -> local path, extra columns kept.
    dropped_keys = {(d["split"], int(d["line"])) for d in dropped}
    for split in SPLITS:
        expected = [(f"{split}-{i}", u, q, a) for i, (u, q, a) in enumerate(faulty.rows[split])
                    if (split, i + 2) not in dropped_keys]
        written = read_csv(out / f"{split}.csv")
        assert [(r["id"], r["source_url"], r["query"], r["annotation"]) for r in written] == expected
        assert all(r["url"] == images[r["source_url"]]["path"] for r in written)
        frame = read_quic_csv(out / f"{split}.csv", out)  # the strict reader training uses
        assert len(frame) == len(expected) == manifest["splits"][split]["rows"]
        assert manifest["splits"][split]["sha256"] == file_sha256(out / f"{split}.csv")
    assert manifest["splits"]["train"]["dropped_rows"] == {"bad_redirect": 1, "connection_error": 1,
                                                           "duplicate_row": 1, "http_404": 1, "http_500": 1,
                                                           "not_2to1": 1, "not_an_image": 1, "timeout": 1,
                                                           "too_small": 1, "truncated": 1}
    assert manifest["sources"]["train"]["rows"] == len(faulty.rows["train"])
    assert manifest["dropped"]["sha256"] == file_sha256(out / "dropped.csv")
    # The fingerprint cells record is exactly what the fingerprint module computes for the folder.
    assert manifest["fingerprint"] == dataset_fingerprint({s: out / f"{s}.csv" for s in SPLITS}, out,
                                                          progress=False)["fingerprint"]


def test_second_run_fetches_only_what_failed_and_writes_the_same_bytes(server: LoopbackServer, faulty: Published,
                                                                      tmp_path: Path) -> None:
    """A re-run reuses every stored image (no request) and retries only the failed URLs; outputs are identical."""
    out = tmp_path / "prepared"
    prepare_data(faulty.sources, out, on_missing="drop", image_policy=SMALL, fetch_policy=FAST, progress=False)
    first = folder_bytes(out)
    failed_paths = {p: n for _, (p, _, o, n) in faulty.cases.items() if o != "stored" and n is not None}
    server.reset_counts()
    again = prepare_data(faulty.sources, out, on_missing="drop", image_policy=SMALL, fetch_policy=FAST,
                         progress=False)
    assert dict(server.counts) == failed_paths
    assert (again.downloaded, again.reused) == (0, len(faulty.served))
    assert folder_bytes(out) == first


def test_on_missing_fail_exits_2_naming_the_rows_and_keeps_the_images(server: LoopbackServer, faulty: Published,
                                                                      tmp_path: Path, capsys) -> None:
    """fail (the default): exit 2, the count and the first rows named, no CSV or manifest; a re-run resumes."""
    out = tmp_path / "prepared"
    assert cli.main(cli_args(faulty.sources, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "10 row(s) (9 image URL(s)) could not be obtained or failed verification (on_missing: fail)" in err
    gone_line = 2 + faulty.rows["train"].index((server.url("/faults/gone.png"), "faults", "the 404 case"))
    assert f"{faulty.sources['train']} line {gone_line}: {server.url('/faults/gone.png')}: http_404" in err
    assert "and 5 more" in err
    assert not [name for name in OUTPUTS if (out / name).exists()]
    kept = sorted(p for p in (out / "images").glob("*/*"))
    assert len(kept) == len(faulty.served) and not [p for p in kept if p.name.startswith(".")]

    server.reset_counts()
    assert cli.main(cli_args(faulty.sources, out, "--on-missing", "drop")) == 0
    assert not [p for p, n in server.counts.items() if p.startswith("/img/")]
    assert len(read_csv(out / "dropped.csv")) == 11


def test_clean_dataset_second_run_sends_no_request(server: LoopbackServer, synthetic, tmp_path: Path) -> None:
    """All downloads succeed: one request per distinct URL, and a second run sends none at all."""
    images, rows = synthetic
    sources = write_published(tmp_path / "published", published_rows(server, images, rows))
    out = tmp_path / "prepared"
    assert cli.main(cli_args(sources, out)) == 0
    assert server.total_requests() == len(images)
    first = folder_bytes(out)
    assert read_csv(out / "dropped.csv") == []
    server.reset_counts()
    assert cli.main(cli_args(sources, out)) == 0
    assert server.total_requests() == 0
    assert folder_bytes(out) == first


def test_published_csvs_given_as_urls(server: LoopbackServer, synthetic, tmp_path: Path) -> None:
    """The published CSVs themselves may be URLs; the manifest pins their bytes."""
    images, rows = synthetic
    local = write_published(tmp_path / "published", published_rows(server, images, rows))
    sources = {}
    for split, path in local.items():
        server.routes[f"/csv/{split}.csv"] = Route(body=Path(path).read_bytes(), content_type="text/csv")
        sources[split] = server.url(f"/csv/{split}.csv")
    out = tmp_path / "prepared"
    prepare_data(sources, out, image_policy=SMALL, fetch_policy=FAST, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: (m["location"], m["sha256"]) for s, m in manifest["sources"].items()} == \
        {s: (sources[s], file_sha256(local[s])) for s in SPLITS}
    assert all(server.counts[f"/csv/{split}.csv"] == 1 for split in SPLITS)


def test_reused_images_meet_the_current_policy(server: LoopbackServer, synthetic, tmp_path: Path) -> None:
    """A stricter minimum on a re-run drops stored images that no longer qualify, without a request, and removes
    them from the folder."""
    images, rows = synthetic
    rows = published_rows(server, images, rows)
    server.routes["/big.png"] = Route(body=image_bytes(128, 64, seed=9))
    for split in SPLITS:
        rows[split].append((server.url("/big.png"), "big", f"a larger panorama in {split}"))
    sources = write_published(tmp_path / "published", rows)
    out = tmp_path / "prepared"
    prepare_data(sources, out, on_missing="drop", image_policy=SMALL, fetch_policy=FAST, progress=False)
    server.reset_counts()
    prepare_data(sources, out, on_missing="drop", image_policy=ImagePolicy(min_width=128, min_height=64),
                 fetch_policy=FAST, progress=False)
    assert server.total_requests() == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [img["source_url"] for img in manifest["images"]] == [server.url("/big.png")]
    assert {d["reason"] for d in read_csv(out / "dropped.csv")} == {"too_small"}
    assert [p.name for p in (out / "images").glob("*/*")] == [Path(manifest["images"][0]["path"]).name]


def test_verify_reports_changed_missing_and_extra_files(server: LoopbackServer, synthetic, tmp_path: Path,
                                                        capsys) -> None:
    """--verify: exit 0 on an intact folder (also a copy elsewhere); exit 1 listing changed, missing, extra files."""
    images, rows = synthetic
    sources = write_published(tmp_path / "published", published_rows(server, images, rows))
    out = tmp_path / "prepared"
    assert cli.main(cli_args(sources, out)) == 0
    copy = shutil.copytree(out, tmp_path / "copy")
    capsys.readouterr()
    assert cli.main(["prepare-data", "--verify", "--out", str(copy), "--no-progress"]) == 0
    assert ": OK: " in capsys.readouterr().out

    manifest = json.loads((out / "manifest.json").read_text())
    changed, missing = manifest["images"][0]["path"], manifest["images"][1]["path"]
    data = bytearray((out / changed).read_bytes())
    data[-20] ^= 0xFF
    (out / changed).write_bytes(bytes(data))
    (out / missing).unlink()
    (out / "notes.txt").write_text("mine\n")
    with open(out / "valid.csv", "a", encoding="utf-8") as f:
        f.write("\n")
    assert cli.main(["prepare-data", "--verify", "--out", str(out), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"changed: {changed}", "changed: valid.csv", f"missing: {missing}", "extra: notes.txt"]
    assert ": FAILED: " in lines[-1] and "2 changed, 1 missing, 1 extra" in lines[-1]


def test_verify_without_a_manifest_is_an_input_error(tmp_path: Path, capsys) -> None:
    assert cli.main(["prepare-data", "--verify", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("local path", "line 2: url 'images/a.png' is not an http(s) URL"),
        ("empty annotation", "line 2: empty 'annotation'"),
        ("source_url column", "already has a 'source_url' column"),
        ("missing CSV", "published valid CSV not found"),
        ("foreign folder", "was not made by prepare-data"),
        ("CSV inside the output", "lies inside the output folder"),
    ],
)
def test_bad_input_is_one_error_and_touches_nothing(server: LoopbackServer, tmp_path: Path, capsys, case: str,
                                                    message: str) -> None:
    """Bad published CSVs or output folders: exit 2 with one line naming the file/line; no request, no output."""
    good = f"url,query,annotation\n{server.url('/a.png')},sky,a sky\n"
    files = {split: tmp_path / f"{split}.csv" for split in SPLITS}
    for path in files.values():
        path.write_text(good)
    out = tmp_path / "prepared"
    if case == "local path":
        files["train"].write_text("url,query,annotation\nimages/a.png,sky,a sky\n")
    elif case == "empty annotation":
        files["train"].write_text(f"url,query,annotation\n{server.url('/a.png')},sky,\n")
    elif case == "source_url column":
        files["train"].write_text(f"url,query,annotation,source_url\n{server.url('/a.png')},sky,a sky,x\n")
    elif case == "missing CSV":
        files["valid"].unlink()
    elif case == "foreign folder":
        out.mkdir()
        (out / "train.csv").write_text("someone else's file\n")
    elif case == "CSV inside the output":
        out.mkdir()
        (out / MARKER).write_text("")
        files["test"] = out / "published-test.csv"
        files["test"].write_text(good)
    before = folder_bytes(out) if out.exists() else None
    sources = {s: str(p) for s, p in files.items()}
    assert cli.main(cli_args(sources, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("panobench prepare-data: error: ")
    assert server.total_requests() == 0
    assert (folder_bytes(out) if out.exists() else None) == before


def test_a_second_run_on_a_locked_folder_is_refused(server: LoopbackServer, synthetic, tmp_path: Path) -> None:
    """Two runs never write into one folder at once (the second would delete the first one's partial files)."""
    images, rows = synthetic
    sources = write_published(tmp_path / "published", published_rows(server, images, rows))
    out = tmp_path / "prepared"
    out.mkdir()
    with open(out / MARKER, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another prepare-data run is writing to"):
            prepare_data(sources, out, image_policy=SMALL, fetch_policy=FAST, progress=False)
    assert server.total_requests() == 0
