# snaketune: base LLM + dataset -> fine-tuned model with measured quality, rerunning only what went stale.
#   snakemake --profile profiles/local                       the embedded default (tiny model, CPU)
#   snakemake --profile profiles/local --configfile my.yaml  your models, datasets and runs
from snakemake.utils import min_version

min_version("9.0")


# The embedded default applies only when no --configfile is given: Snakemake would otherwise merge the
# demo's runs into the user's config.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/replay.smk"
include: "rules/dataset.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/export.smk"
include: "rules/predict.smk"
include: "rules/evaluate.smk"
include: "rules/exam.smk"
include: "rules/report.smk"
include: "rules/serve.smk"
include: "rules/plan.smk"


rule all:
    default_target: True
    input:
        LAYOUT.final_outputs(),
