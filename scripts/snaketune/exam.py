"""Multiple-choice exams (MMCU, C-Eval, CMMLU) in the C-Eval / CMMLU layout, scored by log-likelihood (no generation).

A exam is a folder with ``test/`` (or ``val/``) and optionally ``dev/``, each holding one CSV per subject
(``{subject}.csv``, or C-Eval's ``{subject}_test.csv`` / ``_val.csv`` / ``_dev.csv``) with the columns Question, A,
B, C, D, Answer (any case; other columns are ignored). MMCU converts to it: one CSV per subject, same columns.

Each question is put as C-Eval's answer-only prompt, after ``shots`` solved examples from the subject's dev split,
and the model's answer is the letter whose token it gives the highest probability right after "答案：". When a
letter is not one token after the prompt, the letter's whole continuation is scored instead (slower, same rule).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snaketune.errors import UserError, located

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", *LETTERS, "answer")
SPLIT_SUFFIXES = ("_test", "_val", "_dev")


@dataclass
class Question:
    subject: str
    question: str
    options: dict[str, str]
    answer: str
    where: str  # file:line


@dataclass
class Exam:
    name: str
    test: dict[str, list[Question]] = field(default_factory=dict)  # subject -> questions
    dev: dict[str, list[Question]] = field(default_factory=dict)


def subject_of(path: Path) -> str:
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_subject(path: Path) -> list[Question]:
    """Questions of one subject CSV; a missing column, an answer outside A-D or an empty file is one clear line."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise located(path, None, "empty file: expected a header Question,A,B,C,D,Answer and questions")
        index = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [name for name in COLUMNS if name.lower() not in index]
        if missing:
            pretty = ", ".join(c.capitalize() if len(c) > 1 else c for c in missing)
            raise located(path, 1, f"column(s) {pretty} missing (has: {', '.join(header)})")
        questions, start = [], reader.line_num + 1
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                start = reader.line_num + 1
                continue
            if len(cells) < len(header):
                raise located(path, start, f"{len(cells)} cells, the header has {len(header)}")
            value = {name: cells[i] for name, i in index.items()}
            answer = value["answer"].strip().upper()
            if answer not in LETTERS:
                raise located(path, start, f'field "Answer": `{value["answer"]}` is not one of A, B, C, D')
            questions.append(Question(subject_of(path), value["question"].strip(),
                                      {letter: value[letter.lower()].strip() for letter in LETTERS}, answer,
                                      f"{path}:{start}"))
            start = reader.line_num + 1
    if not questions:
        raise located(path, None, "no questions (only a header)")
    return questions


def load_exam(name: str, folder: str | Path) -> Exam:
    folder = Path(folder)
    test_dir = next((folder / sub for sub in ("test", "val") if (folder / sub).is_dir()), None)
    if test_dir is None:
        raise UserError(f"{folder}: no test/ or val/ folder of subject CSVs (C-Eval / CMMLU layout)")
    exam = Exam(name)
    for path in sorted(test_dir.glob("*.csv")):
        exam.test[subject_of(path)] = read_subject(path)
    if not exam.test:
        raise UserError(f"{test_dir}: no subject CSVs")
    if (folder / "dev").is_dir():
        for path in sorted((folder / "dev").glob("*.csv")):
            exam.dev[subject_of(path)] = read_subject(path)
    return exam


def exam_files(folder: str | Path) -> list[str]:
    """Every CSV a exam reads (the workflow's inputs)."""
    folder = Path(folder)
    return sorted(str(p) for sub in ("test", "val", "dev") for p in (folder / sub).glob("*.csv"))


def format_question(q: Question, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {q.options[letter]}" for letter in LETTERS)
    return f"{q.question}{options}\n答案：" + (f"{q.answer}\n\n" if with_answer else "")


def build_prompt(q: Question, shots: list[Question]) -> str:
    """C-Eval's answer-only prompt: the instruction, solved dev examples, then the question up to 答案："""
    head = f"以下是中国关于{q.subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    return head + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def prompts_for(exam: Exam, shots: int) -> list[tuple[Question, str]]:
    pairs = []
    for subject, questions in exam.test.items():
        dev = exam.dev.get(subject, [])
        if shots > len(dev):
            raise UserError(f"{exam.name}: subject `{subject}` has {len(dev)} dev questions, fewer than "
                            f"shots={shots}")
        pairs += [(q, build_prompt(q, dev[:shots])) for q in questions]
    return pairs


def letter_scores(model, tokenizer, prompts: list[str], batch_size: int = 8) -> list[dict[str, float]]:
    """Log-probability of each option letter right after each prompt."""
    import torch

    device = next(model.parameters()).device
    single = {}
    for letter in LETTERS:
        ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
        single[letter] = ids[0] if len(ids) == 1 else None
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in batch]
        # the fast path holds when appending a letter adds exactly its single token to the prompt's tokens
        fast = all(single.values()) and all(
            tokenizer(p + letter, add_special_tokens=False)["input_ids"] == ids + [single[letter]]
            for p, ids in zip(batch, prompt_ids, strict=True) for letter in LETTERS)
        if fast:
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():  # the last position's logits only, no KV cache: never batch x length x vocabulary
                logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores += [{letter: float(row[single[letter]]) for letter in LETTERS} for row in logprobs]
        else:
            scores += [{letter: continuation_logprob(model, tokenizer, p, letter) for letter in LETTERS}
                       for p in batch]
    return scores


