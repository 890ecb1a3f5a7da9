"""Preference training (DPO, ORPO) through trl, on the pairs the dataset stage tokenized.

The dataset stage renders every pair with the model's chat template and stores ``prompt_ids``, ``chosen_ids`` and
``rejected_ids`` (the completions end their turn, end-of-turn token included). trl's trainers would tokenize text
again; here they take those ids as they are, so SFT, DPO, ORPO, predict and chat all read one rendering.

- DPO: trl's ``DPOTrainer`` (loss ``pref_loss``, ``beta`` = ``pref_beta``, plus ``pref_ftx`` x trl's ``sft`` loss
  on the chosen answers). The reference is the starting policy:
  for LoRA/QLoRA the same model with the adapter turned off, for a full fine-tune a frozen copy trl loads.
- ORPO: trl's ``ORPOTrainer`` (``trl.experimental.orpo``); no reference; ``pref_beta`` weighs the odds-ratio term
  against the chosen answers' negative log-likelihood.

The preference accuracy reported on the eval split is the model's own: the share of pairs whose chosen completion
has a higher log-likelihood (summed over its tokens) than the rejected one. It is measured before training (the
starting policy: the SFT model of ``from_run``, or the base) and after, so any model can be compared with any other.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAIR_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
LOG_COLUMNS = ["rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"]  # trl's log keys
START_FILE = "preference_start.json"  # the starting policy's eval accuracy, kept with the checkpoints for a resume


def has_pairs(parquet: str | Path) -> bool:
    """Whether a tokenized split holds preference pairs (a dataset built with ranking: true)."""
    import pyarrow.parquet as pq

    return set(PAIR_IDS) <= set(pq.read_schema(parquet).names)


def pair_rows(parquet: str | Path, cache_dir: Path):
    """The pairs of a split as a memory-mapped ``datasets.Dataset`` (the Arrow copy lives in ``cache_dir``)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_parquet(str(parquet), columns=list(PAIR_IDS), cache_dir=str(cache_dir))


def pair_batch(rows: list[dict[str, list[int]]], pad_id: int):
    """Chosen sequences then rejected ones, right-padded: ids, attention mask, and labels on the completions."""
    import torch

    sequences, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            sequences.append(list(row["prompt_ids"]) + list(row[side]))
            labels.append([-100] * len(row["prompt_ids"]) + list(row[side]))
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    target = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
    return ids, mask, target


def completion_logps(model, ids, mask, target):
    """Sum of the log-probabilities of each sequence's labelled tokens."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    labels = target[:, 1:]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(dim=1)


def preference_accuracy(model, rows, pad_id: int, batch_size: int = 8) -> dict[str, Any]:
    """The model's own preference on ``rows`` (pairs): the share of pairs whose chosen completion is more likely
    than the rejected one, and the mean log-likelihood margin."""
    import torch

    device = next(model.parameters()).device
    wins, margins = [], []
    training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
            ids, mask, target = (t.to(device) for t in pair_batch(batch, pad_id))
            chosen, rejected = completion_logps(model, ids, mask, target).chunk(2)
            margins += (chosen - rejected).tolist()
            wins += (chosen > rejected).tolist()
    model.train(training)
    return {"pairs": len(wins), "accuracy": round(sum(wins) / len(wins), 4) if wins else None,
            "margin": round(sum(margins) / len(margins), 4) if margins else None}


def start_callback(eval_pairs, pad_id: int, folder: Path):
    """A callback that measures the starting policy on the eval pairs when training begins (the model is then
    wrapped and, under ZeRO-3, gathers its shards on every process); a resumed run reads what was measured."""
    from transformers import TrainerCallback

    class MeasureStart(TrainerCallback):
        result: dict[str, Any] | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            path = folder / START_FILE
            if state.global_step > 0 and path.is_file():
                self.result = json.loads(path.read_text(encoding="utf-8"))
                return
            self.result = preference_accuracy(model, eval_pairs, pad_id)
            if state.is_world_process_zero:
                path.write_text(json.dumps(self.result) + "\n", encoding="utf-8")
            print(f"starting policy's eval preference accuracy: {self.result['accuracy']} over "
                  f"{self.result['pairs']} pairs", file=sys.stderr)

    return MeasureStart()


def trainer_base(stage: str):
    """trl's trainer of ``stage``, adapted to take the pairs the dataset stage tokenized."""
    if stage == "dpo":
        from trl import DPOTrainer

        class PairDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset.select_columns(list(PAIR_IDS))  # tokenized and cut to length already

        return PairDPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    class PairORPOTrainer(ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = list(feature[f"{side}_ids"])
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [-100] * len(prompt) + answer
            return row

        def _track_num_input_tokens(self, inputs):  # ORPO's batches have no `input_ids`: count both sides
            if self.args.include_num_input_tokens_seen == "no":
                return
            import torch

            tokens = sum(inputs[f"{side}_attention_mask"].sum() for side in ("chosen", "rejected"))
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    return PairORPOTrainer


def config_class(stage: str):
    if stage == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


def config_arguments(stage: str, beta: float, loss: str, longest: Callable[[], int],
                     ftx: float = 0.0) -> dict[str, Any]:
    """trl's settings for ``stage``: the loss and its beta, plus trl's ``sft`` loss on the chosen answers weighted
    ``ftx`` for DPO (LLaMA-Factory's ``pref_ftx``); lengths are already cut by the dataset stage. ``longest`` (the
    longest row's tokens: a scan of the split) is called for ORPO only, whose config needs it."""
    common = {"beta": beta, "disable_dropout": True}
    if stage == "dpo":
        losses = {"loss_type": [loss, "sft"], "loss_weights": [1.0, ftx]} if ftx else {"loss_type": [loss]}
        return {**common, **losses, "max_length": None, "precompute_ref_log_probs": False}
    return {**common, "max_length": longest()}
