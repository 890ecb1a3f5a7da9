"""Multiple-choice exams: C-Eval/CMMLU CSVs in, accuracy per subject and overall out, by letter likelihood."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, workflow_env
from snaketune import exam
from snaketune.errors import UserError
from snaketune.exam import (
    LETTERS,
    build_prompt,
    continuation_logprob,
    load_exam,
    prompts_for,
    score_exam,
)

SAMPLE = REPO / "data" / "mmcu_sample"


def write_subject(path, rows, header="Question,A,B,C,D,Answer"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from snaketune.predict import load_for_generation

    return load_for_generation(tiny_model, None)


def test_the_bundled_sample_loads_with_subjects_and_dev_splits():
    exam = load_exam("mmcu-sample", SAMPLE)
    assert sorted(exam.test) == sorted(exam.dev) == ["医学", "法律"]
    assert [len(exam.test[s]) for s in ("医学", "法律")] == [5, 4]
    first = exam.test["医学"][0]
    assert (first.question, first.options["B"], first.answer) == ("人体最大的器官是", "皮肤", "B")


def test_k_shot_prompts_put_solved_dev_questions_of_the_same_subject_first():
    exam = load_exam("mmcu-sample", SAMPLE)
    question = exam.test["法律"][0]
    prompt = build_prompt(question, exam.dev["法律"][:2])
    assert prompt.startswith("以下是中国关于法律考试的单项选择题，请选出其中的正确答案。\n\n"
                             "公民的基本权利和义务规定在\nA. 宪法")
    assert prompt.count("答案：") == 3 and "答案：A\n\n审理案件的机关是" in prompt
    assert prompt.endswith("我国的根本大法是\nA. 刑法\nB. 民法典\nC. 宪法\nD. 行政法\n答案：")
    with pytest.raises(UserError, match="subject `医学` has 2 dev questions, fewer than shots=3"):
        prompts_for(exam, 3)


def test_accuracy_is_one_when_every_answer_is_the_models_own_choice(tmp_path, tiny):
    """Answers set to the letter the model prefers, found by a separate path (each letter's continuation
    scored on its own sequence); the exam's batched one-pass scoring must then get every question right."""
    tokenizer, model = tiny
    exam = load_exam("mmcu-sample", SAMPLE)
    for subject in exam.test:
        rows = []
        for question, prompt in prompts_for(exam, 1):
            if question.subject != subject:
                continue
            scores = {letter: continuation_logprob(model, tokenizer, prompt, letter) for letter in LETTERS}
            forced = max(LETTERS, key=lambda letter: (scores[letter], -LETTERS.index(letter)))
            rows.append(",".join([question.question, *question.options.values(), forced]))
        write_subject(tmp_path / "forced" / "test" / f"{subject}.csv", rows)
        (tmp_path / "forced" / "dev").mkdir(exist_ok=True)
        (tmp_path / "forced" / "dev" / f"{subject}.csv").write_text(
            (SAMPLE / "dev" / f"{subject}.csv").read_text(encoding="utf-8"), encoding="utf-8")
    result = score_exam(model, tokenizer, load_exam("forced", tmp_path / "forced"), shots=1,
                                batch_size=4)
    assert result["accuracy"] == 1.0 and result["n"] == 9


def test_per_subject_and_overall_accuracy_on_a_crafted_case(tmp_path, tiny, monkeypatch):
    write_subject(tmp_path / "b" / "test" / "a_test.csv", ["q1,w,x,y,z,A", "q2,w,x,y,z,B", "q3,w,x,y,z,C"])
    write_subject(tmp_path / "b" / "test" / "b_test.csv", ["q4,w,x,y,z,D", "q5,w,x,y,z,a"])
    picks = {"q1": "A", "q2": "C", "q3": "C", "q4": "D", "q5": "B"}  # a: 2 of 3 right, b: 1 of 2

    def scripted(model, tokenizer, prompts, batch_size=8):
        chosen = [picks[p.rsplit("\nA.", 1)[0].rsplit("\n", 1)[-1]] for p in prompts]
        return [{letter: float(letter == c) for letter in LETTERS} for c in chosen]

    monkeypatch.setattr(exam, "letter_scores", scripted)
    result = score_exam(*reversed(tiny), load_exam("crafted", tmp_path / "b"), shots=0)
    assert result["subjects"] == {"a": {"n": 3, "correct": 2, "accuracy": 2 / 3},
                                  "b": {"n": 2, "correct": 1, "accuracy": 0.5}}
    assert result["accuracy"] == pytest.approx(3 / 5) and result["macro_accuracy"] == pytest.approx((2 / 3 + 0.5) / 2)


