"""Evaluate stage: BLEU-4, ROUGE-1/2/L and exact match on ``predictions.csv``.

Chinese has no spaces, so how text is split decides the score: ``char`` splits CJK text into characters and
keeps other words whole, ``whitespace`` splits on spaces. The choice is written into metrics.json beside the
numbers, so two runs' scores are comparable only when they say the same.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# One CJK character, or a run of letters/digits of any other script; punctuation is not a token.
CHAR_TOKEN = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")


@dataclass
class EvalSettings:
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge", "exact_match"])
    text_tokenizer: str = "char"


def tokenize(text: str, how: str) -> list[str]:
    """Split ``text`` into the units BLEU and ROUGE count."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    if how == "whitespace":
        return text.split()
    return CHAR_TOKEN.findall(text)


def normalize_answer(text: str) -> str:
    """Exact match ignores surrounding whitespace and Unicode width differences, nothing else."""
    return unicodedata.normalize("NFKC", str(text)).strip()


def bleu4(references: list[str], predictions: list[str], how: str) -> float:
    """Mean sentence BLEU-4 (nltk, weights 0.25 each, smoothing method 1), in percent."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu([tokenize(ref, how)], tokenize(pred, how), weights=(0.25, 0.25, 0.25, 0.25),
                      smoothing_function=smooth) if tokenize(pred, how) else 0.0
        for ref, pred in zip(references, predictions, strict=True)
    ]
    return 100 * sum(scores) / len(scores)


class _Splitter:
    """The tokenizer interface rouge_score expects: an object with ``tokenize(text)``."""

    def __init__(self, how: str):
        self.how = how

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.how)


def rouge(references: list[str], predictions: list[str], how: str) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge_score, with our tokenizer so Chinese is not scored as empty), in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Splitter(how))
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for ref, pred in zip(references, predictions, strict=True):
        scores = scorer.score(ref, pred)
        totals["rouge-1"] += scores["rouge1"].fmeasure
        totals["rouge-2"] += scores["rouge2"].fmeasure
        totals["rouge-l"] += scores["rougeL"].fmeasure
    return {key: 100 * value / len(references) for key, value in totals.items()}


def exact_match(references: list[str], predictions: list[str]) -> float:
    hits = sum(normalize_answer(r) == normalize_answer(p) for r, p in zip(references, predictions, strict=True))
    return hits / len(references)


def evaluate(settings: EvalSettings, references: list[str], predictions: list[str]) -> dict:
    """All metrics the run asked for, with the row count and the text tokenizer used."""
    if not references:
        raise ValueError("no predictions to evaluate")
    result: dict = {"n": len(references), "text_tokenizer": settings.text_tokenizer}
    if "bleu" in settings.metrics:
        result["bleu-4"] = bleu4(references, predictions, settings.text_tokenizer)
    if "rouge" in settings.metrics:
        result.update(rouge(references, predictions, settings.text_tokenizer))
    if "exact_match" in settings.metrics:
        result["exact_match"] = exact_match(references, predictions)
    return result
