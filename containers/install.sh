#!/usr/bin/env bash
# Every install step of the panobench image, in one place. Two callers run it as root inside the image being built:
#   containers/panobench.def %post:  install.sh --mode gpu   (CUDA devel base, fused Mamba kernels compiled)
#   tests/container/ in CI:          install.sh --mode cpu --torch-index none --without-spice-jars
#                                    (a Debian root filesystem made by debootstrap; see containers/README.md)
# so the steps CI executes are the image's own steps. Each step is printed before it runs ("+ command");
# --dry-run prints the steps of a mode without running anything (tests/unit/test_container_def.py checks them).
#
# Build-machine settings (a proxy's CA bundle, a package mirror) are not handled here: pip and apt take them
# from the environment of the build (PIP_CERT, PIP_INDEX_URL, ...), so nothing of the build machine is written
# into the image.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh --mode gpu|cpu [--torch-index URL|none] [--without-spice-jars] [--dry-run]

  --mode gpu            Ubuntu 24.04 CUDA devel base: Python 3.12, torch 2.8.0 from the cu128 index,
                        causal-conv1d and mamba-ssm compiled against it (nvcc, --no-build-isolation),
                        panobench[workflow,gpu].
  --mode cpu            any Debian/Ubuntu base: the distribution's python3, torch 2.13.0+cpu from the
                        PyTorch CPU index, panobench[workflow]; no CUDA extension builds.
  --torch-index URL     the index torch comes from (default: the PyTorch index of the mode);
                        "none": pip's own settings of the build (a mirror, a local wheel folder).
  --without-spice-jars  do not fetch the Stanford CoreNLP jars SPICE needs (nlp.stanford.edu is
                        unreachable from the build); SPICE is then skipped at scoring time.
  --dry-run             print the steps, run nothing.
EOF
}

MODE=""
TORCH_INDEX=""
SPICE_JARS=1
DRY_RUN=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --mode) MODE="${2:?--mode needs a value}"; shift 2 ;;
        --torch-index) TORCH_INDEX="${2:?--torch-index needs a value}"; shift 2 ;;
        --without-spice-jars) SPICE_JARS=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

PROJECT=/opt/panobench   # where %files puts pyproject.toml, README.md, src/ and this script
VENV=/opt/venv
CONSTRAINTS=/opt/constraints.txt
case "$MODE" in
    gpu)
        # python3.12-dev + build-essential: headers and a compiler for the CUDA extensions (nvcc comes with
        # the base image).
        SYSTEM_PACKAGES=(python3.12 python3.12-venv python3.12-dev python3-pip build-essential git)
        PYTHON=python3.12
        # torch from the index of the base image's CUDA (12.8): cu128 wheels support sm_80..sm_120.
        TORCH_VERSION=2.8.0
        TORCH_DEFAULT_INDEX=https://download.pytorch.org/whl/cu128
        EXTRAS=workflow,gpu
        ;;
    cpu)
        SYSTEM_PACKAGES=(python3 python3-venv)
        PYTHON=python3
        # The torch the README's quick start and CI use; "+cpu" makes pip fail rather than take a CUDA build.
        TORCH_VERSION=2.13.0+cpu
        TORCH_DEFAULT_INDEX=https://download.pytorch.org/whl/cpu
        EXTRAS=workflow
        ;;
    *)
        echo "install.sh: --mode gpu or --mode cpu is required (got '${MODE}')" >&2
        usage >&2
        exit 2
        ;;
esac
TORCH_INDEX="${TORCH_INDEX:-$TORCH_DEFAULT_INDEX}"
TORCH_INDEX_ARGS=()
if [ "$TORCH_INDEX" != none ]; then
    TORCH_INDEX_ARGS=(--index-url "$TORCH_INDEX")
fi
# default-jre-headless: Java for pycocoevalcap's PTB tokenizer, METEOR and SPICE; ca-certificates: pip's TLS.
SYSTEM_PACKAGES+=(default-jre-headless ca-certificates)
if [ "$SPICE_JARS" = 1 ]; then
    SYSTEM_PACKAGES+=(wget unzip)  # the CoreNLP jars below
fi
# Same archive and jar names as pycocoevalcap's spice/get_stanford_models.py.
CORENLP=stanford-corenlp-full-2015-12-09
CORENLP_JARS=(stanford-corenlp-3.6.0.jar stanford-corenlp-3.6.0-models.jar)

