# One leaderboard row per run and an HTML page with metrics and loss curves.
rule report:
    input:
        metrics=run_files("metrics.json"),
        logs=run_files("train_log.csv", owner=stages.train_owner),
        curves=run_files("loss.png", owner=stages.train_owner),
        predictions=run_files("predictions.csv", owner=stages.predict_owner),
        benchmarks=stages.benchmark_outputs(CFG),
    output:
        leaderboard=report(
            "results/leaderboard.csv",
            category="Leaderboard",
            caption="report/leaderboard.rst",
        ),
        html=report(
            "results/report.html",
            category="Leaderboard",
            caption="report/report_html.rst",
        ),
        sweep_tables=expand("results/sweeps/{sweep}/runs.csv", sweep=CFG.sweeps),
        sweep_best=expand("results/sweeps/{sweep}/best.json", sweep=CFG.sweeps),
    log:
        "logs/report/report.log",
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        script=script("report"),
        runs=stages.report_runs(CFG),
        sweeps=stages.sweep_settings(CFG),
        train_times=[
            f"logs/train/{stages.train_owner(CFG, run)}.benchmark.tsv"
            for run in CFG.runs
        ],
    shell:
        "python {params.script} --runs {params.runs:q} --metrics {input.metrics} --logs {input.logs}"
        " --curves {input.curves} --predictions {input.predictions} --train-times {params.train_times}"
        " --benchmarks {input.benchmarks} --leaderboard {output.leaderboard} --html {output.html}"
        " --sweeps {params.sweeps:q} > {log} 2>&1"


# `snakemake best`: the best run of every sweep, with the path of its merged model (for predict or serve).
rule best:
    input:
        expand("results/sweeps/{sweep}/best.json", sweep=CFG.sweeps),
    log:
        "logs/report/best.log",
    localrule: True
    conda:
        "../envs/evaluate.yaml"
    shell:
        "for best in {input}; do cat $best; done | tee {log}"
