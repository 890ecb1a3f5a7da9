"""Metrics: BLEU-4 as nltk computes it, ROUGE that scores Chinese, exact match, tokenizer recorded."""

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from snaketune.metrics import EvalSettings, evaluate, tokenize


def test_char_tokenizer_splits_cjk_per_character_and_keeps_words():
    assert tokenize("我是 Snaky，AI 助手。", "char") == ["我", "是", "snaky", "ai", "助", "手"]
    assert tokenize("The team built me.", "whitespace") == ["the", "team", "built", "me."]


def test_bleu_matches_nltk_sentence_bleu_with_smoothing():
    ref, pred = "今天北京天气很好", "北京今天天气很好"
    result = evaluate(EvalSettings(metrics=["bleu"]), [ref], [pred])
    expected = sentence_bleu([list(ref)], list(pred), weights=(0.25,) * 4,
                             smoothing_function=SmoothingFunction().method1)
    assert result["bleu-4"] == pytest.approx(100 * expected)


def test_identical_texts_score_full_marks_and_empty_predictions_zero():
    refs = ["我由 snaketune 团队开发。", "The snaketune team built me."]
    perfect = evaluate(EvalSettings(), refs, list(refs))
    assert perfect["bleu-4"] == pytest.approx(100) and perfect["rouge-l"] == pytest.approx(100)
    assert perfect["exact_match"] == 1.0 and perfect["n"] == 2 and perfect["text_tokenizer"] == "char"
    empty = evaluate(EvalSettings(), refs, ["", ""])
    assert empty["bleu-4"] == 0 and empty["rouge-1"] == 0 and empty["exact_match"] == 0


def test_rouge_scores_chinese_by_character():
    result = evaluate(EvalSettings(metrics=["rouge"]), ["我喜欢猫"], ["我喜欢狗"])
    assert result["rouge-1"] == pytest.approx(75.0)
    assert result["rouge-2"] == pytest.approx(100 * 2 / 3)
    assert "bleu-4" not in result and "exact_match" not in result


def test_exact_match_ignores_only_surrounding_space():
    result = evaluate(EvalSettings(metrics=["exact_match"]), ["相同", "不同", "Yes"], [" 相同\n", "相同", "yes"])
    assert result["exact_match"] == pytest.approx(1 / 3)
