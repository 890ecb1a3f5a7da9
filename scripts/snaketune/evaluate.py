"""Evaluate stage: BLEU-4, ROUGE-1/2/L, exact match and label metrics on ``predictions.csv``.

Chinese has no spaces, so how text is split decides the score: ``char`` splits CJK text into characters and
keeps other words whole, ``whitespace`` splits on spaces. The choice is written into metrics.json beside the
numbers, so two runs' scores are comparable only when they say the same.

``bleu`` / ``rouge`` pick how the scores are computed: ``default`` (nltk sentence BLEU-4 with smoothing method 1
and rouge_score, both over ``text_tokenizer``'s units), or ``llamafactory``, the numbers LLaMA-Factory and
ms-swift print after their predict step, so runs can be set beside theirs: BLEU-4 over characters (every
character, spaces included) with smoothing method 3, and ROUGE-1/2/L F over jieba words with rouge-chinese,
each sample's score rounded to 4 decimals before the mean, as they do.
"""

from __future__ import annotations

import re
import unicodedata

from snaketune.errors import UserError
from snaketune.settings import EvalSettings

CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# One CJK character, or a run of letters/digits of any other script; punctuation is not a token.
CHAR_TOKEN = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")


def tokenize(text: str, how: str) -> list[str]:
    """Split ``text`` into the units BLEU and ROUGE count."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    if how == "whitespace":
        return text.split()
    return CHAR_TOKEN.findall(text)


def normalize_answer(text: str) -> str:
    """Exact match ignores surrounding whitespace and Unicode width differences, nothing else."""
    return unicodedata.normalize("NFKC", str(text)).strip()


def bleu4(references: list[str], predictions: list[str], how: str, mode: str = "default") -> float:
    """Mean sentence BLEU-4 (nltk, weights 0.25 each, smoothing method 1), in percent; ``llamafactory``: over
    characters with smoothing method 3, each sample rounded to 4 decimals."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if mode == "llamafactory":
        method3 = SmoothingFunction().method3
        scores = [round(100 * sentence_bleu([list(str(ref))], list(str(pred)), smoothing_function=method3), 4)
                  for ref, pred in zip(references, predictions, strict=True)]
        return sum(scores) / len(scores)

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


def rouge_llamafactory(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F over jieba words (rouge-chinese), 0 when either side has no word, in percent."""
    import jieba
    from rouge_chinese import Rouge

    jieba.setLogLevel(60)  # its "Building prefix dict" lines are not errors
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for ref, pred in zip(references, predictions, strict=True):
        hypothesis, reference = " ".join(jieba.cut(str(pred))), " ".join(jieba.cut(str(ref)))
        if not hypothesis.split() or not reference.split():
            continue
        for key, value in Rouge().get_scores(hypothesis, reference)[0].items():
            totals[key] += round(100 * value["f"], 4)
    return {key: value / len(references) for key, value in totals.items()}


def rouge(references: list[str], predictions: list[str], how: str, mode: str = "default") -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge_score, with our tokenizer so Chinese is not scored as empty), in percent."""
    from rouge_score import rouge_scorer

    if mode == "llamafactory":
        return rouge_llamafactory(references, predictions)
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


def contains(references: list[str], predictions: list[str]) -> float:
    """Share of predictions that contain their reference, or one of its alternatives written ``a | b``, ignoring
    case and Unicode width: a short-answer question ("What is the capital of France?" -> "Paris") scored on a
    model's free-form sentence."""
    def found(reference: str, prediction: str) -> bool:
        text = normalize_answer(prediction).lower()
        return any(normalize_answer(option).lower() in text for option in str(reference).split("|")
                   if option.strip())

    return sum(found(r, p) for r, p in zip(references, predictions, strict=True)) / len(references)


NO_LABEL = "(none)"


def to_label(text: str, labels: dict[str, list[str]]) -> str:
    """The label a generated text means: the label whose name or alias it starts with (longest first), or
    ``(none)`` when it names none of them; a model that answers off-script is wrong, not skipped."""
    answer = normalize_answer(text).lower()
    candidates = sorted(((alias, label) for label, aliases in labels.items() for alias in [label, *aliases]),
                        key=lambda pair: -len(pair[0]))
    return next((label for alias, label in candidates if answer.startswith(normalize_answer(alias).lower())),
                NO_LABEL)


def label_metrics(references: list[str], predictions: list[str], labels: dict[str, list[str]]) -> dict:
    """Accuracy, macro precision/recall/F1, per-label scores and the confusion table (reference -> predicted)."""
    if not labels:
        raise UserError("metric `label` needs `evaluation.labels`: each label and the texts that mean it")
    gold = [to_label(ref, labels) for ref in references]
    unknown = sorted({ref for ref, g in zip(references, gold, strict=True) if g == NO_LABEL})
    if unknown:
        raise UserError(f"references that are none of the labels {list(labels)}: {unknown[:5]}; add them to "
                        "`evaluation.labels`")
    guessed = [to_label(pred, labels) for pred in predictions]
    names = list(labels)
    confusion = {g: {p: 0 for p in [*names, NO_LABEL]} for g in names}
    for g, p in zip(gold, guessed, strict=True):
        confusion[g][p] += 1
    per_label = {}
    for name in names:
        tp = confusion[name][name]
        predicted = sum(confusion[g][name] for g in names)
        actual = sum(confusion[name].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        "accuracy": sum(g == p for g, p in zip(gold, guessed, strict=True)) / len(gold),
        "precision": sum(v["precision"] for v in per_label.values()) / len(names),
        "recall": sum(v["recall"] for v in per_label.values()) / len(names),
        "f1": sum(v["f1"] for v in per_label.values()) / len(names),
        "unmatched_predictions": guessed.count(NO_LABEL),
        "per_label": per_label,
        "confusion": confusion,
    }


def evaluate(settings: EvalSettings, references: list[str], predictions: list[str]) -> dict:
    """All metrics the run asked for, with the row count and the text tokenizer used."""
    if not references:
        raise UserError("no predictions to evaluate")
    result: dict = {"n": len(references), "text_tokenizer": settings.text_tokenizer}
    if "bleu" in settings.metrics:
        result["bleu-4"] = bleu4(references, predictions, settings.text_tokenizer, settings.bleu)
        result["bleu_mode"] = settings.bleu
    if "rouge" in settings.metrics:
        result.update(rouge(references, predictions, settings.text_tokenizer, settings.rouge))
        result["rouge_mode"] = settings.rouge
    if "exact_match" in settings.metrics:
        result["exact_match"] = exact_match(references, predictions)
    if "contains" in settings.metrics:
        result["contains"] = contains(references, predictions)
    if "label" in settings.metrics:
        result.update(label_metrics(references, predictions, settings.labels))
    return result


def preference_metrics(summary: dict) -> dict:
    """The eval split's preference scores a run's training measured (train_summary.json), for metrics.json:
    the model's own preference accuracy and, for dpo/orpo, trl's reward accuracy and margin."""
    found = summary.get("preference")
    if not found:
        return {}
    scores = {"preference_accuracy": found["accuracy"], "preference_pairs": found["pairs"],
              "preference_accuracy_at_start": found["start_accuracy"]}
    for key in ("reward_accuracy", "reward_margin"):
        if summary.get(key) is not None:
            scores[key] = round(summary[key], 4)
    return scores
