"""Padding-free batches: the rows of a batch laid end to end in one sequence, with no padding token anywhere.

Each row keeps its own positions (0, 1, 2, ... restarting at every row), and that restart is what keeps the rows
apart: transformers turns position ids that restart into a block-diagonal causal mask (sdpa, eager, flex
attention), so no token attends to another row. The first label of every row is ignored, so no row learns to
predict the next row's first token. A batch built this way gives the same loss and gradients as the same rows
padded to the longest one, and costs only the tokens that are there.

Batches can also be sized in tokens (``pack_rows``): rows are shuffled with the seed, then laid into packs of at
most ``capacity`` tokens (first fit), so every step sees about the same number of tokens however long the rows are.
The train stage sizes packs as the real tokens of a padded batch on average (``train.pack_capacity``), so a pack
holds ``per_device_train_batch_size`` rows on average.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

IGNORE_INDEX = -100


def pack_rows(lengths: Sequence[int], capacity: int, seed: int, open_packs: int = 8) -> list[list[int]]:
    """Row indices grouped into packs of at most ``capacity`` tokens; every row in exactly one pack.

    The rows are taken in a seeded shuffle, and each goes into the first of the last ``open_packs`` packs that has
    room for it, else starts a new pack (first fit over a window: packs fill well and rows stay shuffled). A row
    longer than ``capacity`` is an error (the dataset stage truncates rows to its max_seq_length).
    """
    if capacity < 1:
        raise ValueError(f"pack capacity must be positive, not {capacity}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    packs: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = int(lengths[index])
        if length > capacity:
            raise ValueError(f"row {index} has {length} tokens, more than a pack's {capacity}")
        window = range(max(0, len(packs) - open_packs), len(packs))
        target = next((p for p in window if room[p] >= length), None)
        if target is None:
            packs.append([])
            room.append(capacity)
            target = len(packs) - 1
        packs[target].append(index)
        room[target] -= length
    return packs


class PackedRows:
    """A dataset whose items are packs: lists of rows of ``rows`` (anything indexable), grouped by ``packs``."""

    def __init__(self, rows, packs: list[list[int]]):
        self.rows = rows
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.rows[i] for i in self.packs[index]]


def flatten_rows(features: list) -> dict:
    """One padding-free batch from rows (dicts with ``input_ids`` and ``labels``) or packs of rows.

    Returns tensors of shape (1, total tokens): input_ids, labels (the first of each row ignored) and
    position_ids; no attention mask, which is what lets transformers see the packed format; and the rows'
    bounds for the varlen attention.
    """
    import torch

    rows = [row for item in features for row in (item if isinstance(item, list) else [item])]
    input_ids, labels, positions = [], [], []
    for row in rows:
        ids = list(row["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(row["labels"])[1:]
        positions += range(len(ids))
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "use_cache": False,
            **row_bounds([len(row["input_ids"]) for row in rows])}


VARLEN = "varlen"  # the attention implementation name registered with transformers


def row_bounds(lengths: Sequence[int]) -> dict:
    """Where each row of a padding-free batch starts and ends (``cu_seq_lens``) and the longest row, in the
    keyword arguments transformers passes down to the attention function."""
    import torch

    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    longest = max(lengths, default=0)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def varlen_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each row of a padding-free batch, rows given by ``cu_seq_lens_q``: torch's
    variable-length flash attention on a GPU (no mask, no work across rows), sdpa row by row elsewhere.

    query: (1, heads, tokens, head_dim); key and value: (1, kv_heads, tokens, head_dim). Returns
    (1, tokens, heads, head_dim) and no weights, as transformers' attention functions do.
    """
    import torch

    bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if bounds is None and query.shape[0] == 1 and attention_mask is None:  # one row alone
        bounds, longest = torch.tensor([0, query.shape[2]], dtype=torch.int32), query.shape[2]
    if bounds is None or query.shape[0] != 1:
        raise ValueError("varlen attention needs padding-free batches (packing: tokens or rows)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    if q.is_cuda:
        # flash attention takes half precision: under autocast (QLoRA's fp32 norms and rotary) use its dtype
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
        if half not in (torch.float16, torch.bfloat16):
            raise ValueError("varlen attention needs bf16 or fp16 on a GPU; use attention flex_attention in fp32")
        out = _flash_varlen(q.to(half), k.to(half), v.to(half), bounds.to(q.device, torch.int32), int(longest),
                            scaling).to(q.dtype)
    else:
        out = torch.empty_like(q)
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1)
    return out.unsqueeze(0), None


def _flash_varlen(q, k, v, bounds, longest: int, scaling):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    accepts = inspect.signature(varlen_attn).parameters
    options = {"window_size": (-1, 0)} if "window_size" in accepts else {"is_causal": True}
    if "scale" in accepts:
        options["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in accepts:
            options["enable_gqa"] = True
        else:  # older torch: every query head gets its own copy of its key/value head
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, bounds, bounds, longest, longest, **options)


def register_varlen_attention() -> str:
    """Make ``attn_implementation="varlen"`` known to transformers (it builds no mask for it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, lambda *args, **kwargs: None)
    return VARLEN
