# Make each base model available (build, validate, or download) and record it in a manifest.
rule download:
    output:
        manifest="results/models/{model}/manifest.json",
    log:
        "logs/download/{model}.log",
    conda:
        "../envs/download.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        script=script("download"),
        settings=lambda wc: stages.download_settings(CFG, wc.model),
    shell:
        "python {params.script} --out results/models/{wildcards.model} --settings {params.settings:q} > {log} 2>&1"
