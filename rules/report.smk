# One tidy results table and one self-contained HTML report per config.


rule aggregate_results:
    input:
        manifest=pm.manifest_path(config),
        cells=all_cell_outputs(),
    output:
        results=report(
            f"reports/{NAME}/results.csv",
            caption="../reports/captions/results.rst",
            category="Results",
        ),
    log:
        f"logs/{NAME}/aggregate_results.log",
    benchmark:
        f"benchmarks/{NAME}/aggregate_results.tsv"
    shell:
        "panobench aggregate --manifest {input.manifest:q} --out {output.results:q} > {log:q} 2>&1"


rule build_report:
    input:
        results=f"reports/{NAME}/results.csv",
        manifest=pm.manifest_path(config),
        tiles=tiles_sheets(),
    output:
        html=report(
            f"reports/{NAME}/report.html",
            caption="../reports/captions/report.rst",
            category="Report",
        ),
        figures=report(
            directory(f"reports/{NAME}/figures"),
            patterns=["{figure}.png"],
            caption="../reports/captions/figures.rst",
            category="Figures",
        ),
    log:
        f"logs/{NAME}/build_report.log",
    benchmark:
        f"benchmarks/{NAME}/build_report.tsv"
    params:
        out=lambda wildcards, output: str(Path(output.html).parent),
        tiles=tiles_args(),
    shell:
        "panobench report --results {input.results:q} --manifest {input.manifest:q} --out {params.out:q}"
        " --tiles {params.tiles} > {log:q} 2>&1"
