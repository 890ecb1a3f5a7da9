# `snakemake --profile profiles/local serve --config serve_run=<run>`: build what the run needs (its merged
# model, or base + adapter), then serve it with the OpenAI chat-completions API and a chat page until Ctrl-C.
rule serve:
    input:
        unpack(lambda wc: LAYOUT.run_model(stages.serve_run(CFG))),
    log:
        paths.log("serve"),
    conda:
        "../envs/serve.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        host=config.get("serve_host", "127.0.0.1"),
        port=config.get("serve_port", 8000),
        name=lambda wc: stages.serve_run(CFG),
        model_args=run_model_arguments,
    shell:
        "serve.py {params.model_args} --name {params.name:q} --host {params.host:q}"
        " --port {params.port:q} 2>&1 | tee {log:q}"
