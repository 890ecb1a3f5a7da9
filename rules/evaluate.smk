# Score the predictions: BLEU-4, ROUGE-1/2/L, exact match, label accuracy/precision/recall/F1.
rule evaluate_predictions:
    input:
        predictions=lambda wc: f"results/runs/{stages.predict_owner(CFG, wc.run)}/predictions.csv",
    output:
        metrics="results/runs/{run}/metrics.json",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "logs/evaluate/{run}.benchmark.tsv"
    conda:
        "../envs/eval.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        script=script("evaluate"),
        settings=lambda wc: stages.eval_settings(CFG, wc.run),
    shell:
        "python {params.script} --predictions {input.predictions} --out {output.metrics}"
        " --settings {params.settings:q} > {log} 2>&1"


# Score a run on a multiple-choice benchmark (C-Eval / CMMLU layout) by the log-likelihood of A/B/C/D.
rule evaluate_benchmark:
    input:
        unpack(lambda wc: stages.predict_model_inputs(CFG, wc.run)),
        questions=lambda wc: benchmark_files(CFG.benchmarks[wc.benchmark]["path"]),
    output:
        result="results/runs/{run}/benchmarks/{benchmark}.json",
    log:
        "logs/benchmark/{run}/{benchmark}.log",
    benchmark:
        "logs/benchmark/{run}/{benchmark}.benchmark.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        script=script("benchmark"),
        folder=lambda wc: CFG.benchmarks[wc.benchmark]["path"],
        settings=lambda wc: stages.benchmark_settings(CFG, wc.run),
        model_args=model_arguments,
    shell:
        "python {params.script} {params.model_args} --benchmark {params.folder} --name {wildcards.benchmark}"
        " --out {output.result} --settings {params.settings:q} > {log} 2>&1"
