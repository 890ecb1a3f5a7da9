"""Metrics: BLEU-4 as nltk computes it, ROUGE that scores Chinese, exact match, tokenizer recorded."""

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from snaketune.evaluate import evaluate, tokenize
from snaketune.settings import EvalSettings


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


PAIRS = [  # (reference, prediction): Chinese, English, partial overlap, reordering, a short answer
    ("今天北京天气很好，适合出门散步", "北京今天天气很好，适合散步"),
    ("The snaketune team built me from a tiny model.", "The snaketune team built me."),
    ("我由 snaketune 团队开发，是一个小模型助手", "我是 snaketune 团队开发的助手"),
    ("the cat sat on the mat near the door", "the cat is on the mat by the door"),
    ("两句话的意思相同因为都在问还款", "两句话意思不同因为一个问还款"),
]


def test_bleu_equals_sacrebleu_on_the_same_tokens():
    """An independent implementation: sacrebleu's sentence BLEU with floor smoothing 0.1 is nltk's method1."""
    from sacrebleu.metrics import BLEU

    reference_bleu = BLEU(tokenize="none", smooth_method="floor", smooth_value=0.1, effective_order=False,
                          lowercase=False)
    for how in ("char", "whitespace"):
        # Below 4 tokens there are no 4-grams: nltk smooths the empty order to 0.1/1, sacrebleu scores 0. The
        # two agree on every hypothesis long enough to have all four orders.
        pairs = [(ref, pred) for ref, pred in PAIRS if len(tokenize(pred, how)) >= 4]
        assert len(pairs) >= 2
        expected = [reference_bleu.sentence_score(" ".join(tokenize(pred, how)), [" ".join(tokenize(ref, how))]).score
                    for ref, pred in pairs]
        result = evaluate(EvalSettings(metrics=["bleu"], text_tokenizer=how), *map(list, zip(*pairs, strict=True)))
        assert result["bleu-4"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by the textbook table."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def reference_rouge(ref: list[str], pred: list[str]) -> dict[str, float]:
    """ROUGE-N and ROUGE-L F1 written out from their definitions (clipped n-gram overlap; LCS by DP)."""
    from collections import Counter

    def f1(overlap, n_pred, n_ref):
        if not overlap:
            return 0.0
        precision, recall = overlap / n_pred, overlap / n_ref
        return 2 * precision * recall / (precision + recall)

    scores = {}
    for n in (1, 2):
        grams_ref = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        grams_pred = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
        scores[f"rouge-{n}"] = f1(sum((grams_ref & grams_pred).values()), sum(grams_pred.values()),
                                  sum(grams_ref.values()))
    scores["rouge-l"] = f1(lcs_length(ref, pred), len(pred), len(ref))
    return scores


def test_rouge_equals_a_reference_computation_on_the_same_tokens():
    for how in ("char", "whitespace"):
        expected = {key: 0.0 for key in ("rouge-1", "rouge-2", "rouge-l")}
        for ref, pred in PAIRS:
            for key, value in reference_rouge(tokenize(ref, how), tokenize(pred, how)).items():
                expected[key] += 100 * value / len(PAIRS)
        result = evaluate(EvalSettings(metrics=["rouge"], text_tokenizer=how), *map(list, zip(*PAIRS, strict=True)))
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-6), (how, key)


