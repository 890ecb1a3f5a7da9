# A replay dataset's rows: the model it is built for answers the dataset's prompt file itself (greedy), so training
# beside new data keeps what the model answered before. The dataset rule then builds the answers like any file.
rule replay:
    input:
        manifest=lambda wc: LAYOUT.model_file("model_manifest", wc.model),
        prompts=lambda wc: CFG.datasets[wc.dataset].replay,
    output:
        answers=paths.pattern("replay_answers"),
    log:
        paths.log("replay"),
    benchmark:
        paths.timing("replay")
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        settings=lambda wc: stages.replay_settings(CFG, wc.dataset),
    shell:
        "replay.py --model-manifest {input.manifest:q} --out {output.answers:q} --settings {params.settings:q}"
        " 3>&2 > {log:q} 2>&1"
