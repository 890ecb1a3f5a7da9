# Generate answers for the test split: from the merged model, or from the base with the adapter on top
# (generation.predict_from). A restarted job resumes from results/runs/{run}/predictions.partial.csv.
rule predict:
    input:
        unpack(lambda wc: stages.predict_model_inputs(CFG, wc.run)),
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
        model_args=model_arguments,
    shell:
        "python {params.script} {params.model_args} --test {input.test} --out {output.predictions}"
        " --settings {params.settings:q} > {log} 2>&1"
