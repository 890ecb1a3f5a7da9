# Fine-tune one run (torchrun with one process per GPU when gpus > 1); a restarted job resumes from its
# checkpoints folder (params: the job's own resumable state, kept outside its outputs so Snakemake never wipes it).
rule train:
    input:
        unpack(run_start_model),
        manifest=run_model_manifest,
        train=run_dataset_file("train_split"),
        eval=run_dataset_file("eval_split"),
        stats=run_dataset_file("dataset_stats"),
    output:
        adapter=directory(paths.pattern("adapter")),
        train_log=paths.pattern("train_log"),
        summary=paths.pattern("train_summary"),
        curve=report(
            paths.pattern("loss_curve"),
            category="Loss curves",
            subcategory="{run}",
            caption="report/loss.rst",
        ),
    log:
        paths.log("train"),
    benchmark:
        paths.timing("train")
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        # one node: `gpu` GPUs (the local profiles schedule them; Slurm: --gpus). Several nodes (Slurm only):
        # `nodes` nodes with `gpus` GPUs each (--gres=gpu:N is per node); train.py starts one torchrun per node.
        gpu=lambda wc: (
            CFG.runs[wc.run].train.gpus if CFG.runs[wc.run].train.nodes == 1 else 0
        ),
        nodes=lambda wc: CFG.runs[wc.run].train.nodes,
        gres=lambda wc: (
            f"gpu:{CFG.runs[wc.run].train.gpus}"
            if CFG.runs[wc.run].train.nodes > 1
            else ""
        ),
        mem_mb=8000,
        runtime=1440,
    params:
        checkpoints=lambda wc: paths.pattern("checkpoints").format(run=wc.run),
        tensorboard=lambda wc: paths.pattern("tensorboard").format(run=wc.run),
        settings=lambda wc: stages.train_settings(CFG, wc.run),
        start=run_start_argument,
    shell:
        "train.py --model-manifest {input.manifest:q} {params.start} --train {input.train:q} --eval {input.eval:q}"
        " --stats {input.stats:q} --adapter {output.adapter:q} --train-log {output.train_log:q}"
        " --summary {output.summary:q} --curve {output.curve:q} --checkpoints {params.checkpoints:q}"
        " --tensorboard {params.tensorboard:q} --name {wildcards.run:q} --settings {params.settings:q}"
        " 3>&2 > {log:q} 2>&1"
