#!/usr/bin/env bash
# The two-GPU (DDP) session in ONE device call on nvidia-h200-x2 (about 9.5 minutes with the extras), or its CPU mode:
#
#   bash benchmarks/device/run_ddp_session.sh          # on the lent nvidia-h200-x2, from the repository root, with the
#                                                      # wheels of benchmarks/device/prepare_wheels.sh carried (.whl,
#                                                      # .gpuwheels: the extras run bimamba's fused kernels)
#   bash benchmarks/device/run_ddp_session.sh --cpu    # the same steps at tiny dimensions on the CPU
#
# benchmarks/device/gpu_session.py does the work (its docstring lists the steps); this wrapper installs what the
# device lacks and keeps the whole log. $OUT receives ddp-session.log, env.json, ddp_summary.json, ddp_summary.md,
# ddp-harness.tar.gz and, with the time left (EXTRAS=0 skips it), extras_summary.json, extras_summary.md and
# extras-harness.tar.gz: single-GPU rows on GPU 0 (8 files, the device tool's limit).
# Knobs: EXTRAS (1; 0 = the DDP part only), OUT (default ./ddp-session-out), DEADLINE (seconds from start by which
# every step has ended; 575),
# WORK (intermediate files; default a temporary folder), PYTHON (default python3).
set -uo pipefail
CPU=()
for arg in "$@"; do
  case $arg in
    --cpu) CPU=(--cpu) ;;
    *) echo "run_ddp_session.sh: unknown argument $arg (expected --cpu)"; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/ddp-session-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/ddp-session.log") 2>&1
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
"$PYTHON" benchmarks/device/gpu_session.py ddp --out "$OUT" "${CPU[@]}" "${WORK_ARGS[@]}" \
  --deadline-epoch $((t_start + ${DEADLINE:-575}))
status=$?
echo "=== done after $(( $(date +%s) - t_start )) s (exit $status); \$OUT holds: $(ls "$OUT" | tr '\n' ' ')"
exit $status
