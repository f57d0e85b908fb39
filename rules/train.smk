# Training stages. Each job resumes from its last.ckpt when re-run after an interruption (--rerun-incomplete,
# SLURM retries); measurements.json is written last and marks the stage complete. last.ckpt/best.ckpt are not
# declared outputs on purpose: Snakemake deletes the outputs of an incomplete job before re-running it, which
# would throw away the checkpoint to resume from.


rule train_vision:
    input:
        cfg=f"results/{NAME}/configs/{{recipe}}.yaml",
        data=data_inputs(),
        fingerprint=data_fingerprint_file(),
        models=model_inputs(),
    output:
        f"{RUNS}/{{recipe}}/vision/anyres-e2p_{{resampler}}/measurements.json",
    log:
        f"logs/{NAME}/train_vision/{{recipe}}_{{resampler}}.log",
    benchmark:
        f"benchmarks/{NAME}/train_vision/{{recipe}}_{{resampler}}.tsv"
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
        cfg=f"results/{NAME}/configs/{{cell}}.yaml",
        data=data_inputs(),
        fingerprint=data_fingerprint_file(),
        models=model_inputs(),
        vision=lambda wildcards: vision_input(wildcards.cell),
    output:
        f"{RUNS}/{{cell}}/resampler/anyres-e2p_{{resampler}}/measurements.json",
    log:
        f"logs/{NAME}/train_resampler/{{cell}}/anyres-e2p_{{resampler}}.log",
    benchmark:
        f"benchmarks/{NAME}/train_resampler/{{cell}}/anyres-e2p_{{resampler}}.tsv"
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
        cfg=f"results/{NAME}/configs/{{cell}}.yaml",
        data=data_inputs(),
        fingerprint=data_fingerprint_file(),
        models=model_inputs(),
        vision=lambda wildcards: vision_input(wildcards.cell),
        stage2=lambda wildcards: get_stage_marker(wildcards.cell, "resampler"),
    output:
        f"{RUNS}/{{cell}}/finetune/anyres-e2p_{{resampler}}/measurements.json",
    log:
        f"logs/{NAME}/train_finetune/{{cell}}/anyres-e2p_{{resampler}}.log",
    benchmark:
        f"benchmarks/{NAME}/train_finetune/{{cell}}/anyres-e2p_{{resampler}}.tsv"
    threads: RES["train_threads"]
    resources:
        gpu=1,
        mem_mb=RES["gpu_mem_mb"],
        runtime=RES["gpu_runtime_min"],
    shell:
        "OMP_NUM_THREADS={threads} panobench train --config {input.cfg:q} --stage finetune"
        " --data-fingerprint {input.fingerprint:q} > {log:q} 2>&1"
