"""Malformed data through the dataset stage's CLI: one `error:` line naming file, line and field; no traceback;
nothing written under the output folder."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, workflow_env
from snaketune.layout import dataset_outputs

CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
CASES = {
    "not JSON": ("d.jsonl", "messages", json.dumps(CHAT) + "\n{not json\n", {}, "d.jsonl:2: not valid JSON"),
    "wrong type": ("d.jsonl", "alpaca", json.dumps({"instruction": ["a"], "output": "b"}), {},
                   'd.jsonl:1: field "instruction" must be a string, got list'),
    "missing field": ("d.json", "alpaca", '[\n{"instruction": "a", "output": "b"},\n{"instruction": "c"}\n]', {},
                      'd.json:3: field "output" missing'),
    "unknown role": ("d.jsonl", "sharegpt", json.dumps({"conversations": [{"from": "user", "value": "q"}]}), {},
                     'd.jsonl:1: field "conversations[0].from": `user` is not one of human, gpt, system'),
    "CSV column": ("d.csv", "columns", "question,answer\nq,a\n", {"prompt": "{question}", "response": "{label}"},
                   'd.csv:1: column "label" does not exist (columns: question, answer)'),
    "empty file": ("d.jsonl", "messages", "", {}, "d.jsonl: no usable rows"),
    "not UTF-8": ("d.jsonl", "messages", b"\xff\xfe{}", {},
                  "d.jsonl:1: not UTF-8 text (invalid start byte at byte 0)"),
    # Excel on Chinese Windows saves CSV as GBK: the line, and the encoding that reads the file
    "GBK CSV": ("d.csv", "columns", "问题,答案\n你好,您好\n".encode("gbk"), {"prompt": "{问题}", "response": "{答案}"},
                "d.csv:1: not UTF-8 text (invalid continuation byte at byte 0); it reads as gb18030: set the dataset's "
                "`encoding: gb18030` (or `encoding: auto`)"),
    "GBK JSONL": ("d.jsonl", "messages", (json.dumps(CHAT) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]},
        ensure_ascii=False) + "\n").encode("gbk"), {},
        "d.jsonl:2: not UTF-8 text (invalid continuation byte at byte 131); it reads as gb18030"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_data_gives_one_line_and_writes_nothing(tmp_path, tiny_model, case):
    name, layout, content, extra, expected = CASES[case]
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    out = tmp_path / "results" / "datasets" / "d" / "tiny"
    settings = {"path": str(data), "format": layout, "eval_size": 0, "test_size": 0, **extra}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "dataset.py"), "--model-manifest", str(tiny_model / "manifest.json"),
         *[item for name, path in dataset_outputs(out).items() for item in (f"--{name}", str(path))],
         "--settings", json.dumps(settings)],
        capture_output=True, text=True, env=workflow_env())
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())
