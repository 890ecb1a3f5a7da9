# Write a run's model as GGUF (llama.cpp, Ollama) with a Modelfile whose template is the model's chat template.
rule export:
    input:
        unpack(lambda wc: LAYOUT.export_model(wc.run)),
    output:
        gguf=paths.pattern("gguf"),
        modelfile=paths.pattern("modelfile"),
    log:
        paths.log("export"),
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        model_args=run_model_arguments,
        source=lambda wc, input: (
            f"--source-gguf {quote(input.source_gguf)}"
            if "source_gguf" in input.keys()
            else ""
        ),
    shell:
        "export.py {params.model_args} {params.source} --type {wildcards.gguf_type:q} --name {wildcards.run:q}"
        " --out {output.gguf:q} --modelfile {output.modelfile:q} 3>&2 > {log:q} 2>&1"
