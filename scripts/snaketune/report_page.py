"""report.html's parts: tables that sort by a click, numbers formatted for people, the comparison of runs against
their baselines, and every run's answer to the same test row side by side. One self-contained file: its style,
script and images are inline, so it works offline."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERCENT_METRICS = {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}  # BLEU and ROUGE are percentages; the rest fractions
PLAIN_METRICS = {"reward_margin", "n"}  # neither: printed as they are
SAMPLE_ROWS = 20  # answers shown before "all rows"
THUMBNAIL_PX = 96


@dataclass
class Cell:
    """One table cell: its HTML, the value a click sorts it by, and its CSS classes."""

    html: str
    sort: float | str = ""
    css: str = ""


def metric_kind(column: str) -> str:
    """fraction, percent or plain, from a column's name (``{exam}_accuracy``, ``{test_set}:{metric}`` too)."""
    metric = column.rsplit(":", 1)[-1]
    if metric in PERCENT_METRICS:
        return "percent"
    if metric in PLAIN_METRICS:
        return "plain"
    return "fraction"


def number(value: Any, kind: str) -> str:
    """A value as a person reads it: 0.957 (fraction), 95.7 (percent), 13,900 (count), 1 h 02 m (seconds)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return html.escape(str(value))
    if kind == "fraction":
        return f"{value:.3f}"
    if kind == "percent":
        return f"{value:.1f}"
    if kind == "count":
        return f"{value:,.0f}"
    if kind == "seconds":
        minutes, seconds = divmod(round(value), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours} h {minutes:02d} m" if hours else f"{minutes} m {seconds:02d} s" if minutes else f"{seconds} s"
    return f"{value:.4g}"


def change(value: float, base: float, kind: str) -> str:
    """The signed change against the baseline, in the metric's own units."""
    delta = value - base
    sign = "+" if delta > 0 else "±" if delta == 0 else "−"
    css = "up" if delta > 0 else "down" if delta < 0 else "same"
    return f"<span class='delta {css}'>{sign}{number(abs(delta), kind)}</span>"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def table(header: list[str], rows: list[list[Cell]], css: str = "sortable") -> str:
    """A table in a box that scrolls sideways when wider than the page; a click on a heading sorts by it."""
    head = "".join(f"<th title='sort by {html.escape(name)}'>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(
        f"<td class='{cell.css}' data-v='{html.escape(str(cell.sort))}'>{cell.html}</td>" for cell in row) + "</tr>"
        for row in rows)
    return (f"<div class='scroll'><table class='{css}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            "</div>")


LABELS = {"exact_match": "exact match", "bleu-4": "BLEU-4", "rouge-1": "ROUGE-1", "rouge-2": "ROUGE-2",
          "rouge-l": "ROUGE-L", "f1": "F1", "preference_accuracy": "preference accuracy",
          "reward_accuracy": "reward accuracy", "reward_margin": "reward margin"}


def label(column: str) -> str:
    """A column's heading: ``exact match``, ``BLEU-4``, ``mmcu accuracy``, ``general-qa: contains``."""
    if ":" in column:
        test_set, metric = column.rsplit(":", 1)
        return f"{test_set}: {label(metric)}"
    return LABELS.get(column, column.replace("_", " "))


def best_by_dataset(rows: list[dict[str, Any]], column: str, lower_is_better: bool = False,
                    group: str = "scored_on") -> set[str]:
    """The runs holding the best value of ``column`` among the runs of the same ``group`` (the test rows they
    answer, or the data they train on) (ties all marked)."""
    best = set()
    for dataset in {row[group] for row in rows}:
        values = [(row[column], row["run"]) for row in rows if row[group] == dataset and is_number(row.get(column))]
        if len(values) < 2:
            continue
        top = (min if lower_is_better else max)(value for value, _ in values)
        if any(value != top for value, _ in values):  # all alike: nobody is best
            best |= {run for value, run in values if value == top}
    return best


def comparison(rows: list[dict[str, Any]], columns: list[str], baselines: dict[str, str]) -> str:
    """Runs x metrics (and exams, and other test sets), the best of each dataset marked, each tuned run's change
    against its baseline beside its value."""
    by_run = {row["run"]: row for row in rows}
    best = {column: best_by_dataset(rows, column) for column in columns}
    body = []
    for row in rows:
        base = by_run.get(baselines.get(row["run"], ""))
        cells = [Cell(f"<b>{html.escape(row['run'])}</b>", row["run"]),
                 Cell(html.escape(row["scored_on"]), row["scored_on"]),
                 Cell(html.escape(row["dataset"]), row["dataset"]),
                 Cell(html.escape(base["run"]) if base else "", base["run"] if base else "")]
        for column in columns:
            value, kind = row.get(column, ""), metric_kind(column)
            if not is_number(value):
                cells.append(Cell("", ""))
                continue
            text = number(value, kind)
            if base is not None and is_number(base.get(column)):
                text += " " + change(value, base[column], kind)
            star = row["run"] in best[column]
            cells.append(Cell(("★ " if star else "") + text, value, "best" if star else ""))
        body.append(cells)
    return table(["run", "test rows of", "trained on", "baseline", *[label(c) for c in columns]], body)


def training(rows: list[dict[str, Any]], summaries: dict[str, dict[str, Any]]) -> str:
    """What each training run recorded: steps, losses, time, speed and (GPU) peak memory."""
    trained = [row for row in rows if row.get("train_steps")]
    if not trained:
        return "<p>No run trains.</p>"
    lowest = best_by_dataset(trained, "final_loss", lower_is_better=True, group="dataset")
    body = []
    for row in trained:
        summary = summaries.get(row["run"], {})
        eval_loss, peak = summary.get("eval_loss"), summary.get("peak_memory_gib")
        body.append([
            Cell(html.escape(row["run"]), row["run"]), Cell(html.escape(row["dataset"]), row["dataset"]),
            Cell(number(row["train_steps"], "count"), row["train_steps"]),
            Cell(("★ " if row["run"] in lowest else "") + number(row["final_loss"], "loss"), row["final_loss"],
                 "best" if row["run"] in lowest else ""),
            Cell(number(eval_loss, "loss") if eval_loss is not None else "",
                 eval_loss if eval_loss is not None else ""),
            Cell(number(row["train_seconds"], "seconds") if is_number(row["train_seconds"]) else "",
                 row["train_seconds"]),
            Cell(number(row["tokens_per_second"], "count") if is_number(row["tokens_per_second"]) else "",
                 row["tokens_per_second"]),
            Cell(number(peak, "loss") if peak is not None else "", peak if peak is not None else ""),
        ])
    header = ["run", "dataset", "steps", "final train loss", "eval loss", "train time", "tokens/s", "peak GPU GiB"]
    if all(row[-1].sort == "" for row in body):  # trained on a CPU: no GPU memory to show
        header, body = header[:-1], [row[:-1] for row in body]
    return table(header, body)


FIRST_SETTINGS = ["model", "dataset", "from_run", "method", "stage", "max_steps", "num_train_epochs",
                  "learning_rate", "lora_rank", "lora_alpha"]  # the rest follow in name order


def differing_settings(records: list[dict[str, Any]]) -> str:
    """Each run's settings, only those with more than one value among the runs that have them (a baseline has no
    train settings: their absence is no difference)."""
    present = {key for record in records for key in record.get("settings", {})}
    keys = [key for key in FIRST_SETTINGS if key in present] + sorted(present - set(FIRST_SETTINGS))
    differing = [key for key in keys if len({json.dumps(record["settings"][key], ensure_ascii=False, sort_keys=True)
                                             for record in records if key in record.get("settings", {})}) > 1]
    if not differing:
        return "<p>Every run has the same settings.</p>"
    body = [[Cell(html.escape(record["run"]), record["run"])]
            + [Cell(html.escape(_setting(record["settings"][key])), _setting(record["settings"][key]))
               if key in record.get("settings", {}) else Cell("—", "") for key in differing] for record in records]
    return table(["run", *differing], body)


def _setting(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# -- answers side by side ------------------------------------------------------------------------------------
def question(row: dict[str, str]) -> str:
    """What the test row asks: its last user message, else instruction and input, else the rendered prompt."""
    try:
        messages = json.loads(row.get("messages") or "null")
    except json.JSONDecodeError:
        messages = None
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    parts = [row.get("instruction", ""), row.get("input", "")]
    return "\n".join(part for part in parts if part) or row.get("prompt", "")


def image_paths(row: dict[str, str]) -> list[str]:
    """The images a test row shows: an ``images`` column (a JSON list, or one path) or an ``image`` column."""
    raw = row.get("images") or row.get("image") or ""
    if raw.startswith("["):
        try:
            return [str(path) for path in json.loads(raw)]
        except json.JSONDecodeError:
            return [raw]
    return [raw] if raw else []


def thumbnail(path: str) -> str:
    """An <img> of ``path`` shrunk to a thumbnail and inlined; the path as text where it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError):
        return f"<span class='missing'>{html.escape(path)}</span>"
    data = base64.b64encode(buffer.getvalue()).decode()
    name = html.escape(path)
    return f"<img class='thumb' alt='{name}' title='{name}' src='data:image/jpeg;base64,{data}'>"


def side_by_side(dataset: str, answers: dict[str, list[dict[str, str]]]) -> str:
    """Every test row of ``dataset`` once: what it asks, its reference and each run's answer in its own column.
    Rows where the runs' answers differ come first; the first rows show, the rest behind "all rows" or the filter."""
    runs = list(answers)
    by_id = {run: {row["id"]: row for row in rows} for run, rows in answers.items()}
    ids = list(dict.fromkeys(row_id for rows in answers.values() for row_id in (row["id"] for row in rows)))
    def differs(row_id: str) -> bool:
        return len({by_id[run][row_id]["prediction"].strip() for run in runs if row_id in by_id[run]}) > 1
    ordered = sorted(ids, key=lambda row_id: not differs(row_id))  # stable: test order within each group
    body = []
    for index, row_id in enumerate(ordered):
        first = next(by_id[run][row_id] for run in runs if row_id in by_id[run])
        reference = first.get("reference", "")
        cells = [f"<td>{html.escape(row_id)}</td>",
                 "<td class='text'>" + "".join(thumbnail(p) for p in image_paths(first))
                 + html.escape(question(first)) + "</td>",
                 f"<td class='text'>{html.escape(reference)}</td>"]
        for run in runs:
            answer = by_id[run].get(row_id, {}).get("prediction")
            css = "text" + (" match" if answer is not None and answer.strip() == reference.strip() else "")
            cells.append(f"<td class='{css}'>{html.escape(answer) if answer is not None else '—'}</td>")
        classes = " ".join(filter(None, ["differ" if differs(row_id) else "", "more" if index >= SAMPLE_ROWS else ""]))
        body.append(f"<tr class='{classes}'>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(name)}</th>" for name in ["id", "question", "reference", *runs])
    disagree = sum(differs(row_id) for row_id in ids)
    return (f"<div class='answers' data-dataset='{html.escape(dataset)}'><h3>{html.escape(dataset)}</h3>"
            f"<p>{len(ids)} test rows, {disagree} where the runs answer differently (shown first). "
            f"<input type='search' class='filter' placeholder='filter rows'> <label><input type='checkbox' "
            f"class='all'> all {len(ids)} rows</label></p><div class='scroll'><table class='side'><thead><tr>{head}"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div></div>")


def read_predictions(path: str | Path) -> list[dict[str, str]]:
    import pandas as pd

    return pd.read_csv(path, keep_default_na=False, dtype=str).to_dict("records")


STYLE = """
body{font-family:"Noto Sans CJK SC","Source Han Sans SC","PingFang SC","Microsoft YaHei",sans-serif;margin:1.5em;
  max-width:100%}
.scroll{max-width:100%;overflow-x:auto}table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{white-space:normal;max-width:10em;min-width:4em;overflow-wrap:break-word;background:#f4f4f4}
table.side th{text-align:left}
.dataset-plots{display:flex;flex-wrap:wrap;gap:1em}table.sortable th{cursor:pointer}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}
td.best{font-weight:bold;background:#e6f4e6}.delta{font-size:85%;margin-left:.3em}.up{color:#17752b}
.down{color:#b42318}.same{color:#777}figure{display:inline-block;margin:.5em;vertical-align:top}
img{max-width:100%}img.thumb{display:block;margin-bottom:4px}
td.text{text-align:left;white-space:pre-wrap;max-width:32em;min-width:8em;overflow-wrap:anywhere}
td.match{background:#eef8ee}tr.more{display:none}.answers.all-rows tr.more,.answers tr.shown{display:table-row}
.answers tr.hidden{display:none!important}body:not(.log) img.log,body.log img.linear{display:none}
"""

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(table => {
  table.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
    const column = th.cellIndex, body = table.tBodies[0];
    const descending = !th.classList.contains('desc');
    table.querySelectorAll('th').forEach(other => other.classList.remove('asc', 'desc'));
    th.classList.add(descending ? 'desc' : 'asc');
    const key = row => row.cells[column].dataset.v;
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === '' || y === '') return (x === '') - (y === '');  // empty cells last either way
      const nx = Number(x), ny = Number(y);
      const order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return descending ? -order : order;
    });
    rows.forEach(row => body.appendChild(row));
  }));
});
document.querySelectorAll('.answers').forEach(box => {
  const filter = box.querySelector('.filter'), all = box.querySelector('.all');
  const apply = () => {
    box.classList.toggle('all-rows', all.checked);
    const query = filter.value.trim().toLowerCase();
    box.querySelectorAll('tbody tr').forEach(row => {
      const hit = query === '' || row.textContent.toLowerCase().includes(query);
      row.classList.toggle('hidden', !hit);
      row.classList.toggle('shown', query !== '' && hit);
    });
  };
  filter.addEventListener('input', apply); all.addEventListener('change', apply);
});
const log = document.getElementById('log-scale');
if (log) log.addEventListener('change', () => document.body.classList.toggle('log', log.checked));
"""
