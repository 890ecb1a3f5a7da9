# Tokenize a dataset once per model: read any layout, split, render with the chat template, mask, write parquet.
# Params and inputs are exactly what the build depends on: files, format settings, template, length, seed. A replay
# dataset reads the answers the replay rule generated; a mix reads its datasets' builds for the same model.
# Threads are the processes that tokenize (num_workers): not a param, so a new count never rebuilds. The script
# reads them from OMP_NUM_THREADS, which Snakemake sets to a job's threads (the command line stays as it was, so
# finished builds are not rerun for a changed command).
rule dataset:
    input:
        unpack(lambda wc: LAYOUT.dataset_inputs(wc.dataset, wc.model)),
        manifest=lambda wc: LAYOUT.model_file("model_manifest", wc.model),
    output:
        train=paths.pattern("train_split"),
        eval=paths.pattern("eval_split"),
        test=paths.pattern("test_split"),
        stats=paths.pattern("dataset_stats"),
        lengths=paths.pattern("dataset_lengths"),
    log:
        paths.log("dataset"),
    conda:
        "../envs/dataset.yaml"
    threads: lambda wc: stages.dataset_threads(CFG, wc.dataset)
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        settings=lambda wc: stages.dataset_settings(CFG, wc.dataset),
        sources=dataset_source_arguments,
    shell:
        "dataset.py --model-manifest {input.manifest:q} {params.sources} --train {output.train:q}"
        " --eval {output.eval:q} --test {output.test:q} --stats {output.stats:q} --lengths {output.lengths:q}"
        " --settings {params.settings:q} 3>&2 > {log:q} 2>&1"
