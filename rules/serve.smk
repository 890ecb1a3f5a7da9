# `snakemake --profile profiles/local serve --config serve_run=<run>`: build what the run needs (up to its merged
# model), then serve it with the OpenAI chat-completions API and a chat page until Ctrl-C. Not part of `all`.
rule serve:
    input:
        model=lambda wc: f"results/runs/{stages.merge_owner(CFG, stages.serve_run(CFG))}/merged",
    log:
        "logs/serve/serve.log",
    conda:
        "../envs/serve.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        script=script("serve"),
        host=config.get("serve_host", "127.0.0.1"),
        port=config.get("serve_port", 8000),
    shell:
        "python {params.script} --model {input.model} --host {params.host} --port {params.port} 2>&1 | tee {log}"
