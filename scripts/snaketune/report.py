"""Report stage: one leaderboard row per run and a self-contained HTML page with metrics and loss curves."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

from snaketune.io import atomic_file, write_json

RUN_COLUMNS = ["run", "model", "dataset", "stage", "from_run", "method", "learning_rate", "num_train_epochs",
               "max_steps"]
TRAIN_COLUMNS = ["train_seconds", "train_steps", "final_loss", "tokens_per_second"]
METRIC_COLUMNS = ["n", "exact_match", "contains", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "text_tokenizer",
                  "bleu_mode", "rouge_mode", "accuracy", "precision", "recall", "f1", "preference_accuracy",
                  "reward_accuracy", "reward_margin"]
TEST_SET_COLUMNS = ["n", "exact_match", "contains", "bleu-4", "rouge-l", "accuracy"]  # a test set's leaderboard
SAMPLE_ROWS = 5  # predictions shown beside their references per run


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a run's train_log.csv."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def train_seconds(benchmark_tsv: Path | None) -> float | str:
    """Wall time of the train job, from Snakemake's benchmark file of the train rule."""
    if benchmark_tsv is None or not Path(benchmark_tsv).exists():
        return ""
    with open(benchmark_tsv, newline="") as handle:
        return round(float(next(csv.DictReader(handle, delimiter="\t"))["s"]), 1)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run_row(record: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard row of one run: its settings, what its training recorded for the whole run (steps,
    final loss, tokens/s) and the job's wall time, every metric and exam accuracy."""
    files = record["files"]
    summary = read_json(files["train_summary"]) if "train_summary" in files else {}  # a baseline trains nothing
    metrics = read_json(files["metrics"])
    row = {key: record.get(key, "") for key in RUN_COLUMNS}
    row["train_seconds"] = train_seconds(files.get("train_timing"))
    row["train_steps"] = summary.get("global_step", 0)
    row["final_loss"] = summary.get("final_loss") if summary.get("final_loss") is not None else ""
    row["tokens_per_second"] = summary.get("tokens_per_second") or ""
    row.update({key: metrics.get(key, "") for key in METRIC_COLUMNS})
    for name, path in record.get("exams", {}).items():
        result = read_json(path)
        row[f"{name}_accuracy"] = result["accuracy"]
        row[f"{name}_ties"] = result.get("ties", 0)  # questions decided by the earlier letter of a tie
    for name, path in record.get("test_sets", {}).items():  # the run scored on other datasets' test splits
        scores = read_json(path)
        row.update({f"{name}:{key}": scores[key] for key in TEST_SET_COLUMNS if key in scores})
    return row


def prediction_samples(runs: list[str], predictions: list[Path]) -> str:
    """HTML: the first few test rows of each run, reference beside prediction."""
    import pandas as pd

    parts = []
    for run, path in zip(runs, predictions, strict=True):
        frame = pd.read_csv(path, keep_default_na=False, dtype=str).head(SAMPLE_ROWS)
        cells = "".join(f"<tr><td>{html.escape(r['id'])}</td><td class='text'>{html.escape(r['reference'])}</td>"
                        f"<td class='text'>{html.escape(r['prediction'])}</td></tr>" for _, r in frame.iterrows())
        parts.append(f"<h3>{html.escape(run)}</h3><div class='scroll'><table><thead><tr><th>id</th>"
                     f"<th>reference</th><th>prediction</th></tr></thead><tbody>{cells}</tbody></table></div>")
    return "".join(parts)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table in a box that scrolls sideways when it is wider than the page."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def exam_tables(records: list[dict[str, Any]]) -> str:
    """Per exam, accuracy per subject (rows) for each run that took it (columns), with the question counts."""
    by_exam: dict[str, dict[str, dict]] = {}
    for record in records:
        for name, path in record.get("exams", {}).items():
            by_exam.setdefault(name, {})[record["run"]] = read_json(path)
    parts = []
    for name, results in by_exam.items():
        runs = list(results)
        subjects = sorted({subject for result in results.values() for subject in result["subjects"]})
        rows = [[subject, next(r["subjects"][subject]["n"] for r in results.values() if subject in r["subjects"]),
                 *[results[run]["subjects"].get(subject, {}).get("accuracy", "") for run in runs]]
                for subject in subjects]
        rows.append(["overall", next(iter(results.values()))["n"], *[results[run]["accuracy"] for run in runs]])
        parts.append(f"<h3>{html.escape(name)}</h3>" + table(["subject", "questions", *runs], rows))
    return "".join(parts) or "<p>No run takes an exam.</p>"


def confusion_tables(records: list[dict[str, Any]]) -> str:
    """Per run with label metrics: the confusion table, reference label (rows) against predicted label."""
    parts = []
    for record in records:
        confusion = read_json(record["files"]["metrics"]).get("confusion")
        if confusion:
            predicted = list(next(iter(confusion.values())))
            rows = [[gold, *[counts[p] for p in predicted]] for gold, counts in confusion.items()]
            parts.append(f"<h3>{html.escape(record['run'])}</h3>"
                         + table(["reference \\ predicted", *predicted], rows))
    return "".join(parts) or "<p>No run has label metrics.</p>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def figure_png(fig) -> str:
    """A matplotlib figure as a base64 PNG for an <img> tag."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def write_sweep(name: str, sweep: dict[str, Any], rows: list[dict[str, Any]],
                logs: dict[str, list[dict[str, str]]], serve: dict[str, dict[str, str]]) -> str:
    """Write the sweep's ``runs_csv`` and ``best_json`` (``sweep["files"]``); return its HTML section.

    ``best.json`` names what to load for the best run (``serve``: its merged folder, or base manifest + adapter),
    which the report's inputs guarantee is built.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snaketune.sweeps import select_best

    by_run = {row["run"]: row for row in rows}
    members = [by_run[run] for run in sweep["runs"]]
    settings = sorted({key for point in sweep["runs"].values() for key in point})
    metric, mode = sweep["select_by"], sweep["select_mode"]
    with atomic_file(sweep["files"]["runs_csv"]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["run", *settings, metric])
        writer.writeheader()
        writer.writerows({"run": run, **point, metric: by_run[run].get(metric, "")}
                         for run, point in sweep["runs"].items())
    best = select_best(members, metric, mode)
    write_json(sweep["files"]["best_json"], {
        "sweep": name, "select_by": metric, "select_mode": mode, "run": best["run"], "value": best[metric],
        "settings": sweep["runs"][best["run"]], "load": serve[best["run"]],
        "metrics": {key: best[key] for key in METRIC_COLUMNS if best.get(key, "") != ""},
    })

    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3), squeeze=False)
    for ax, key in zip(axes[0], settings, strict=True):
        values = [(sweep["runs"][row["run"]][key], row.get(metric)) for row in members]
        ax.scatter([str(v) if isinstance(v, str) else v for v, _ in values], [m for _, m in values])
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
    scatter = figure_png(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in sweep["runs"]:
        log = logs[run]
        ax.plot([int(r["step"]) for r in log], [float(r["loss"]) for r in log], label=run)
    ax.set(xlabel="step", ylabel="training loss", title=f"sweep {name}")
    ax.legend(fontsize=6)
    curves = figure_png(fig)
    return (f"<h2>Sweep {html.escape(name)}</h2><p>best by {html.escape(metric)} ({mode}): "
            f"<b>{html.escape(best['run'])}</b> = {_cell(best[metric])}</p>"
            f"<img alt='{html.escape(metric)} against each swept setting' src='data:image/png;base64,{scatter}'>"
            f"<img alt='loss curves of sweep {html.escape(name)}' src='data:image/png;base64,{curves}'>")


def write_report(records: list[dict[str, Any]], leaderboard: Path, page: Path,
                 sweeps: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write ``leaderboard.csv``, ``report.html`` and each sweep's ``runs.csv``/``best.json``.

    ``records`` holds one entry per run (``layout.Layout.report_record``): its columns and the files to read.
    """
    parsed_logs = [read_log(record["files"]["train_log"]) if "train_log" in record["files"] else []
                   for record in records]
    rows = [run_row(record) for record in records]
    exam_columns = sorted({f"{name}_{what}" for record in records for name in record.get("exams", {})
                           for what in ("accuracy", "ties")})
    test_set_columns = list(dict.fromkeys(key for row in rows for key in row if ":" in key))  # {test_set}:{metric}
    columns = RUN_COLUMNS + TRAIN_COLUMNS + METRIC_COLUMNS + exam_columns + test_set_columns
    for row in rows:
        for column in exam_columns + test_set_columns:
            row.setdefault(column, "")
    with atomic_file(leaderboard) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    figures = "".join(
        f"<figure><img alt='loss curve of {html.escape(r['run'])}' src='data:image/png;base64,"
        f"{base64.b64encode(Path(curve).read_bytes()).decode()}'><figcaption>{html.escape(r['run'])}"
        f"</figcaption></figure>"
        for r, curve in zip(rows, [record["files"].get("loss_curve") for record in records], strict=True)
        if curve is not None
    )
    samples = prediction_samples([r["run"] for r in rows], [record["files"]["predictions"] for record in records])
    log_of = {row["run"]: log for row, log in zip(rows, parsed_logs, strict=True)}
    serve = {record["run"]: record["serve"] for record in records}
    sections = "".join(write_sweep(name, sweep, rows, log_of, serve) for name, sweep in (sweeps or {}).items())
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>snaketune report</title>
<style>
body{{font-family:"Noto Sans CJK SC","Source Han Sans SC","PingFang SC","Microsoft YaHei",sans-serif;margin:2em}}
.scroll{{max-width:100%;overflow-x:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{white-space:normal;max-width:9em}}
figure{{display:inline-block;margin:1em}}img{{max-width:100%}}
td.text{{text-align:left;white-space:pre-wrap;max-width:40em;overflow-wrap:anywhere}}</style>
</head><body><h1>snaketune report</h1>
<h2>Leaderboard</h2><p>exact_match, accuracy, precision, recall, f1 and exam accuracies are fractions;
BLEU and ROUGE are percentages.</p>
{table(columns, [[r[c] for c in columns] for r in rows])}
<h2>Training loss</h2>{figures}
<h2>Exams: accuracy per subject</h2>{exam_tables(records)}
<h2>Labels: confusion tables</h2>{confusion_tables(records)}
<h2>Predictions beside references (first {SAMPLE_ROWS} test rows)</h2>{samples}
{sections}
</body></html>
"""
    with atomic_file(page) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return rows
