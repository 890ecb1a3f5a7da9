# The resource plan: expected peak GPU memory, RAM and disk of each stage of every run (snakemake plan).
rule plan:
    log:
        paths.log("plan"),
    localrule: True
    conda:
        "../envs/evaluate.yaml"
    params:
        files=" ".join(quote(str(path)) for path in workflow.configfiles),
        overrides=json.dumps(workflow.config_settings.config),
    shell:
        "plan.py --configfile {params.files} --config {params.overrides:q} 2>&1 | tee {log:q}"
