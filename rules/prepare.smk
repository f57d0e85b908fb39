# Inputs every cell shares: the dataset, the backbones, the matrix manifest, tiling sheets (the resolved configs are
# written when the DAG is built: rules/common.smk).


if config.get("synthetic"):

    rule synth_data:
        output:
            csvs=[
                f"{config['synthetic']['out']}/{split}.csv"
                for split in ("train", "valid", "test")
            ],
            summary=f"{config['synthetic']['out']}/summary.json",
        log:
            f"logs/{NAME}/synth_data.log",
        benchmark:
            f"benchmarks/{NAME}/synth_data.tsv"
        params:
            out=lambda wildcards, output: str(Path(output.summary).parent),
            seed=config["synthetic"]["seed"],
            n_train=config["synthetic"]["n_train"],
            n_valid=config["synthetic"]["n_valid"],
            n_test=config["synthetic"]["n_test"],
            width=config["synthetic"]["width"],
            height=config["synthetic"]["height"],
        shell:
            "panobench synth --out {params.out:q} --seed {params.seed} --n-train {params.n_train}"
            " --n-valid {params.n_valid} --n-test {params.n_test} --width {params.width}"
            " --height {params.height} > {log:q} 2>&1"


if config.get("source"):

    rule prepare_data:
        input:
            published=published_csv_inputs(),
        output:
            csvs=PREPARED["csvs"],
            manifest=PREPARED["manifest"],
            dropped=PREPARED["dropped"],
        log:
            f"logs/{NAME}/prepare_data.log",
        benchmark:
            f"benchmarks/{NAME}/prepare_data.tsv"
        # Runs where Snakemake runs: cluster compute nodes often have no internet access.
        localrule: True
        params:
            published=[config["source"][split] for split in ("train", "valid", "test")],
            out=lambda wildcards, output: str(Path(output.manifest).parent),
            options=prepare_data_options(),
        shell:
            "panobench prepare-data --csv {params.published:q} --out {params.out:q} {params.options:q}"
            " > {log:q} 2>&1"


if config.get("tiny_models"):

    rule materialize_models:
        input:
            csvs=data_inputs(),
        output:
            vision=f"{config['tiny_models']['out']}/vision/config.json",
            llm=f"{config['tiny_models']['out']}/llm/config.json",
        log:
            f"logs/{NAME}/materialize_models.log",
        benchmark:
            f"benchmarks/{NAME}/materialize_models.tsv"
        params:
            data_dir=lambda wildcards, input: str(Path(input.csvs[0]).parent),
            out=lambda wildcards, output: str(Path(output.vision).parent.parent),
            seed=config["tiny_models"]["seed"],
            warmup=config["tiny_models"]["lm_warmup_steps"],
            # The warm-up trains on the stages' exact prompts, so it needs the run config's instruction (a
            # function: a plain string param would be wildcard-formatted and trip over "{query}").
            instruction=lambda wildcards: EXPERIMENTS[next(iter(EXPERIMENTS))][
                "prompt_instruction"
            ],
        shell:
            "OMP_NUM_THREADS={threads} panobench materialize --data-dir {params.data_dir:q} --out {params.out:q}"
            " --seed {params.seed} --lm-warmup-steps {params.warmup} --prompt-instruction {params.instruction:q}"
            " > {log:q} 2>&1"


rule fingerprint_data:
    # Once per config: hashing every image of a real dataset takes a while; every job records this file.
    input:
        csvs=data_inputs(),
    output:
        data_fingerprint_file(),
    log:
        f"logs/{NAME}/fingerprint_data.log",
    benchmark:
        f"benchmarks/{NAME}/fingerprint_data.tsv"
    params:
        csvs=lambda wildcards, input: [
            f"{split}={path}"
            for split, path in zip(("train", "valid", "test"), input.csvs)
        ],
        root=lambda wildcards: data_root(),
    shell:
        "panobench fingerprint --csv {params.csvs:q} --root {params.root:q} -o {output:q} > {log:q} 2>&1"


rule plan_matrix:
    input:
        workflow=WORKFLOW_FILE,
    output:
        pm.manifest_path(config),
    log:
        f"logs/{NAME}/plan_matrix.log",
    benchmark:
        f"benchmarks/{NAME}/plan_matrix.tsv"
    shell:
        "panobench plan --workflow {input.workflow:q} -o {output:q} > {log:q} 2>&1"


rule plot_tiles:
    # Drawn from the resolved config of a cell at this overlap: the sheet shows the tiling its model sees (fov,
    # pitch rows, global view), on the first panorama of that config's test CSV.
    input:
        cfg=get_tiles_config,
        csv=data_inputs()[2],
    output:
        f"results/{NAME}/tiles/ov{{overlap}}.png",
    log:
        f"logs/{NAME}/plot_tiles/ov{{overlap}}.log",
    benchmark:
        f"benchmarks/{NAME}/plot_tiles/ov{{overlap}}.tsv"
    wildcard_constraints:
        overlap=r"\d\.\d\d",
    shell:
        "panobench tiles --config {input.cfg:q} --size 128 -o {output:q} > {log:q} 2>&1"
