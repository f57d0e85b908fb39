#!/usr/bin/env bash
# Run HERE (the machine with PyPI access), from the repository root, before a device call.
# Downloads into .whl/ the wheels the lent GPU machine lacks to run the harness (Snakemake 9 and the part of its
# dependency closure that is not in the device image, per /work/.library/device/KINDS.md), and copies the prebuilt
# mamba_ssm wheel into .gpuwheels/. Both folders are git-ignored; name them in the device call's `carry`.
#
# Not carried, on purpose:
#   - pycocoevalcap (~100 MB wheel, and its scorers need Java, which the device image does not list): the speed
#     configs do not need caption scores; see benchmarks/README.md for the `score: false` workflow change.
#   - py360convert: only the geometry tests use it (as the oracle); the harness renders tiles with torch.
#   - pulp (16 MB, CBC binaries inside): only the ILP scheduler imports it, lazily; run_gpu_session.sh runs
#     Snakemake with --scheduler greedy (one GPU job at a time anyway).
#   - causal-conv1d (~23 MB): optional; mamba_ssm falls back to nn.Conv1d without it.
#   - the project itself: run_gpu_session.sh installs it from the carried tree (pip, no build isolation).
# Device image: Python 3.12, torch 2.11.0+cu130, x86_64 (KINDS.md, 2026-11).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

SHARED_WHEELS=${SHARED_WHEELS:-/work/shared/wheels/gpu-cp312-cu130-sm90}
MAMBA_WHEEL=mamba_ssm-2.3.2.post1-cp312-cp312-linux_x86_64.whl
MAMBA_SHA256=a1fe5a46ea981d0e4bdff911a00e97cadc105ab1d4b073dc38e02a15bf0efdc5

# Snakemake 9.27.1 and what it needs beyond the device image (pinned to the versions tested here).
PURE=(
  snakemake==9.27.1
  snakemake-interface-common==1.23.0
  snakemake-interface-executor-plugins==9.4.0
  snakemake-interface-logger-plugins==2.1.0
  snakemake-interface-report-plugins==1.3.0
  snakemake-interface-scheduler-plugins==2.0.2
  snakemake-interface-storage-plugins==4.4.1
  annotated-types==0.7.0 argparse-dataclass==2.0.0 conda-inject==1.3.2 configargparse==1.9.0
  connection-pool==0.0.3 docutils==0.22.4 dpath==2.2.0 fastjsonschema==2.22.3 gitdb==4.0.12 gitpython==3.2.1
  humanfriendly==10.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 jupyter-core==5.9.1 nbformat==5.11.1
  platformdirs==4.14.8 referencing==0.37.0 smart-open==7.7.1 smmap==5.0.3 sqlmodel==0.0.37
  tenacity==9.2.1 throttler==1.2.3 traitlets==5.15.0 typing-inspection==0.4.2 yte==1.9.4 pydantic==2.13.4
)
# Compiled extensions: cp312 manylinux wheels.
BINARY=(immutables==0.21 rpds-py==0.30.0 pydantic-core==2.46.4 sqlalchemy==2.0.58 greenlet==3.5.6)

mkdir -p .whl .gpuwheels
for d in /.whl/ /.gpuwheels/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_5_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${BINARY[@]}" 2> >(grep -v "^WARNING: Location" >&2)
for req in "${PURE[@]}"; do
  name=${req%%==*}
  if ls .whl | tr 'A-Z_' 'a-z-' | grep -q "^${name}-${req##*==}-"; then continue; fi
  # Pure-Python: a universal wheel if PyPI has one, else built here from the sdist (connection-pool has no wheel).
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$req" 2>/dev/null ||
    python3 -m pip wheel -q --no-deps -w .whl "$req" 2> >(grep -v "^WARNING: Location" >&2)
done

if [[ ! -f .gpuwheels/$MAMBA_WHEEL ]]; then
  cp "$SHARED_WHEELS/$MAMBA_WHEEL" .gpuwheels/
fi
echo "$MAMBA_SHA256  .gpuwheels/$MAMBA_WHEEL" | sha256sum -c --quiet

# One version of each distribution: two make the --no-deps install fail on the device.
dupes=$(ls .whl | sed -E 's/^([^-]+)-.*/\1/' | tr 'A-Z' 'a-z' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
  echo "prepare_wheels: several versions of: $dupes (remove the stale ones from .whl/)" >&2
  exit 1
fi
total=$(du -cb .whl/*.whl .gpuwheels/*.whl | tail -1 | cut -f1)
echo "prepare_wheels: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)), $(ls .gpuwheels) in .gpuwheels/;" \
     "carried total $((total / 1048576)) MiB"
if (( total > 60 * 1048576 )); then
  echo "prepare_wheels: carried wheels exceed 60 MiB; the device call carries at most 64 MiB in all" >&2
  exit 1
fi