run() {  # run COMMAND...: print it, then run it (unless --dry-run)
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}

write_lines() {  # write_lines FILE LINE...: print it as "+ write FILE LINE...", then write the lines to FILE
    local file="$1"
    shift
    printf '+ write %q' "$file"
    printf ' %q' "$@"
    printf '\n'
    if [ "$DRY_RUN" = 0 ]; then
        printf '%s\n' "$@" > "$file"
    fi
}

# --- system packages ---
# --error-on=any: apt-get update otherwise only warns when an index cannot be fetched, and the install fails later.
run env DEBIAN_FRONTEND=noninteractive apt-get update --error-on=any
run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${SYSTEM_PACKAGES[@]}"
run rm -rf /var/lib/apt/lists
run mkdir -p /var/lib/apt/lists/partial

# --- Python: a venv isolated from the system Python, torch pinned by a constraints file ---
run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/python" -m pip install --no-cache-dir --upgrade pip setuptools wheel
# The constraints file keeps every later install from replacing torch with another build.
write_lines "$CONSTRAINTS" "torch==${TORCH_VERSION}"
run "$VENV/bin/python" -m pip install --no-cache-dir "${TORCH_INDEX_ARGS[@]}" "torch==${TORCH_VERSION}"

if [ "$MODE" = gpu ]; then
    # Fused Mamba kernels, compiled here against the torch above. --no-build-isolation: the build must see this
    # torch (an isolated build env would fetch another one and produce an ABI mismatch). *_FORCE_BUILD: compile
    # instead of fetching a prebuilt wheel from GitHub (may not match torch/CUDA). TORCH_CUDA_ARCH_LIST: A100 (8.0)
    # and H100/H200 (9.0); MAX_JOBS bounds nvcc's memory use (raise it on a big build machine).
    KERNEL_BUILD_ENV=(TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=4 CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE)
    run "$VENV/bin/python" -m pip install --no-cache-dir -c "$CONSTRAINTS" packaging ninja
    run env "${KERNEL_BUILD_ENV[@]}" "$VENV/bin/python" -m pip install --no-cache-dir --no-build-isolation \
        -c "$CONSTRAINTS" causal-conv1d==1.5.3.post1
    run env "${KERNEL_BUILD_ENV[@]}" "$VENV/bin/python" -m pip install --no-cache-dir --no-build-isolation \
        -c "$CONSTRAINTS" mamba-ssm==2.2.6.post3
fi

# The project with every dependency from pyproject.toml (the gpu extra is already satisfied by the builds above).
# Not editable: %files' copy is the only source in the image.
run "$VENV/bin/python" -m pip install --no-cache-dir -c "$CONSTRAINTS" "${PROJECT}[${EXTRAS}]"

if [ "$SPICE_JARS" = 1 ]; then
    # SPICE needs Stanford CoreNLP 3.6.0 in pycocoevalcap's spice/lib/. Fetched now, at build time: pycocoevalcap
    # would otherwise download it mid-run (compute nodes are usually offline) into its own package dir (read-only
    # in the image).
    if [ "$DRY_RUN" = 0 ]; then
        # Where panobench's find_spice_jars looks (pycocoevalcap is a namespace package: no __file__).
        SPICE_LIB="$("$VENV/bin/python" -c \
            'from panobench.evaluation.metrics import pycocoevalcap_dir; print(pycocoevalcap_dir() / "spice/lib")')"
    else
        SPICE_LIB="<pycocoevalcap>/spice/lib"
    fi
    run wget -q -O "/tmp/${CORENLP}.zip" "https://nlp.stanford.edu/software/${CORENLP}.zip"
    run unzip -q -j "/tmp/${CORENLP}.zip" \
        "${CORENLP}/${CORENLP_JARS[0]}" "${CORENLP}/${CORENLP_JARS[1]}" -d "$SPICE_LIB"
    run rm -f "/tmp/${CORENLP}.zip"
    run unzip -tq "${SPICE_LIB}/${CORENLP_JARS[0]}"
    run unzip -tq "${SPICE_LIB}/${CORENLP_JARS[1]}"
fi

# What %test checks the image against: the mode it was built for, the torch pin, whether SPICE's jars are in.
write_lines "${PROJECT}/build-info" "mode=${MODE}" "torch=${TORCH_VERSION}" "spice_jars=${SPICE_JARS}"
run chmod -R a+rX "$VENV" "$PROJECT"
