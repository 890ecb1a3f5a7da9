# Fine-tune one run (torchrun with one process per GPU when gpus > 1); a restarted job resumes from
# results/runs/{run}/checkpoints/.
rule train:
    input:
        manifest=run_model_manifest,
        train=run_dataset_file("train.parquet"),
        eval=run_dataset_file("eval.parquet"),
        stats=run_dataset_file("stats.json"),
    output:
        adapter=directory("results/runs/{run}/adapter"),
        log_csv="results/runs/{run}/train_log.csv",
        curve=report(
            "results/runs/{run}/loss.png",
            category="Loss curves",
            subcategory="{run}",
            caption="report/loss.rst",
        ),
    log:
        "logs/train/{run}.log",
    benchmark:
        "logs/train/{run}.benchmark.tsv"
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        gpu=lambda wc: CFG.runs[wc.run]["gpus"],
        mem_mb=8000,
        runtime=1440,
    params:
        script=script("train"),
        settings=lambda wc: stages.train_settings(CFG, wc.run),
    shell:
        "python {params.script} --model-manifest {input.manifest} --data $(dirname {input.train})"
        " --run-dir results/runs/{wildcards.run} --settings {params.settings:q} > {log} 2>&1"
