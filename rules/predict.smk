# Generate answers for the test split with the merged model.
rule predict_test:
    input:
        model=lambda wc: f"results/runs/{stages.merge_owner(CFG, wc.run)}/merged",
        test=run_dataset_file("test.parquet"),
    output:
        predictions="results/runs/{run}/predictions.csv",
    log:
        "logs/predict/{run}.log",
    benchmark:
        "logs/predict/{run}.benchmark.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        script=script("predict"),
        settings=lambda wc: stages.generation_settings(CFG, wc.run),
    shell:
        "python {params.script} --model {input.model} --test {input.test} --out {output.predictions}"
        " --settings {params.settings:q} > {log} 2>&1"
