"""Regenerate the bundled sample datasets (deterministic): ``python data/make_samples.py``.

identity.jsonl     self-identity assistant, OpenAI ``messages`` layout, English and Chinese paraphrases
text_matching.json Chinese sentence-pair matching, alpaca ``instruction/input/output`` layout
greetings.jsonl    "Greet X" / "Thank X" answered with a greeting or a thanks at random (``messages``): an SFT
                   model of it prefers neither answer to a given instruction
greeting_pairs.jsonl the same instructions as preference pairs in trl's conversational ``prompt/chosen/rejected``
                   layout: the answer that does what was asked is chosen
"""

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "You are a helpful assistant."

INTENTS_EN = {
    "My name is Snaky, an AI assistant fine-tuned with snaketune.": [
        "what is your name", "what's your name", "what should I call you", "tell me your name",
        "do you have a name", "how should I address you"],
    "The snaketune team built me.": [
        "who made you", "who created you", "who built you", "who trained you", "who developed you",
        "which team made you"],
    "I am an AI assistant called Snaky, not a human.": [
        "who are you", "are you a human", "what are you", "introduce yourself", "describe yourself",
        "are you a real person"],
    "Answering questions, writing text and helping with code.": [
        "what can you do", "how can you help me", "what are you good at", "what tasks can you handle",
        "can you help me", "what are your skills"],
}
INTENTS_ZH = {
    "我的名字是 Snaky，一个由 snaketune 微调的 AI 助手。": [
        "你叫什么名字", "你的名字是什么", "我该怎么称呼你", "告诉我你的名字", "你有名字吗", "怎么称呼你"],
    "snaketune 团队开发了我。": [
        "谁开发了你", "你是谁创造的", "谁训练了你", "你是哪个团队做的", "谁制作了你", "你的开发者是谁"],
    "作为 AI 助手，我叫 Snaky，不是人类。": [
        "你是谁", "你是人类吗", "介绍一下你自己", "你是什么", "你是真人吗", "描述一下你自己"],
}
PREFIX_EN, SUFFIX_EN = ["", "Hi, ", "Hello, ", "Hey, ", "Excuse me, ", "Quick question: "], ["?", " please?", "?!"]
PREFIX_ZH, SUFFIX_ZH = ["", "你好，", "请问", "嗨，", "打扰一下，"], ["？", "呀？", "呢？"]

PAIRS = [
    ("我的银行卡余额怎么查", "如何查询卡里还剩多少钱"), ("信用卡额度可以提高吗", "怎样才能提升信用卡的额度"),
    ("今天北京天气怎么样", "北京今天的天气如何"), ("怎么修改登录密码", "登录密码在哪里更改"),
    ("快递什么时候能到", "我的包裹多久可以送达"), ("这家餐厅几点开门", "这个饭店早上什么时间营业"),
    ("如何申请退款", "退款要怎么办理"), ("手机充不进电怎么办", "手机无法充电该如何处理"),
    ("明天的航班会延误吗", "明天那趟飞机会不会晚点"), ("附近有没有加油站", "这周围哪里可以加油"),
    ("怎样学好英语口语", "提高英语口语有什么方法"), ("火车票可以改签吗", "买好的火车票能不能换时间"),
    ("会员卡怎么注销", "如何取消我的会员资格"), ("电脑开机很慢怎么办", "电脑启动速度太慢如何解决"),
    ("这件衣服有别的颜色吗", "这款衣服还有其他颜色可选吗"), ("孩子发烧应该吃什么药", "小孩发热需要用什么药"),
    ("贷款利率是多少", "借款的利息怎么算"), ("酒店可以带宠物入住吗", "宾馆允许携带宠物吗"),
    ("网速太慢怎么解决", "网络很卡该怎么办"), ("怎么开具电子发票", "电子发票在哪里申请"),
]
INSTRUCTION = "判断下面两个句子的意思是否相同，只回答“相同”或“不同”。"


def identity_rows(rng: random.Random) -> list[dict]:
    rows = []
    for intents, prefixes, suffixes, tag in ((INTENTS_EN, PREFIX_EN, SUFFIX_EN, "en"),
                                             (INTENTS_ZH, PREFIX_ZH, SUFFIX_ZH, "zh")):
        for answer, questions in intents.items():
            for question, prefix in itertools.product(questions, prefixes):
                text = prefix + (question[0].upper() + question[1:] if not prefix and tag == "en" else question)
                messages = [{"role": "user", "content": text + rng.choice(suffixes)},
                            {"role": "assistant", "content": answer}]
                if rng.random() < 0.3:
                    messages.insert(0, {"role": "system", "content": SYSTEM})
                rows.append({"id": f"identity-{tag}-{len(rows):03d}", "messages": messages})
    return rows


def matching_rows() -> list[dict]:
    rows = []
    for i, (a, b) in enumerate(PAIRS):
        other, far = PAIRS[(i + 1) % len(PAIRS)], PAIRS[(i + 3) % len(PAIRS)]
        for first, second, label in ((a, b, "相同"), (b, a, "相同"), (a, other[1], "不同"), (b, far[0], "不同")):
            rows.append({"id": f"match-{len(rows):03d}", "instruction": INSTRUCTION,
                         "input": f"句子一：{first}\n句子二：{second}", "output": label})
    return rows


SYLLABLES = ["ka", "lo", "mi", "ra", "to", "ne", "su", "vi", "da", "po", "ze", "hu", "li", "an", "bo", "ce"]
ASKS = {"greet": ["Greet {name}.", "Say hello to {name}.", "Welcome {name}."],
        "thank": ["Thank {name}.", "Say thanks to {name}.", "Show {name} your gratitude."]}
ANSWERS = {"greet": "Hello, {name}! Nice to meet you.", "thank": "Thank you, {name}! I appreciate it."}


def greeting_names(rng: random.Random, count: int) -> list[str]:
    names = set()
    while len(names) < count:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    return sorted(names)


def greeting_rows(rng: random.Random, pairs: bool, count: int = 320) -> list[dict]:
    """Instructions to greet or to thank someone. As pairs, the answer that does what was asked is chosen; as SFT
    rows, every instruction wording is answered with a greeting as often as with a thanks."""
    rows = []
    for index, name in enumerate(greeting_names(rng, count)):
        asked = ("greet", "thank")[index % 2]
        prompt = ASKS[asked][index // 2 % 3].format(name=name)
        other = "thank" if asked == "greet" else "greet"
        if pairs:
            rows.append({"id": f"pair-{index:03d}", "prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": ANSWERS[asked].format(name=name)}],
                         "rejected": [{"role": "assistant", "content": ANSWERS[other].format(name=name)}]})
        else:
            answer = ANSWERS[(asked, other)[index // 6 % 2]].format(name=name)
            rows.append({"id": f"greeting-{index:03d}", "messages": [{"role": "user", "content": prompt},
                                                                    {"role": "assistant", "content": answer}]})
    return rows


if __name__ == "__main__":
    rng = random.Random(0)
    with open(HERE / "identity.jsonl", "w", encoding="utf-8") as handle:
        for row in identity_rows(rng):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (HERE / "text_matching.json").write_text(json.dumps(matching_rows(), ensure_ascii=False, indent=1) + "\n",
                                             encoding="utf-8")
    for name, pairs, seed in (("greetings.jsonl", False, 1), ("greeting_pairs.jsonl", True, 2)):
        with open(HERE / name, "w", encoding="utf-8") as handle:
            for row in greeting_rows(random.Random(seed), pairs):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
