#!/usr/bin/env bash
# The single-GPU session in ONE device call (about 9.5 minutes), or its CPU mode (here and in CI; ~2 minutes):
#
#   bash benchmarks/device/run_gpu_session.sh          # on the lent H200, from the repository root, with the wheels
#                                                      # of benchmarks/device/prepare_wheels.sh carried (.whl, .gpuwheels)
#   bash benchmarks/device/run_gpu_session.sh --cpu    # the same steps at tiny dimensions on the CPU
#
# benchmarks/device/gpu_session.py does the work (its docstring lists the steps); this wrapper installs what the
# device lacks and keeps the whole log. $OUT receives session.log, env.json, naive_step.json, vlm_step.json,
# harness.tar.gz, summary.json and summary.md (7 files; the device tool brings back at most 8).
# Knobs: OUT (default ./gpu-session-out), DEADLINE (seconds from start by which every step has ended; 575),
# WORK (intermediate files; default a temporary folder), PYTHON (default python3).
set -uo pipefail
CPU=()
for arg in "$@"; do
  case $arg in
    --cpu) CPU=(--cpu) ;;
    *) echo "run_gpu_session.sh: unknown argument $arg (expected --cpu)"; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
t_start=$(date +%s)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PYTHON=${PYTHON:-python3}
if (( ${#CPU[@]} == 0 )); then
  echo "=== install carried wheels into /tmp/site"
  # shellcheck source=benchmarks/device/install_wheels.sh
  source benchmarks/device/install_wheels.sh
fi
WORK_ARGS=()
[[ -n ${WORK:-} ]] && WORK_ARGS=(--work "$WORK")
"$PYTHON" benchmarks/device/gpu_session.py single --out "$OUT" "${CPU[@]}" "${WORK_ARGS[@]}" \
  --deadline-epoch $((t_start + ${DEADLINE:-575}))
status=$?
echo "=== done after $(( $(date +%s) - t_start )) s (exit $status); \$OUT holds: $(ls "$OUT" | tr '\n' ' ')"
exit $status
