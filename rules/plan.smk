# The resource plan: expected peak GPU memory, RAM and disk of each stage of every run (snakemake plan).
rule plan:
    log:
        paths.log("plan"),
    localrule: True
    conda:
        "../envs/evaluate.yaml"
    params:
        config=json.dumps(config),
    shell:
        "plan.py --config {params.config:q} 2>&1 | tee {log:q}"
