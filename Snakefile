# panobench: benchmark panoramic VLMs over a matrix of tile overlaps x resamplers x vision checkpoints x seeds.
#   snakemake --cores all                                     # embedded default (CPU, minutes)
#   snakemake --cores all --configfile config/quic360.yaml    # full scale
#   snakemake --profile profiles/slurm                        # cluster (Apptainer image, --nv)


from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


report: "reports/workflow.rst"


container: config.get("container", "containers/panobench.sif")


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output(),


onerror:
    # With --keep-going, build the report from whatever finished; failed cells are listed as failed. `|| true`: the
    # run has failed already, and the command prints its own one-line outcome naming its log.
    shell(
        "panobench partial-report --workflow {WORKFLOW_FILE:q} --log {PARTIAL_REPORT_LOG:q} || true"
    )
