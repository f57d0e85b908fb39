# Evaluation in two steps that may run on different machines: generate (needs the model: a GPU on clusters)
# and score (needs Java, no GPU).


rule generate:
    # One job per cell generates for every evaluated checkpoint: the model code is imported once.
    input:
        unpack(get_generate_inputs),
    output:
        predictions=[f"{RUNS}/{{cell}}/eval/{s}/predictions.csv" for s in EVAL_STAGES],
        generation=[f"{RUNS}/{{cell}}/eval/{s}/generation.json" for s in EVAL_STAGES],
    log:
        f"logs/{NAME}/generate/{{cell}}.log",
    benchmark:
        f"benchmarks/{NAME}/generate/{{cell}}.tsv"
    threads: RES["train_threads"]
    resources:
        gpu=1,
        mem_mb=RES["gpu_mem_mb"],
        runtime=RES["gpu_runtime_min"],
    params:
        stages=EVAL_STAGES,
        out=lambda wildcards, output: [str(Path(p).parent) for p in output.predictions],
    shell:
        "OMP_NUM_THREADS={threads} panobench generate --config {input.cfg:q} --stage {params.stages}"
        " --out {params.out:q} > {log:q} 2>&1"


rule score:
    # One job per cell scores all its evaluated checkpoints: one Java/METEOR start-up instead of one per stage.
    input:
        predictions=lambda wildcards: [
            f"{RUNS}/{wildcards.cell}/eval/{s}/predictions.csv" for s in EVAL_STAGES
        ],
        generation=lambda wildcards: [
            f"{RUNS}/{wildcards.cell}/eval/{s}/generation.json" for s in EVAL_STAGES
        ],
    output:
        [f"{RUNS}/{{cell}}/eval/{s}/metrics.json" for s in EVAL_STAGES],
    log:
        f"logs/{NAME}/score/{{cell}}.log",
    benchmark:
        f"benchmarks/{NAME}/score/{{cell}}.tsv"
    resources:
        mem_mb=RES["cpu_mem_mb"],
        runtime=RES["cpu_runtime_min"],
    shell:
        "panobench score --predictions {input.predictions:q} --out {output:q} > {log:q} 2>&1"
