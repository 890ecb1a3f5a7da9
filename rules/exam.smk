# Score a run on a multiple-choice exam (MMCU / C-Eval / CMMLU layout) by the log-likelihood of A/B/C/D.
rule exam:
    input:
        unpack(lambda wc: LAYOUT.run_model(wc.run)),
        questions=lambda wc: exam_files(CFG.exams[wc.exam]["path"]),
    output:
        result=paths.pattern("exam_result"),
    log:
        paths.log("exam"),
    benchmark:
        paths.timing("exam")
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        folder=lambda wc: CFG.exams[wc.exam]["path"],
        settings=lambda wc: stages.exam_settings(CFG, wc.run),
        model_args=run_model_arguments,
    shell:
        "exam.py {params.model_args} --exam {params.folder:q} --name {wildcards.exam:q}"
        " --out {output.result:q} --settings {params.settings:q} 3>&2 > {log:q} 2>&1"
