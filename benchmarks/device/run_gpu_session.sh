#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE, from the repository root (the device tool's working directory), with the wheels that
# benchmarks/device/prepare_wheels.sh put in .whl/ and .gpuwheels/ carried along. Results go to $OUT (the device
# tool brings back at most 8 files, 2 folders deep): session.log, env.json, naive_step.json and one
# harness-<config>.tar.gz per workflow config. See benchmarks/README.md.
#
# Knobs (environment variables):
#   STEPS_NAIVE=10 WARMUP_NAIVE=3         measured / warm-up steps per naive-step configuration
#   NAIVE_ARGS="..."                      extra naive_step.py arguments (e.g. "--loss naive,targets"); NAIVE=0 skips it
#   CONFIGS="config/gpu-speed.yaml config/gpu-speed-b1.yaml"   workflow configs to run; CONFIGS="" skips the harness
#   TARGETS=report|train                  report: the whole workflow up to reports/<name>/; train: only the training
#                                         stages and generation of each cell (no scoring, no report)
#   OVERLAPS="0.5" RESAMPLERS="mlp bimamba"   with TARGETS=train: only these cells (split a matrix over calls)
#   HARNESS_TIMEOUT=480                   seconds for each Snakemake run, so the tarball is still written in time
#   DEADLINE=570                          seconds after start by which every Snakemake run must end (caps the above)
#   VLM_STEP_ARGS="..."                   run benchmarks/vlm_step.py with these arguments first (writes vlm_step.json)
#   DDP=1                                 also run one stage-3 cell (overlap 0, mlp) of config/gpu-speed.yaml with
#                                         runtime.devices=2 as config "gpu-speed-ddp" (trained stages only)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS_NAIVE=${STEPS_NAIVE:-10}
WARMUP_NAIVE=${WARMUP_NAIVE:-3}
NAIVE=${NAIVE:-1}
NAIVE_ARGS=${NAIVE_ARGS:-}
CONFIGS=${CONFIGS-config/gpu-speed.yaml config/gpu-speed-b1.yaml}
TARGETS=${TARGETS:-report}
OVERLAPS=${OVERLAPS:-}
RESAMPLERS=${RESAMPLERS:-}
HARNESS_TIMEOUT=${HARNESS_TIMEOUT:-480}
DEADLINE=${DEADLINE:-570}
VLM_STEP_ARGS=${VLM_STEP_ARGS:-}
DDP=${DDP:-0}
t_start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t_start ))s] $*"; }

