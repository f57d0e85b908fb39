"""Subcommands of this concern (registered by panobench.cli): ``synth``, ``fingerprint``, ``prepare-data``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
    p = subparsers.add_parser("synth", help="generate the seeded synthetic panorama dataset (QuIC-360 CSV format)")
    p.add_argument("--out", type=Path, required=True, help="output directory (new, empty, or an earlier synth output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=320, help="train images")
    p.add_argument("--n-valid", type=int, default=40, help="valid images")
    p.add_argument("--n-test", type=int, default=60, help="test images (4-6 references per image and query)")
    p.add_argument("--width", type=int, default=512, help="ERP width (must be 2 x height)")
    p.add_argument("--height", type=int, default=256, help="ERP height")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser("fingerprint", help="hash a dataset (its CSVs and every image they name) -> JSON")
    p.add_argument("--csv", required=True, nargs="+", metavar="SPLIT=CSV", help="e.g. train=data/x/train.csv")
    p.add_argument("--root", required=True, help="data root the CSVs' image paths are relative to")
    p.add_argument("-o", "--out", required=True, help="JSON to write (atomically)")
    p.set_defaults(func=_fingerprint)

    # Defaults are literals here (not imported) so that `panobench --help` does not import PIL/torch.
    p = subparsers.add_parser(
        "prepare-data",
        help="download, verify and pin a QuIC-360-format dataset from its published CSVs (image URLs)",
        description="Download every distinct image URL of the published CSVs once, verify it (decodes, 2:1, minimum "
                    "size), write OUT/{train,valid,test}.csv with local paths (source_url keeps the URL), "
                    "OUT/dropped.csv and OUT/manifest.json. A re-run fetches only what is missing. With --verify: "
                    "re-hash OUT against its manifest (exit 1 on any changed, missing or extra file).",
    )
    p.add_argument("--csv", nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                   help="the published CSVs (paths or http(s) URLs), in this order")
    p.add_argument("--out", type=Path, required=True, help="the prepared folder (new, empty, or an earlier output)")
    p.add_argument("--verify", action="store_true", help="check OUT against OUT/manifest.json instead of preparing")
    p.add_argument("--on-missing", choices=("fail", "drop"), default="fail",
                   help="rows whose image cannot be obtained or fails verification: fail (default: exit 2 naming "
                        "them) or drop (list them in dropped.csv)")
    p.add_argument("--min-width", type=int, default=1024, help="minimum image width in pixels (default 1024)")
    p.add_argument("--min-height", type=int, default=512, help="minimum image height in pixels (default 512)")
    p.add_argument("--workers", type=int, default=16, help="concurrent downloads (or hashes with --verify)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to connect, and to wait for more bytes, per attempt (default 30)")
    p.add_argument("--retries", type=int, default=3,
                   help="further attempts after a transient failure: timeout, 5xx, 429, truncated body (default 3)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before the first retry, doubling each retry (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare_data)


def _synth(args: argparse.Namespace) -> int:
    from panobench.data.synthetic import generate_synthetic  # lazy: keeps `panobench --help` fast

    summary = generate_synthetic(args.out, seed=args.seed, n_train=args.n_train, n_valid=args.n_valid,
                                 n_test=args.n_test, width=args.width, height=args.height)
    logger.info("wrote %s: images %s, CSV rows %s, (image, query) groups %s", summary.out_dir, summary.images,
                summary.rows, summary.groups)
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    from panobench.data.fingerprint import dataset_fingerprint
    from panobench.errors import ConfigError
    from panobench.utils.io import write_json_atomic

    csvs = {}
    for item in args.csv:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            raise ConfigError(f"--csv expects SPLIT=CSV (e.g. train=data/x/train.csv), got {item!r}")
        csvs[split] = path
    record = dataset_fingerprint(csvs, args.root)
    write_json_atomic(args.out, record)
    logger.info("data fingerprint %s (%d images) -> %s", record["fingerprint"], record["num_images"], args.out)
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from panobench.data.prepare import FetchPolicy, ImagePolicy, prepare_data, verify_prepared
    from panobench.errors import ConfigError

    if args.verify:
        if args.csv:
            raise ConfigError("--verify checks an existing folder against its manifest; it takes no --csv")
        report = verify_prepared(args.out, workers=args.workers, progress=not args.no_progress)
        for kind, paths in (("changed", report.changed), ("missing", report.missing), ("extra", report.extra)):
            for path in paths:
                print(f"{kind}: {path}")
        if not report.fingerprint_consistent:
            print(f"changed: {args.out / 'manifest.json'} (its fingerprint does not match its own hashes)")
        verdict = "OK" if report.ok else "FAILED"
        print(f"verify {args.out}: {verdict}: {report.files} files listed, {len(report.changed)} changed, "
              f"{len(report.missing)} missing, {len(report.extra)} extra; fingerprint {report.fingerprint}")
        return 0 if report.ok else 1
    if not args.csv:
        raise ConfigError("prepare-data needs --csv TRAIN VALID TEST (or --verify)")
    prepare_data(dict(zip(("train", "valid", "test"), args.csv, strict=True)), args.out,
                 on_missing=args.on_missing,
                 image_policy=ImagePolicy(min_width=args.min_width, min_height=args.min_height),
                 fetch_policy=FetchPolicy(workers=args.workers, timeout_s=args.timeout, retries=args.retries,
                                          backoff_s=args.backoff),
                 progress=not args.no_progress)
    return 0