def continuation_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """Sum of log-probabilities of the tokens ``continuation`` adds to ``prompt`` (the general, slow path)."""
    import torch

    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(prompt_ids), len(full)) and prompt_ids[common] == full[common]:
        common += 1
    first = max(common, 1)  # the logits at positions first-1 .. len-2 predict the continuation's tokens
    keep = len(full) - first + 1
    with torch.no_grad():
        logits = model(torch.tensor([full], device=device), logits_to_keep=keep, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    offset = len(full) - keep
    return float(sum(logprobs[i - 1 - offset, full[i]] for i in range(first, len(full))))


def choose(scores: list[dict[str, float]]) -> list[str]:
    """The letter with the highest score; ties go to the earlier letter (``tied`` says where that happened)."""
    return [max(LETTERS, key=lambda letter: (row[letter], -LETTERS.index(letter))) for row in scores]


def tied(row: dict[str, float]) -> list[str]:
    """The letters sharing the highest score when more than one does (a tie ``choose`` broke), else []."""
    best = max(row.values())
    letters = [letter for letter in LETTERS if row[letter] == best]
    return letters if len(letters) > 1 else []


def summarize(name: str, shots: int, questions: list[Question], chosen: list[str]) -> dict[str, Any]:
    """Accuracy per subject, over all questions (micro) and averaged over subjects (macro)."""
    subjects: dict[str, dict[str, Any]] = {}
    for q, letter in zip(questions, chosen, strict=True):
        row = subjects.setdefault(q.subject, {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += int(letter == q.answer)
    for row in subjects.values():
        row["accuracy"] = row["correct"] / row["n"]
    total = sum(row["n"] for row in subjects.values())
    return {"exam": name, "shots": shots, "n": total,
            "accuracy": sum(row["correct"] for row in subjects.values()) / total,
            "macro_accuracy": sum(row["accuracy"] for row in subjects.values()) / len(subjects),
            "subjects": subjects}


def score_exam(model, tokenizer, exam: Exam, shots: int, batch_size: int = 8) -> dict[str, Any]:
    """Score every test question; the result says how (prompt, letter token ids, averaging) and what was chosen,
    so a number can be reproduced and compared."""
    from tqdm import tqdm

    pairs = prompts_for(exam, shots)
    scores = []
    prompts = [prompt for _, prompt in pairs]
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"score {exam.name}", file=sys.stderr):
        scores += letter_scores(model, tokenizer, prompts[start : start + batch_size], batch_size)
    chosen = choose(scores)
    questions = [q for q, _ in pairs]
    result = summarize(exam.name, shots, questions, chosen)
    ties = [tied(row) for row in scores]
    result["ties"] = sum(bool(letters) for letters in ties)  # questions whose top letters scored exactly alike
    if result["ties"]:
        print(f"warning: {exam.name}: {result['ties']} of {len(questions)} questions have a tie for the highest "
              "letter score (the earlier letter was taken); low precision rounds scores together: compute in "
              "float32 (generation.dtype)", file=sys.stderr)
    token_ids = {letter: tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in LETTERS}
    result["method"] = {
        "scoring": "log-probability of each option letter right after the prompt (answer-only, no generation)",
        "letter_token_ids": token_ids,
        "averaging": "accuracy: over all questions; macro_accuracy: mean of the subjects' accuracies",
        "first_prompt": prompts[0],
    }
    result["questions"] = [{"where": q.where, "answer": q.answer, "chosen": c,
                            "scores": {k: round(v, 4) for k, v in row.items()}, **({"tied": t} if t else {})}
                           for q, c, row, t in zip(questions, chosen, scores, ties, strict=True)]
    return result