stamp "install carried wheels into /tmp/site"
# One pip call for the wheels and the project (built from the carried tree; setuptools and wheel are in the image):
# with --target, a second call would not add its console scripts to the existing /tmp/site/bin (seen 2026-11-28:
# `panobench` missing, every rule exited 127), and --upgrade would replace bin/ wholesale.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
  --target /tmp/site .whl/*.whl .gpuwheels/*.whl . || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
command -v panobench snakemake || { echo "console scripts missing from /tmp/site/bin"; exit 1; }

stamp "environment"
python3 - "$OUT/env.json" <<'EOF' || { echo "environment check failed"; exit 1; }
import json, shutil, subprocess, sys
import torch
import selective_scan_cuda  # noqa: F401  the fused Mamba scan; fails on an ABI mismatch with the image's torch
import mamba_ssm, snakemake, transformers, peft, lightning
from panobench.measurement.throughput import measure_bf16_matmul_peak
peak = measure_bf16_matmul_peak("cuda")
env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
       "transformers": transformers.__version__, "peft": peft.__version__, "lightning": lightning.__version__,
       "mamba_ssm": mamba_ssm.__version__, "snakemake": snakemake.__version__, "java": shutil.which("java"),
       "bf16_matmul_tflops": peak / 1e12,
       "nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm",
                                     "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF

if [[ -n "$VLM_STEP_ARGS" ]]; then
  stamp "panobench step variants (benchmarks/vlm_step.py $VLM_STEP_ARGS)"
  # The tiny tokenizer the speed configs name (resources/tiny-2k, carried or materialized first).
  [[ -e resources/tiny-2k/llm/tokenizer.json ]] || snakemake --cores 4 --configfile config/gpu-speed.yaml \
    --scheduler greedy resources/tiny-2k/llm/tokenizer.json || true
  # shellcheck disable=SC2086
  python3 benchmarks/vlm_step.py $VLM_STEP_ARGS --out "$OUT/vlm_step.json" || echo "vlm_step.py exited $?"
  (cd "$OUT" && ls profile-*.txt >/dev/null 2>&1 && tar czf profiles.tar.gz profile-*.txt && rm profile-*.txt)
fi

if [[ "$DDP" == 1 ]]; then
  python3 - <<'PY'
import yaml
wf = yaml.safe_load(open("config/gpu-speed.yaml"))
wf["name"] = "gpu-speed-ddp"
wf["matrix"]["overlaps"] = [0.0]
wf["matrix"]["resamplers"] = ["mlp"]
wf["run"]["runtime"]["devices"] = 2
yaml.safe_dump(wf, open("config/gpu-speed-ddp.yaml", "w"), sort_keys=False)
PY
  CONFIGS="config/gpu-speed-ddp.yaml $CONFIGS"   # first: one small cell, sure to fit the call
fi

if [[ "$NAIVE" == 1 ]]; then
  stamp "naive reference step (SPEC §8)"
  # shellcheck disable=SC2086
  python3 benchmarks/naive_step.py --stages 3,2 --batch 1,8 --views 5,9 --steps "$STEPS_NAIVE" \
    --warmup "$WARMUP_NAIVE" $NAIVE_ARGS --out "$OUT/naive_step.json" || echo "naive_step.py exited $?"
fi

harness_targets() {  # $1 = config file; prints the Snakemake targets for TARGETS=train
  python3 - "$1" "$OVERLAPS" "$RESAMPLERS" <<'EOF'
import sys, yaml
from panobench import matrix as pm
from panobench.utils.io import read_yaml
wf = yaml.safe_load(open("config/config.yaml"))
def merge(a, b):
    for k, v in b.items():
        a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a
wf = merge(wf, read_yaml(sys.argv[1]))          # as Snakemake does: --configfile over the Snakefile's configfile
overlaps = [float(x) for x in sys.argv[2].split()]
resamplers = sys.argv[3].split()
for cell in pm.expand_cells(wf):
    if (overlaps and cell.overlap not in overlaps) or (resamplers and cell.resampler not in resamplers):
        continue
    for stage in pm.TRAIN_STAGES:
        print(f"{pm.stage_dir(wf, cell.cell_id, stage, cell.resampler)}/measurements.json")
    for stage in wf.get("eval_stages", pm.EVAL_STAGES):
        print(f"{pm.eval_dir(wf, cell.cell_id, stage)}/generation.json")
EOF
}

for cfg in $CONFIGS; do
  name=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$cfg")
  targets=()
  if [[ "$name" == gpu-speed-ddp ]]; then
    mapfile -t targets < <(OVERLAPS="" RESAMPLERS="" harness_targets "$cfg" | grep measurements.json)
  elif [[ "$TARGETS" == train ]]; then
    mapfile -t targets < <(harness_targets "$cfg")
  fi
  stamp "harness: $cfg (name $name, ${#targets[@]} explicit targets)"
  # Targets first: --configfile takes every following word as a config file.
  left=$(( DEADLINE - ($(date +%s) - t_start) ))
  budget=$(( left < HARNESS_TIMEOUT ? left : HARNESS_TIMEOUT ))
  (( budget > 20 )) || { echo "no time left for $cfg"; continue; }
  timeout "$budget" snakemake "${targets[@]}" --cores 16 --resources gpu=1 --scheduler greedy \
    --keep-going --configfile "$cfg" || echo "snakemake for $cfg exited $?"
  stamp "collect $name"
  python3 - "$name" <<'EOF' || true
import json, pathlib, sys
name = sys.argv[1]
rows = []
for m in sorted(pathlib.Path("runs", name).glob("*/*/*/measurements.json")):
    r = json.loads(m.read_text())
    s, mem, c = r["speed"], r["memory"], r["cost"]
    rows.append(f"{r['cell_id']:48s} {r['stage']:9s} views {r['geometry']['num_views']} "
                f"step {s['step_time_median_s'] or float('nan'):.3f}s {s['samples_per_s'] or float('nan'):7.2f}/s "
                f"alloc {mem['peak_gpu_allocated_gib'] or float('nan'):6.1f} GiB resv {mem['peak_gpu_reserved_gib'] or float('nan'):6.1f} GiB "
                f"MFU {c['mfu'] or float('nan'):.3f} kernel {r['kernel_path']}")
for g in sorted(pathlib.Path("runs", name).glob("*/eval/*/generation.json")):
    r = json.loads(g.read_text())
    rows.append(f"{r['cell_id']:48s} generate  {r['stage']} {r['num_samples']} samples {r['tokens_per_s'] or float('nan'):.1f} tok/s")
print("\n".join(rows) or f"no measurements under runs/{name}")
EOF
  # Small files only: measurements, configs, logs, Snakemake benchmark TSVs, the report (no checkpoints).
  find "runs/$name" \( -name '*.json' -o -name 'config.yaml' -o -name 'predictions.csv' -o -name 'metrics.csv' \) \
    -print0 2>/dev/null > /tmp/files-$name
  for d in "reports/$name" "logs/$name" "benchmarks/$name" "results/$name"; do
    [[ -e "$d" ]] && find "$d" -type f -not -name '*.ckpt' -print0 >> /tmp/files-$name
  done
  tar czf "$OUT/harness-$name.tar.gz" --null -T /tmp/files-$name 2>/dev/null || echo "tar for $name failed"
done
stamp "done; \$OUT holds: $(ls "$OUT" | tr '\n' ' ')"
