"""The report: which run each tuned run is compared against, numbers for people, and the answers side by side."""

import csv
import json

import pytest
from report_runs import ten_runs

from conftest import REPO
from snaketune import report_page
from snaketune.report import baselines, write_report


def record(run, model="m", dataset="d", trains=True, from_run="", baseline=""):
    return {"run": run, "model": model, "dataset": dataset, "trains": trains, "from_run": from_run,
            "baseline": baseline}


def test_a_tuned_run_is_paired_with_the_untrained_run_of_its_model_dataset_and_start():
    records = [record("tuned"), record("base", trains=False), record("other-model", model="x"),
               record("other-data", dataset="e"), record("dpo", from_run="tuned"),
               record("dpo-start", trains=False, from_run="tuned")]
    assert baselines(records) == {"tuned": "base", "dpo": "dpo-start"}  # no untrained run of x, or of e: none


def test_a_run_trained_on_a_mix_is_paired_with_the_base_scored_on_the_same_test_rows(monkeypatch):
    import yaml

    from snaketune.config import load
    from snaketune.layout import Layout

    monkeypatch.chdir(REPO)  # the real-model example: the tuned run trains on a mix of identity and replay rows
    path = REPO / "config" / "examples" / "smollm2-135m-identity.yaml"
    layout = Layout(load(yaml.safe_load(path.read_text(encoding="utf-8")), [str(path)]))
    records = [layout.report_record(run) for run in layout.cfg.runs]
    assert [(r["run"], r["dataset"], r["scored_on"]) for r in records] == [
        ("smollm2-base", "identity", "identity"), ("smollm2-identity", "identity-replay", "identity")]
    assert baselines(records) == {"smollm2-identity": "smollm2-base"}


def test_the_baseline_a_config_names_wins_over_the_one_found():
    records = [record("tuned", baseline="previous"), record("previous"), record("base", trains=False)]
    assert baselines(records) == {"tuned": "previous", "previous": "base"}


def test_a_config_naming_a_baseline_that_is_not_a_run_is_one_error(monkeypatch):
    import yaml

    from snaketune.config import load
    from snaketune.errors import UserError

    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    config["runs"]["identity-lora"]["baseline"] = "identity-based"
    with pytest.raises(UserError, match=r"runs\.identity-lora\.baseline.*`identity-based` is not another run"):
        load(config, [])
    config["runs"]["identity-lora"]["baseline"] = "identity-base"
    assert load(config, []).runs["identity-lora"].baseline == "identity-base"


@pytest.mark.parametrize("value, kind, text", [
    (0.95652, "fraction", "0.957"), (95.722, "percent", "95.7"), (13912.4, "count", "13,912"),
    (0.0274074, "loss", "0.02741"), (45, "seconds", "45 s"), (3725, "seconds", "1 h 02 m"), ("", "fraction", ""),
])
def test_numbers_print_for_people(value, kind, text):
    assert report_page.number(value, kind) == text


def test_a_setting_only_trained_runs_have_is_no_difference_between_runs():
    records = [{"run": "base", "settings": {"model": "m", "method": "none"}},
               {"run": "a", "settings": {"model": "m", "method": "lora", "lora_rank": 16, "learning_rate": 1e-4}},
               {"run": "b", "settings": {"model": "m", "method": "lora", "lora_rank": 16, "learning_rate": 2e-4}}]
    page = report_page.differing_settings(records)
    headings = [part.rsplit(">", 1)[1] for part in page.split("</th>")[:-1]]
    assert headings == ["run", "method", "learning_rate"]  # lora_rank is 16 wherever it is set; model everywhere


