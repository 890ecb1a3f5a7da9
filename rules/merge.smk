# Fold the adapter into the base model: a standalone Hugging Face folder.
rule merge:
    input:
        manifest=run_model_manifest,
        adapter=lambda wc: f"results/runs/{stages.train_owner(CFG, wc.run)}/adapter",
    output:
        merged=directory("results/runs/{run}/merged"),
    log:
        "logs/merge/{run}.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        script=script("merge"),
        settings=lambda wc: stages.merge_settings(CFG, wc.run),
    shell:
        "python {params.script} --model-manifest {input.manifest} --adapter {input.adapter} --out {output.merged}"
        " --settings {params.settings:q} > {log} 2>&1"