@pytest.mark.parametrize("rows, header, message", [
    (["q,w,x,y,z"], "Question,A,B,C,D", "column(s) Answer missing (has: Question, A, B, C, D)"),
    (["q,w,x,y,z,A", "q2,w,x,y,z,E"], None, 'law.csv:3: field "Answer": `E` is not one of A, B, C, D'),
    ([], None, "law.csv: no questions (only a header)"),
])
def test_bad_exam_csvs_give_one_clear_line(tmp_path, tiny_model, rows, header, message):
    write_subject(tmp_path / "bench" / "test" / "law.csv", rows, **({"header": header} if header else {}))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "exam.py"), "--model", str(tiny_model), "--exam",
         str(tmp_path / "bench"), "--name", "bench", "--out", str(tmp_path / "out.json")],
        capture_output=True, text=True, env=workflow_env())
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr and not (tmp_path / "out.json").exists()
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_an_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "bench" / "test").mkdir(parents=True)
    (tmp_path / "bench" / "test" / "x.csv").write_text("")
    with pytest.raises(UserError, match=r"x\.csv: empty file"):
        load_exam("bench", tmp_path / "bench")
    with pytest.raises(UserError, match="no test/ or val/ folder"):
        load_exam("bench", tmp_path)


def test_the_script_writes_per_subject_json(tmp_path, tiny_model):
    out = tmp_path / "mmcu.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "exam.py"), "--model", str(tiny_model),
                    "--exam", str(SAMPLE), "--name", "mmcu-sample", "--out", str(out),
                    "--settings", json.dumps({"shots": 2, "batch_size": 4})], check=True, env=workflow_env(),
                   capture_output=True)
    result = json.loads(out.read_text())
    assert (result["exam"], result["shots"], result["n"], sorted(result["subjects"])) == (
        "mmcu-sample", 2, 9, ["医学", "法律"])
    assert 0 <= result["accuracy"] <= 1
    # how the number was made travels with it: the prompt, the letter token ids, the averaging, every choice
    assert result["method"]["first_prompt"].startswith("以下是中国关于医学考试") and result["method"]["averaging"]
    assert set(result["method"]["letter_token_ids"]) == {"A", "B", "C", "D"}
    assert len(result["questions"]) == 9 and result["questions"][0]["where"].endswith("医学.csv:2")
    assert sum(q["answer"] == q["chosen"] for q in result["questions"]) == round(result["accuracy"] * 9)


def test_a_continuation_is_scored_from_the_logits_it_reads_only(tiny):
    """Scoring keeps only the logits of the positions that predict the continuation; the log-probability equals
    the one read from the full-vocabulary logits of every position."""
    import torch

    tokenizer, model = tiny
    prompt, continuation = "问题：1+1=?\n答案：", " B. two"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    common = next(i for i, (a, b) in enumerate(zip(prompt_ids + [-1], full, strict=False)) if a != b)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    expected = sum(logprobs[i - 1, full[i]].item() for i in range(max(common, 1), len(full)))
    assert len(full) - common >= 2
    assert continuation_logprob(model, tokenizer, prompt, continuation) == pytest.approx(expected, abs=1e-4)


def test_ties_between_letters_are_counted_not_silently_broken(tiny, monkeypatch, capsys):
    """In bf16 on a CPU the letter scores of a small model round together; each tie is reported per question and
    in the total, and the warning says how to avoid it."""
    from snaketune.exam import Exam, Question

    tokenizer, model = tiny
    questions = [Question("s", f"q{i}?", {"A": "1", "B": "2", "C": "3", "D": "4"}, "B", f"s.csv:{i}") for i in (2, 3)]
    scores = [{"A": -1.0, "B": -1.0, "C": -2.0, "D": -3.0}, {"A": -2.0, "B": -1.0, "C": -2.0, "D": -3.0}]
    monkeypatch.setattr(exam, "letter_scores", lambda *args, **kwargs: scores)
    result = score_exam(model, tokenizer, Exam("tied", test={"s": questions}), shots=0, batch_size=8)
    assert result["ties"] == 1 and result["questions"][0]["tied"] == ["A", "B"]
    assert "tied" not in result["questions"][1]  # B alone is highest: no tie
    assert [q["chosen"] for q in result["questions"]] == ["A", "B"]
    assert "1 of 2 questions have a tie" in capsys.readouterr().err
