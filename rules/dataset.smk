# Tokenize a dataset once per model: read any layout, split, render with the chat template, mask, write parquet.
# Params and inputs are exactly what the build depends on: files, format settings, template, length, seed.
rule dataset:
    input:
        manifest=lambda wc: LAYOUT.model_file("model_manifest", wc.model),
        data=lambda wc: stages.dataset_files(CFG, wc.dataset),
    output:
        train=paths.pattern("train_split"),
        eval=paths.pattern("eval_split"),
        test=paths.pattern("test_split"),
        stats=paths.pattern("dataset_stats"),
        lengths=paths.pattern("dataset_lengths"),
    log:
        paths.log("dataset"),
    conda:
        "../envs/dataset.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        settings=lambda wc: stages.dataset_settings(CFG, wc.dataset),
    shell:
        "dataset.py --model-manifest {input.manifest:q} --train {output.train:q}"
        " --eval {output.eval:q} --test {output.test:q} --stats {output.stats:q} --lengths {output.lengths:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
