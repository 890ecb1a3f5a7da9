# Make each base model available (build, validate, or download) and record it in a manifest. A local rule: on a
# cluster it runs where Snakemake runs (the login node, which has internet), never on a compute node.
rule download:
    output:
        manifest=paths.pattern("model_manifest"),
    log:
        paths.log("download"),
    localrule: True
    conda:
        "../envs/download.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        settings=lambda wc: stages.download_settings(CFG, wc.model),
    shell:
        "download.py --manifest {output.manifest:q} --settings {params.settings:q} 3>&2 > {log:q} 2>&1"
