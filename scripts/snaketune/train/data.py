"""The train stage's data: the tokenized splits the dataset stage wrote, memory-mapped, and how packed rows are
dealt into each optimizer step's micro-batches."""

from __future__ import annotations

from pathlib import Path

from snaketune.train import distributed, preference


def longest_row(parquet: Path) -> int:
    """Tokens in the longest row of a tokenized split, read a row group at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = pq.ParquetFile(parquet)
    longest = 0
    for group in range(source.num_row_groups):
        lengths = pc.list_value_length(source.read_row_group(group, columns=["input_ids"]).column("input_ids"))
        longest = max(longest, pc.max(lengths).as_py() or 0)
    return longest


def step_packs_sampler(rows, args):
    """``packing: tokens``: each optimizer step's ``rows`` (TokenRows), as the padded run draws them, dealt into
    its micro-batches (every process's) by tokens.

    transformers' BatchRebalanceSampler keeps a step's rows and shares them out among micro-batches and processes;
    its cost is a padded batch's (rows x the longest, in groups of similar length), and it takes no seed. Packs
    have no padding, so this one deals rows by their tokens (``packing.balance_step``) and shuffles with the run's
    seed: the same order as the padded run's sampler (``torch.randperm`` seeded with seed + epoch).
    """
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    from snaketune.train.packing import balance_step

    class StepPacks(BatchRebalanceSampler):
        def _assign(self, indices, lengths):
            packs = balance_step(indices, lengths, self.dp_size * self.grad_accum)  # fullest first
            return [[packs[slot * self.dp_size + rank] for slot in range(self.grad_accum)]
                    for rank in range(self.dp_size)]

    processes, accumulation = max(1, args.world_size), args.gradient_accumulation_steps
    return StepPacks(lengths=rows.lengths.tolist(), dp_size=processes, grad_accum=accumulation,
                     effective_batch_size=args.per_device_train_batch_size * accumulation * processes,
                     seed=args.data_seed, rank=args.process_index if processes > 1 else 0,
                     drop_last=args.dataloader_drop_last)


def open_rows(train_split: Path, eval_split: Path, scratch: Path):
    """The train and eval splits, memory-mapped from Arrow copies in ``scratch`` (the run's checkpoint folder:
    kept for a resume, removed with it). Rank 0 writes them while the others wait."""
    from snaketune.train.token_rows import TokenRows

    caches = {"train": scratch / "train.arrow", "eval": scratch / "eval.arrow"}
    if distributed.is_first_process():
        scratch.mkdir(parents=True, exist_ok=True)
        for split, parquet in (("train", train_split), ("eval", eval_split)):
            TokenRows(parquet, caches[split])
    distributed.barrier()
    return TokenRows(train_split, caches["train"]), TokenRows(eval_split, caches["eval"])


def open_pairs(train_split: Path, eval_split: Path, scratch: Path, with_train: bool):
    """The preference pairs of the train split (when ``with_train``) and of the eval split, each None when the
    dataset has none; memory-mapped Arrow copies live in ``scratch``. Rank 0 writes them while the others wait."""

    def load():
        return [preference.pair_rows(path, scratch / "pairs") if wanted and preference.has_pairs(path) else None
                for path, wanted in ((train_split, with_train), (eval_split, True))]

    if distributed.is_first_process():
        scratch.mkdir(parents=True, exist_ok=True)
        found = load()
    distributed.barrier()
    return found if distributed.is_first_process() else load()
