"""Replay stage: the base model's own answers to a prompt file, written as a messages dataset.

Fine-tuning on new data alone pulls a model away from what it answered well before. Trained beside the new data,
its own greedy answers to general prompts hold those answers in place (a replay set), and no outside data is
needed: the model the dataset is built for writes it. An answer that does not end within ``max_new_tokens`` is
left out (a row that teaches stopping mid-sentence would do harm) and counted in the log and the summary line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from snaketune.errors import UserError, located
from snaketune.io import atomic_file
from snaketune.settings import ReplaySettings


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """``[{"id", "line", "prompt"}]`` from a prompt file; blank lines are skipped, a bad line is an error naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise located(path, number, f"not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise located(path, number, 'field "prompt" missing or not a non-empty string')
            prompts.append({"id": str(row.get("id", f"replay-{number}")), "line": number, "prompt": row["prompt"]})
        else:
            prompts.append({"id": f"replay-{number}", "line": number, "prompt": line.strip()})
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def replay(settings: ReplaySettings, model_dir: Path, out: Path, trust_remote_code: bool = False) -> dict[str, int]:
    """Generate the model's greedy answer to every prompt (with the system prompt, through its chat template) and
    write ``out`` as JSONL of ``{"id", "messages"}`` records; return the counts written and left out."""
    import torch
    from tqdm import tqdm

    from snaketune.predict import auto_batch_size, greedy_tokens, load_for_generation
    from snaketune.templates import ChatTemplate, TemplateError, with_system

    prompts = read_prompts(settings.prompts)
    tokenizer, model = load_for_generation(model_dir, None, trust_remote_code, settings.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    try:
        template = ChatTemplate.of(tokenizer, settings.template)
    except TemplateError as exc:
        raise UserError(f"{settings.prompts}: {exc}") from None
    texts = [template.render(with_system(settings.system, [{"role": "user", "content": row["prompt"]}]),
                             add_generation_prompt=True) for row in prompts]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    size = settings.batch_size
    if size == "auto":
        size = auto_batch_size(model, max(lengths), settings.max_new_tokens, device)
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [tokenizer.eos_token_id])
    answers: dict[int, str | None] = {}
    with tqdm(total=len(prompts), desc="replay", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
            with torch.no_grad():
                tokens = greedy_tokens(model, inputs["input_ids"], inputs["attention_mask"], settings.max_new_tokens,
                                       tokenizer.pad_token_id)
            for index, row in zip(batch, tokens.tolist(), strict=True):
                end = next((position for position, token in enumerate(row) if token in eos), None)
                answer = tokenizer.decode(row[:end], skip_special_tokens=True).strip() if end is not None else None
                answers[index] = answer or None
            bar.update(len(batch))
    left_out = [prompts[i] for i in range(len(prompts)) if answers[i] is None]
    for row in left_out[:20]:
        print(f"warning: {settings.prompts}:{row['line']}: left out of the replay set: the answer did not end within "
              f"replay_max_new_tokens={settings.max_new_tokens} (or was empty)", file=sys.stderr)
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for index, row in enumerate(prompts):
            if answers[index] is None:
                continue
            messages = with_system(settings.system, [{"role": "user", "content": row["prompt"]},
                                                     {"role": "assistant", "content": answers[index]}])
            handle.write(json.dumps({"id": row["id"], "messages": messages}, ensure_ascii=False) + "\n")
    counts = {"prompts": len(prompts), "answers": len(prompts) - len(left_out), "left_out": len(left_out)}
    if not counts["answers"]:
        raise UserError(f"{settings.prompts}: no answer ended within replay_max_new_tokens={settings.max_new_tokens}")
    return counts
