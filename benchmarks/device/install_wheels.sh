# Sourced by run_gpu_session.sh / run_ddp_session.sh ON THE LENT GPU MACHINE: installs the carried wheels (.whl/:
# Snakemake and the part of its closure the device image lacks; .gpuwheels/: mamba_ssm built for its torch) and this
# project into /tmp/site, in ONE pip call — with --target a second call would not add its console scripts to the
# existing /tmp/site/bin (seen 2026-11-28: `panobench` missing, every rule exited 127) and --upgrade would replace
# bin/ wholesale. Then checks that the console scripts and the fused Mamba scan are there.
shopt -s nullglob
wheels=(.whl/*.whl .gpuwheels/*.whl)   # .gpuwheels/ may stay behind when no bimamba row runs (the DDP session)
shopt -u nullglob
(( ${#wheels[@]} )) || { echo "no wheels in .whl/: run benchmarks/device/prepare_wheels.sh here and carry .whl"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
  --target /tmp/site "${wheels[@]}" . || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
command -v panobench snakemake || { echo "console scripts missing from /tmp/site/bin"; exit 1; }
# torch first: the extension links against libc10.so, which only torch's import puts on the loader's path.
python3 -c "import torch, selective_scan_cuda" || echo "WARNING: fused mamba_ssm scan not importable (bimamba rows fail)"
