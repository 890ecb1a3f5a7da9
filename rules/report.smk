# One leaderboard row per run; an HTML page comparing the runs (metrics against baselines, plots, answers side by
# side); loss and metric plots per dataset; each sweep's runs.csv, best.json and plot.
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
        loss_plots=[
            report(
                path,
                category="Plots",
                subcategory="Loss",
                caption="report/loss_plot.rst",
            )
            for path in LAYOUT.report_plots()["loss"].values()
        ],
        metric_plots=[
            report(
                path,
                category="Plots",
                subcategory="Metrics",
                caption="report/metrics_plot.rst",
            )
            for path in LAYOUT.report_plots()["metrics"].values()
        ],
        sweep_files=[
            path
            for name in CFG.sweeps
            for key, path in LAYOUT.sweep_files(name).items()
            if key != "plot"
        ],
        sweep_plots=[
            report(
                LAYOUT.sweep_files(name)["plot"],
                category="Sweeps",
                caption="report/sweep_plot.rst",
            )
            for name in CFG.sweeps
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
        plots=json.dumps(LAYOUT.report_plots(), ensure_ascii=False),
    shell:
        "report.py --runs {params.runs:q} --sweeps {params.sweeps:q} --plots {params.plots:q}"
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