def test_label_metrics_map_generated_text_to_labels_and_count_off_script_answers_as_wrong():
    labels = {"相同": ["是", "一样"], "不同": ["否"]}
    references = ["相同", "相同", "不同", "不同", "相同"]
    predictions = ["相同。", "一样的", "否", "相同", "我不知道"]
    result = evaluate(EvalSettings(metrics=["label"], labels=labels), references, predictions)
    # confusion (reference -> predicted): 相同: 2 相同, 1 none; 不同: 1 不同, 1 相同
    assert result["confusion"] == {"相同": {"相同": 2, "不同": 0, "(none)": 1},
                                   "不同": {"相同": 1, "不同": 1, "(none)": 0}}
    assert result["accuracy"] == pytest.approx(3 / 5) and result["unmatched_predictions"] == 1
    same = result["per_label"]["相同"]
    assert (same["precision"], same["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    different = result["per_label"]["不同"]
    assert (different["precision"], different["recall"], different["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert result["f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_label_metrics_need_labels_and_references_that_are_labels():
    from snaketune.errors import UserError

    with pytest.raises(UserError, match="needs `evaluation.labels`"):
        evaluate(EvalSettings(metrics=["label"]), ["a"], ["a"])
    with pytest.raises(UserError, match=r"references that are none of the labels \['yes', 'no'\]: \['maybe'\]"):
        evaluate(EvalSettings(metrics=["label"], labels={"yes": [], "no": []}), ["maybe"], ["yes"])


# -- LLaMA-Factory's numbers, recomputed from their definitions ---------------------------------------------------
LF_PAIRS = [("今天天气很好，我们去公园散步吧。", "今天天气不错，我们去公园走走。"),
         ("The cat sat on the mat.", "the cat is on the mat"),
         ("我爱北京天安门", "我爱北京天安门"),
         ("完全不同的回答", "")]


def bleu4_from_definition(reference: list[str], hypothesis: list[str]) -> float:
    """BLEU-4 of one sentence with smoothing method 3 (NIST geometric sequence): an n-gram order with no match
    counts 1 / 2^k (k = 1, 2, ... for each such order in turn) over the hypothesis' n-gram count."""
    import math
    from collections import Counter

    if not hypothesis:
        return 0.0
    logs, k = [], 1
    for n in range(1, 5):
        hyp = Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        total = sum(hyp.values())
        if total == 0:
            return 0.0
        matched = sum(min(count, ref[gram]) for gram, count in hyp.items())
        if matched == 0:
            matched, k = 1 / 2 ** k, k + 1
        logs.append(math.log(matched / total))
    brevity = 1.0 if len(hypothesis) > len(reference) else math.exp(1 - len(reference) / len(hypothesis))
    return brevity * math.exp(sum(logs) / 4)


def rouge_from_definition(reference: list[str], hypothesis: list[str]) -> dict[str, float]:
    """ROUGE-1/2 F over distinct n-grams and ROUGE-L F over the longest common subsequence, as rouge-chinese
    (a fork of pltrdy/rouge) computes them: F = 2PR / (P + R + 1e-8)."""
    def f(overlap, hyp, ref):
        p, r = (overlap / hyp if hyp else 0.0), (overlap / ref if ref else 0.0)
        return 2.0 * p * r / (p + r + 1e-8)

    scores = {}
    for n in (1, 2):
        hyp = {tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1)}
        ref = {tuple(reference[i:i + n]) for i in range(len(reference) - n + 1)}
        scores[f"rouge-{n}"] = f(len(hyp & ref), len(hyp), len(ref))
    scores["rouge-l"] = f(lcs_length(reference, hypothesis), len(hypothesis), len(reference))
    return scores


def test_llamafactory_mode_equals_bleu_and_rouge_written_from_their_definitions():
    import jieba

    from snaketune.evaluate import evaluate
    from snaketune.settings import EvalSettings

    references, predictions = [p[0] for p in LF_PAIRS], [p[1] for p in LF_PAIRS]
    result = evaluate(EvalSettings(bleu="llamafactory", rouge="llamafactory"), references, predictions)
    assert (result["bleu_mode"], result["rouge_mode"]) == ("llamafactory", "llamafactory")
    bleu = [round(100 * bleu4_from_definition(list(r), list(p)), 4) for r, p in LF_PAIRS]
    assert result["bleu-4"] == pytest.approx(sum(bleu) / len(bleu), abs=1e-9)
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for ref, pred in LF_PAIRS:
        words = [list(jieba.cut(text)) for text in (ref, pred)]
        words = [[w for w in " ".join(ws).split()] for ws in words]
        if all(words):
            for key, value in rouge_from_definition(*words).items():
                totals[key] += round(100 * value, 4)
    for key, value in totals.items():
        assert result[key] == pytest.approx(value / len(LF_PAIRS), abs=1e-9), key
    default = evaluate(EvalSettings(), references, predictions)
    assert default["bleu_mode"] == "default" and default["bleu-4"] != result["bleu-4"]


def test_contains_finds_the_reference_or_an_alternative_in_a_sentence_ignoring_case():
    from snaketune.evaluate import contains

    references = ["Paris", "seven|7", "H2O", "blue"]
    predictions = ["The capital of France is paris.", "A week has 7 days.", "Water is h₂o", "It is grey."]
    assert contains(references, predictions) == 0.75  # NFKC reads the subscript ₂ as 2; grey is not blue
    assert contains(["4|four"], ["Four legs."]) == 1.0 and contains(["4"], ["Two."]) == 0.0
