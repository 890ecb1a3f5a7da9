# Fold the adapter into the base model: a standalone Hugging Face folder.
rule merge:
    input:
        unpack(run_start_model),
        manifest=run_model_manifest,
        adapter=lambda wc: LAYOUT.run_file("adapter", wc.run),
    output:
        merged=directory(paths.pattern("merged")),
    log:
        paths.log("merge"),
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        settings=lambda wc: stages.merge_settings(CFG, wc.run),
        start=run_start_argument,
    shell:
        "merge.py --model-manifest {input.manifest:q} {params.start} --adapter {input.adapter:q}"
        " --out {output.merged:q} --settings {params.settings:q} 3>&2 > {log:q} 2>&1"
