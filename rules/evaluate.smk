# Score the predictions: BLEU-4, ROUGE-1/2/L, exact match, label accuracy/precision/recall/F1.
rule evaluate:
    input:
        predictions=lambda wc: f"results/runs/{stages.predict_owner(CFG, wc.run)}/predictions.csv",
    output:
        metrics="results/runs/{run}/metrics.json",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "logs/evaluate/{run}.benchmark.tsv"
    conda:
        "../envs/evaluate.yaml"
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
