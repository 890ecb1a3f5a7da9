# Score the predictions: BLEU-4, ROUGE-1/2/L, exact match, label accuracy/precision/recall/F1.
rule evaluate:
    input:
        predictions=lambda wc: LAYOUT.run_file("predictions", wc.run),
        summary=lambda wc: LAYOUT.run_file("train_summary", wc.run),
    output:
        metrics=paths.pattern("metrics"),
    log:
        paths.log("evaluate"),
    benchmark:
        paths.timing("evaluate")
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=lambda wc: stages.eval_settings(CFG, wc.run),
    shell:
        "evaluate.py --predictions {input.predictions:q} --train-summary {input.summary:q} --out {output.metrics:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
