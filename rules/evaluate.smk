# Score the predictions: BLEU-4, ROUGE-1/2/L, exact match, label accuracy/precision/recall/F1.
rule evaluate:
    input:
        unpack(run_train_summary),
        predictions=lambda wc: LAYOUT.run_file("predictions", wc.run),
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
        summary=run_train_summary_argument,
    shell:
        "evaluate.py --predictions {input.predictions:q} {params.summary} --out {output.metrics:q}"
        " --settings {params.settings:q} 3>&2 > {log:q} 2>&1"


# The same scores for each dataset in the run's evaluation.test_sets.
use rule evaluate as evaluate_test_set with:
    input:
        predictions=lambda wc: LAYOUT.run_file(
            "test_set_predictions", wc.run, test_set=wc.test_set
        ),
    output:
        metrics=paths.pattern("test_set_metrics"),
    log:
        paths.log("evaluate_test_set"),
    benchmark:
        paths.timing("evaluate_test_set")
    params:
        settings=lambda wc: stages.eval_settings(CFG, wc.run),
        summary="",
