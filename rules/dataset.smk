# Tokenize a dataset once per model: read any layout, split, render with the chat template, mask, write parquet.
# Params and inputs are exactly what the build depends on: files, format settings, template, length, seed.
rule dataset:
    input:
        manifest=lambda wc: model_manifest(wc.model),
        data=lambda wc: stages.dataset_files(CFG, wc.dataset),
    output:
        train="results/datasets/{dataset}/{model}/train.parquet",
        eval="results/datasets/{dataset}/{model}/eval.parquet",
        test="results/datasets/{dataset}/{model}/test.parquet",
        stats="results/datasets/{dataset}/{model}/stats.json",
        lengths="results/datasets/{dataset}/{model}/lengths.png",
    log:
        "logs/dataset/{dataset}/{model}.log",
    conda:
        "../envs/dataset.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        script=script("dataset"),
        settings=lambda wc: stages.dataset_settings(CFG, wc.dataset),
    shell:
        "python {params.script} --model-manifest {input.manifest} --out results/datasets/{wildcards.dataset}/{wildcards.model}"
        " --settings {params.settings:q} > {log} 2>&1"
