"""Report stage: one leaderboard row per run, and report.html: the runs compared on their metrics first (each
against its baseline), then loss and metric plots, every run's answer to the same test row side by side, training,
the settings that differ, exams and sweeps."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

from snaketune import report_page as page
from snaketune import report_plots as plots
from snaketune.io import atomic_file, write_json
from snaketune.report_page import Cell

RUN_COLUMNS = ["run", "model", "dataset", "scored_on", "baseline", "stage", "from_run", "method",
               "learning_rate", "num_train_epochs", "max_steps"]
TRAIN_COLUMNS = ["train_seconds", "train_steps", "final_loss", "tokens_per_second"]
METRIC_COLUMNS = ["n", "exact_match", "contains", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "text_tokenizer",
                  "bleu_mode", "rouge_mode", "accuracy", "precision", "recall", "f1", "preference_accuracy",
                  "reward_accuracy", "reward_margin"]
TEST_SET_COLUMNS = ["n", "exact_match", "contains", "bleu-4", "rouge-l", "accuracy"]  # a test set's leaderboard
SCORE_COLUMNS = ["exact_match", "contains", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy", "precision",
                 "recall", "f1", "preference_accuracy", "reward_accuracy", "reward_margin"]  # the comparison's


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


def baselines(records: list[dict[str, Any]]) -> dict[str, str]:
    """Each tuned run's baseline, the run its gains are shown against: the one its config names (``baseline:``),
    else the first run of the same model and starting point (``from_run``) that answers the same test rows
    (``scored_on``: a mix is scored on its first dataset's) and trains no steps. A run with neither, and a baseline
    itself, has none."""
    untrained = [record for record in records if not record.get("trains", True)]
    pairs = {}
    for record in records:
        if record.get("baseline"):
            pairs[record["run"]] = record["baseline"]
        elif record.get("trains", True):
            match = next((other["run"] for other in untrained if other["model"] == record["model"]
                          and scored_on(other) == scored_on(record)
                          and other.get("from_run", "") == record.get("from_run", "")), None)
            if match:
                pairs[record["run"]] = match
    return pairs


def scored_on(record: dict[str, Any]) -> str:
    return record.get("scored_on") or record["dataset"]


def _plain(rows: list[list[Any]]) -> list[list[Cell]]:
    return [[Cell(page.number(value, "fraction" if isinstance(value, float) else "plain"), value) for value in row]
            for row in rows]


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
        parts.append(f"<h3>{html.escape(name)}</h3>" + page.table(["subject", "questions", *runs], _plain(rows)))
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
                         + page.table(["reference \\ predicted", *predicted], _plain(rows), css="plain"))
    return "".join(parts) or "<p>No run has label metrics.</p>"


def image(data: str, alt: str, css: str = "") -> str:
    return f"<img class='{css}' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def write_sweep(name: str, sweep: dict[str, Any], rows: list[dict[str, Any]], serve: dict[str, dict[str, str]]) -> str:
    """Write the sweep's ``runs_csv``, ``best_json`` and ``plot`` (``sweep["files"]``); return its HTML section.

    ``best.json`` names what to load for the best run (``serve``: its merged folder, or base manifest + adapter),
    which the report's inputs guarantee is built.
    """
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
    chart = plots.save(plots.sweep_chart(name, sweep["runs"], {run: by_run[run].get(metric) for run in sweep["runs"]},
                                         metric, best["run"]), sweep["files"].get("plot"))
    points = [[Cell(html.escape(run), run), *[Cell(html.escape(str(point.get(key, ""))), point.get(key, ""))
                                              for key in settings],
               Cell(page.number(by_run[run].get(metric, ""), page.metric_kind(metric)), by_run[run].get(metric, ""),
                    "best" if run == best["run"] else "")] for run, point in sweep["runs"].items()]
    return (f"<h2>Sweep {html.escape(name)}</h2><p>best by {html.escape(metric)} ({mode}): "
            f"<b>{html.escape(best['run'])}</b> = {page.number(best[metric], page.metric_kind(metric))}</p>"
            + image(chart, f"{metric} against each swept setting") + page.table(["run", *settings, metric], points))


def score_columns(rows: list[dict[str, Any]], exam_columns: list[str], test_set_columns: list[str]) -> list[str]:
    """The comparison's columns: each metric, exam accuracy and other test set's score some run has."""
    wanted = (SCORE_COLUMNS + [c for c in exam_columns if c.endswith("_accuracy")]
              + [c for c in test_set_columns if not c.endswith(":n")])
    return [column for column in wanted if any(page.is_number(row.get(column)) for row in rows)]


def plot_section(rows, logs, summaries, plot_files) -> str:
    """Per dataset whose test rows runs answer, side by side: the loss of those runs on shared axes (linear and log,
    a switch between them) and their metrics as bars. Each chart is also written to its file in ``plot_files``."""
    colour = plots.colours([row["run"] for row in rows])
    parts = []
    for dataset in dict.fromkeys(row["scored_on"] for row in rows):
        group = [row for row in rows if row["scored_on"] == dataset]
        figures = []
        if dataset in plot_files.get("loss", {}):
            runs = {row["run"]: logs[row["run"]] for row in group if logs[row["run"]]}
            finals = {run: summaries.get(run, {}).get("eval_loss") for run in runs}
            linear = plots.save(plots.loss_chart(dataset, runs, finals, colour, log_scale=False),
                                plot_files["loss"][dataset])
            logarithmic = plots.save(plots.loss_chart(dataset, runs, finals, colour, log_scale=True))
            figures.append(f"<figure>{image(linear, f'loss of the runs scored on {dataset}', 'linear')}"
                           f"{image(logarithmic, f'loss of the runs scored on {dataset}, log scale', 'log')}</figure>")
        if dataset in plot_files.get("metrics", {}):
            drawn = [c for c in score_columns(group, [], [c for row in group for c in row if ":" in c])
                     if page.metric_kind(c) != "plain"]
            values = {row["run"]: {page.label(c): row[c] for c in drawn if page.is_number(row.get(c))} for row in group}
            percent = {page.label(c) for c in drawn if page.metric_kind(c) == "percent"}
            chart = plots.save(plots.metric_chart(dataset, [row["run"] for row in group], values, percent, colour),
                               plot_files["metrics"][dataset])
            figures.append(f"<figure>{image(chart, f'metrics of the runs scored on {dataset}')}</figure>")
        if figures:
            parts.append(f"<div class='dataset-plots'>{''.join(figures)}</div>")
    switch = "<p><label><input type='checkbox' id='log-scale'> loss on a log scale</label></p>"
    return switch + "".join(parts) if parts else "<p>No plots: no run trains or has metrics.</p>"


def answers_section(records: list[dict[str, Any]]) -> str:
    """Per dataset whose test rows runs answer, every run's answer to each row side by side; then per other test
    set (``evaluation.test_sets``), the answers of the runs scored on it."""
    by_dataset: dict[str, dict[str, list]] = {}
    for record in records:
        by_dataset.setdefault(scored_on(record), {})[record["run"]] = page.read_predictions(
            record["files"]["predictions"])
    for record in records:
        for name, path in record.get("test_set_answers", {}).items():
            by_dataset.setdefault(f"{name} (test set)", {})[record["run"]] = page.read_predictions(path)
    return "".join(page.side_by_side(dataset, answers) for dataset, answers in by_dataset.items())


def write_leaderboard(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({column: row.get(column, "") for column in columns} for row in rows)


def leaderboard_text(path: Path) -> str:
    """``leaderboard.csv`` as a table for a terminal: each run, the test rows it answered, its method, seconds and
    final loss of training, then every score some run has, numbers as the report page writes them. The file itself
    keeps every column."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [{column: value if column in RUN_COLUMNS else _number(value) for column, value in row.items()}
                for row in csv.DictReader(handle)]
    header = list(rows[0]) if rows else []
    exams = [column for column in header if column.endswith("_accuracy") and column not in METRIC_COLUMNS]
    test_sets = [column for column in header if ":" in column]
    columns = ["run", "scored_on", "method", "train_seconds", "final_loss", *score_columns(rows, exams, test_sets)]
    kinds = {"train_seconds": "seconds", "final_loss": "loss"}
    lines = [columns] + [[page.number(row.get(column, ""), kinds.get(column, page.metric_kind(column)))
                          if page.is_number(row.get(column)) else str(row.get(column, "")) for column in columns]
                         for row in rows]
    widths = [max(len(line[index]) for line in lines) for index in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def write_report(records: list[dict[str, Any]], leaderboard: Path, page_path: Path,
                 sweeps: dict[str, Any] | None = None, plot_files: dict[str, dict[str, str]] | None = None
                 ) -> list[dict[str, Any]]:
    """Write ``leaderboard.csv``, ``report.html``, the plot files and each sweep's ``runs.csv``/``best.json``.

    ``records`` holds one entry per run (``layout.Layout.report_record``): its columns, settings and the files to
    read; ``plot_files`` the loss and metric plot of each dataset (``layout.Layout.report_plots``).
    """
    pairs = baselines(records)
    logs = {record["run"]: read_log(record["files"]["train_log"]) if "train_log" in record["files"] else []
            for record in records}
    rows = [{**run_row(record), "scored_on": scored_on(record), "baseline": pairs.get(record["run"], "")}
            for record in records]
    exam_columns = sorted({f"{name}_{what}" for record in records for name in record.get("exams", {})
                           for what in ("accuracy", "ties")})
    test_set_columns = list(dict.fromkeys(key for row in rows for key in row if ":" in key))  # {test_set}:{metric}
    write_leaderboard(rows, RUN_COLUMNS + TRAIN_COLUMNS + METRIC_COLUMNS + exam_columns + test_set_columns,
                      leaderboard)
    summaries = {r["run"]: read_json(r["files"]["train_summary"]) for r in records if "train_summary" in r["files"]}
    serve = {record["run"]: record["serve"] for record in records}
    sweep_sections = "".join(write_sweep(name, sweep, rows, serve) for name, sweep in (sweeps or {}).items())
    datasets = list(dict.fromkeys(row["scored_on"] for row in rows))
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>snaketune report</title><style>{page.STYLE}</style></head><body>
<h1>snaketune report</h1>
<p>{len(rows)} runs answering the test rows of {html.escape(', '.join(datasets))}.
★ marks the best value of a column among the runs scored on the same test rows; the signed number beside a value
is the change against the run's baseline. exact match, contains, accuracy, precision, recall, F1 and exam accuracies are
fractions (0 to 1); BLEU and ROUGE are percentages. A click on a heading sorts the table.</p>
<h2>Runs compared</h2>
{page.comparison(rows, score_columns(rows, exam_columns, test_set_columns), pairs)}
<h2>Plots</h2>
{plot_section(rows, logs, summaries, plot_files or {})}
<h2>Answers side by side</h2>
{answers_section(records)}
<h2>Training</h2>
{page.training(rows, summaries)}
<h2>Settings that differ between runs</h2>
{page.differing_settings(records)}
<h2>Exams: accuracy per subject</h2>{exam_tables(records)}
<h2>Labels: confusion tables</h2>{confusion_tables(records)}
{sweep_sections}
<script>{page.SCRIPT}</script>
</body></html>
"""
    with atomic_file(page_path) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return rows