def test_the_page_compares_runs_first_with_their_gains_and_marks_the_best(tmp_path):
    records = ten_runs(tmp_path)
    rows = write_report(records, tmp_path / "leaderboard.csv", tmp_path / "report.html",
                        plot_files={"loss": {"sums": str(tmp_path / "loss-sums.png")},
                                    "metrics": {"sums": str(tmp_path / "metrics-sums.png")}})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    compared = page.split("<h2>Runs compared</h2>")[1].split("<h2>")[0]
    best = [row for row in rows if row["run"] == "tuned-9"][0]
    assert best["baseline"] == "base" and best["exact_match"] == 27 / 30
    assert "★ 0.900 <span class='delta up'>+0.900</span>" in compared  # tuned-9 against the base's 0.000
    assert "★ 90.0 <span class='delta up'>+90.0</span>" in compared  # BLEU: a percentage, one decimal
    assert compared.count("★") == 3  # exact match, BLEU, ROUGE-L: the same best run
    assert "13,921" in page  # tokens/s with a thousands separator, not 1.392e+04
    with open(tmp_path / "leaderboard.csv", newline="") as handle:
        board = {row["run"]: row for row in csv.DictReader(handle)}
    assert board["tuned-3"]["baseline"] == "base" and board["base"]["baseline"] == ""
    assert (tmp_path / "loss-sums.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "metrics-sums.png").read_bytes()[:4] == b"\x89PNG"


def test_answers_sit_side_by_side_with_the_rows_where_runs_disagree_first(tmp_path):
    records = ten_runs(tmp_path)
    write_report(records, tmp_path / "leaderboard.csv", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    answers = page.split("<table class='side'>")[1].split("</table>")[0]
    rows = answers.split("<tbody>")[1].split("</tr>")[:-1]
    assert len(rows) == 30  # every row is in the page; the first SAMPLE_ROWS show
    assert all("class='differ" in row for row in rows[:27]) and "class='differ" not in rows[27]
    first = rows[0]
    assert "What is 0 plus 0?" in first and "I do not know" in first and first.count("<td class='text match'>") == 9
    assert sum("more" in row.split(">")[0] for row in rows) == 30 - report_page.SAMPLE_ROWS


def test_a_row_with_an_image_shows_its_thumbnail(tmp_path):
    from PIL import Image

    picture = tmp_path / "square.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(picture)
    cell = report_page.thumbnail(str(picture))
    assert cell.startswith("<img class='thumb'") and "data:image/jpeg;base64," in cell
    row = {"id": "a", "images": json.dumps([str(picture), str(tmp_path / "gone.png")])}
    assert report_page.image_paths(row) == [str(picture), str(tmp_path / "gone.png")]
    assert report_page.thumbnail(str(tmp_path / "gone.png")) == f"<span class='missing'>{tmp_path / 'gone.png'}</span>"


def test_answers_to_another_test_set_sit_side_by_side_too(tmp_path):
    records = ten_runs(tmp_path)[:3]
    for record in records:  # each run also answered another dataset's test split (evaluation.test_sets)
        record["test_set_answers"] = {"general": record["files"]["predictions"]}
    write_report(records, tmp_path / "leaderboard.csv", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    general = page.split("data-dataset='general (test set)'>")[1].split("</table>")[0]
    assert "<th>base</th><th>tuned-1</th><th>tuned-2</th>" in general and general.count("<tr") == 31


def test_the_leaderboard_prints_for_a_terminal_with_scores_and_without_settings(tmp_path):
    from snaketune.report import leaderboard_text

    records = ten_runs(tmp_path)
    write_report(records, tmp_path / "leaderboard.csv", tmp_path / "report.html")
    lines = leaderboard_text(tmp_path / "leaderboard.csv").splitlines()
    header = lines[0].split()
    assert header[:5] == ["run", "scored_on", "method", "train_seconds", "final_loss"]
    assert {"exact_match", "bleu-4", "rouge-l"} <= set(header)
    assert not {"model", "learning_rate", "text_tokenizer", "accuracy"} & set(header)  # settings; no run has labels
    with open(tmp_path / "leaderboard.csv", newline="") as handle:
        runs = [row["run"] for row in csv.DictReader(handle)]
    assert [line.split()[0] for line in lines[1:]] == runs
    starts = [lines[0].index(name) for name in header]  # the columns line up under their names
    tuned = lines[1 + runs.index("tuned-9")]
    ends = [*starts[1:], None]
    cells = {name: tuned[start:end].strip() for name, start, end in zip(header, starts, ends, strict=True)}
    assert cells["exact_match"] == "0.900" and cells["bleu-4"] == "90.0" and cells["method"] == "lora"
    assert max(len(word) for word in " ".join(lines).split()) < 20  # no 0.027407050132751465
