# Training stages. Each job resumes from its last.ckpt when re-run after an interruption (--rerun-incomplete,
# SLURM retries); measurements.json is written last and marks the stage complete. last.ckpt/best.ckpt are not
# declared outputs on purpose: Snakemake deletes the outputs of an incomplete job before re-running it, which
# would throw away the checkpoint to resume from. Every path comes from panobench.matrix (TRAIN, common.smk).


rule train_vision:
    input:
        cfg=TRAIN["vision"]["config"],
        data=data_inputs(),
        fingerprint=data_fingerprint_file(),
        models=model_inputs(),
    output:
        TRAIN["vision"]["marker"],
    log:
        TRAIN["vision"]["log"],
    benchmark:
        TRAIN["vision"]["benchmark"]
    threads: RES["train_threads"]
    resources:
        gpu=1,
        mem_mb=RES["gpu_mem_mb"],
        runtime=RES["gpu_runtime_min"],
    shell:
        "OMP_NUM_THREADS={threads} panobench train --config {input.cfg:q} --stage vision"
        " --data-fingerprint {input.fingerprint:q} > {log:q} 2>&1"


rule train_resampler:
    input:
        cfg=TRAIN["resampler"]["config"],
        data=data_inputs(),
        fingerprint=data_fingerprint_file(),
        models=model_inputs(),
        vision=lambda wildcards: vision_input(wildcards.cell),
        previous=lambda wildcards: get_previous_stage_marker(
            wildcards.cell, "resampler"
        ),
    output:
        TRAIN["resampler"]["marker"],
    log:
        TRAIN["resampler"]["log"],
    benchmark:
        TRAIN["resampler"]["benchmark"]
    threads: RES["train_threads"]
    resources:
        gpu=1,
        mem_mb=RES["gpu_mem_mb"],
        runtime=RES["gpu_runtime_min"],
    shell:
        "OMP_NUM_THREADS={threads} panobench train --config {input.cfg:q} --stage resampler"
        " --data-fingerprint {input.fingerprint:q} > {log:q} 2>&1"


rule train_finetune:
    input:
        cfg=TRAIN["finetune"]["config"],
        data=data_inputs(),
        fingerprint=data_fingerprint_file(),
        models=model_inputs(),
        vision=lambda wildcards: vision_input(wildcards.cell),
        previous=lambda wildcards: get_previous_stage_marker(wildcards.cell, "finetune"),
    output:
        TRAIN["finetune"]["marker"],
    log:
        TRAIN["finetune"]["log"],
    benchmark:
        TRAIN["finetune"]["benchmark"]
    threads: RES["train_threads"]
    resources:
        gpu=1,
        mem_mb=RES["gpu_mem_mb"],
        runtime=RES["gpu_runtime_min"],
    shell:
        "OMP_NUM_THREADS={threads} panobench train --config {input.cfg:q} --stage finetune"
        " --data-fingerprint {input.fingerprint:q} > {log:q} 2>&1"
