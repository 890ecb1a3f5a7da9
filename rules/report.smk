# One leaderboard row per run and an HTML page with metrics and loss curves.
rule report:
    input:
        metrics=run_files("metrics.json"),
        logs=run_files("train_log.csv"),
        curves=run_files("loss.png"),
    output:
        leaderboard="results/leaderboard.csv",
        html="results/report.html",
    log:
        "logs/report/report.log",
    conda:
        "../envs/eval.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        script=script("report"),
        runs=stages.report_runs(CFG),
    shell:
        "python {params.script} --runs {params.runs:q} --metrics {input.metrics} --logs {input.logs}"
        " --curves {input.curves} --leaderboard {output.leaderboard} --html {output.html} > {log} 2>&1"
