# Evaluation in two steps that may run on different machines: generate (needs the model: a GPU on clusters)
# and score (needs Java, no GPU).


rule generate:
    # One job per cell generates for every evaluated checkpoint: the model code is imported once.
    input:
        unpack(get_generate_inputs),
    output:
        predictions=[
            f"{pm.eval_dir(config, '{cell}', s)}/predictions.csv" for s in EVAL_STAGES
        ],
        generation=[
            f"{pm.eval_dir(config, '{cell}', s)}/generation.json" for s in EVAL_STAGES
        ],
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
        " --out {params.out:q} --data-fingerprint {input.fingerprint:q} > {log:q} 2>&1"


# Nothing to score: speed configs (score: false) or no evaluated stage.
if config["score"] and EVAL_STAGES:

    rule score:
        # One job scores every cell's predictions: the Java start-ups (PTB tokenizer, METEOR's paraphrase
        # table: seconds each) are paid once, not once per cell; each file is still scored on its own.
        # With --keep-going a failed cell blocks this job; onerror (`panobench partial-report`) then scores the
        # cells that finished.
        input:
            predictions=all_predictions(),
            generation=[
                str(Path(p).parent / "generation.json") for p in all_predictions()
            ],
        output:
            [str(Path(p).parent / "metrics.json") for p in all_predictions()],
        log:
            f"logs/{NAME}/score.log",
        benchmark:
            pm.score_benchmark(config)
        resources:
            mem_mb=RES["cpu_mem_mb"],
            runtime=RES["cpu_runtime_min"],
        shell:
            "panobench score --predictions {input.predictions:q} --out {output:q} > {log:q} 2>&1"
