# Generate answers for the test split: from the merged model, or from the base with the adapter on top
# (generation.predict_from). A restarted job resumes from its partial predictions file (params).
rule predict:
    input:
        unpack(lambda wc: LAYOUT.run_model(wc.run)),
        test=run_dataset_file("test_split"),
    output:
        predictions=paths.pattern("predictions"),
    log:
        paths.log("predict"),
    benchmark:
        paths.timing("predict")
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        partial=lambda wc: paths.pattern("partial_predictions").format(run=wc.run),
        settings=lambda wc: stages.generation_settings(CFG, wc.run),
        model_args=run_model_arguments,
    shell:
        "predict.py {params.model_args} --test {input.test:q} --out {output.predictions:q}"
        " --partial {params.partial:q} --settings {params.settings:q} 3>&2 > {log:q} 2>&1"


# The same generation on the test split of each dataset in the run's evaluation.test_sets.
use rule predict as predict_test_set with:
    input:
        unpack(lambda wc: LAYOUT.run_model(wc.run)),
        test=lambda wc: LAYOUT.test_set_split(wc.test_set, wc.run),
    output:
        predictions=paths.pattern("test_set_predictions"),
    log:
        paths.log("predict_test_set"),
    benchmark:
        paths.timing("predict_test_set")
    params:
        partial=lambda wc: paths.pattern("test_set_partial_predictions").format(
            run=wc.run, test_set=wc.test_set
        ),
        settings=lambda wc: stages.generation_settings(CFG, wc.run),
        model_args=run_model_arguments,
