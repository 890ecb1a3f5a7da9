# One leaderboard row per run, an HTML page with metrics and loss curves, and each sweep's runs.csv/best.json.
rule report:
    input:
        LAYOUT.report_inputs(),
    output:
        leaderboard=report(
            paths.pattern("leaderboard"),
            category="Leaderboard",
            caption="report/leaderboard.rst",
        ),
        html=report(
            paths.pattern("report_html"),
            category="Leaderboard",
            caption="report/report_html.rst",
        ),
        sweep_files=[
            path for name in CFG.sweeps for path in LAYOUT.sweep_files(name).values()
        ],
    log:
        paths.log("report"),
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        runs=stages.report_records(CFG, LAYOUT),
        sweeps=stages.sweep_settings(CFG, LAYOUT),
    shell:
        "report.py --runs {params.runs:q} --sweeps {params.sweeps:q}"
        " --leaderboard {output.leaderboard:q} --html {output.html:q} 3>&2 > {log:q} 2>&1"


# `snakemake best`: the best run of every sweep, with the model to load for it (for predict, chat or serve).
rule best:
    input:
        [LAYOUT.sweep_files(name)["best_json"] for name in CFG.sweeps],
    log:
        paths.log("best"),
    localrule: True
    conda:
        "../envs/evaluate.yaml"
    shell:
        "for best in {input:q}; do cat $best; done | tee {log:q}"
