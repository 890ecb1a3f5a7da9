# Score a run on a multiple-choice benchmark (C-Eval / CMMLU layout) by the log-likelihood of A/B/C/D.
rule exam:
    input:
        unpack(lambda wc: stages.predict_model_inputs(CFG, wc.run)),
        questions=lambda wc: benchmark_files(CFG.benchmarks[wc.benchmark]["path"]),
    output:
        result="results/runs/{run}/benchmarks/{benchmark}.json",
    log:
        "logs/exam/{run}/{benchmark}.log",
    benchmark:
        "logs/exam/{run}/{benchmark}.benchmark.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        script=script("exam"),
        folder=lambda wc: CFG.benchmarks[wc.benchmark]["path"],
        settings=lambda wc: stages.benchmark_settings(CFG, wc.run),
        model_args=model_arguments,
    shell:
        "python {params.script} {params.model_args} --benchmark {params.folder} --name {wildcards.benchmark}"
        " --out {output.result} --settings {params.settings:q} > {log} 2>&1"
