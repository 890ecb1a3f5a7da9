"""Padding-free batches: the rows of a batch laid end to end in one sequence, with no padding token anywhere.

Each row keeps its own positions (0, 1, 2, ... restarting at every row), and that restart is what keeps the rows
apart: transformers turns position ids that restart into a block-diagonal causal mask (sdpa, eager, flex
attention), so no token attends to another row. The first label of every row is ignored, so no row learns to
predict the next row's first token. A batch built this way gives the same loss and gradients as the same rows
padded to the longest one, and costs only the tokens that are there.

With ``packing: tokens`` a step holds the rows the padded run's step holds (the same seeded order, the same
rows a step), and they are dealt into the step's micro-batches by tokens instead of by count (``balance_step``):
every micro-batch then holds about the same number of tokens, whatever the rows' lengths, and the loss curve is
the padded run's. Packs cut to a fixed size in tokens would put other rows in each step, and their curve would
drift from the padded one by as much as another seed's.
"""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100


def balance_step(rows: Sequence[int], lengths: Sequence[int], packs: int) -> list[list[int]]:
    """``rows`` (indices, with their ``lengths`` in tokens) dealt into ``packs`` micro-batches of even tokens.

    Longest row first, each into the pack holding the fewest tokens so far (greedy longest-processing-time: the
    fullest pack exceeds the mean by less than the longest row). With at least as many rows as packs no pack is
    empty. Packs come fullest first; each keeps its rows in ``rows``' order.
    """
    if len(rows) < packs:
        raise ValueError(f"{len(rows)} rows cannot fill {packs} packs")
    tokens = [0] * packs
    members: list[list[int]] = [[] for _ in range(packs)]
    for position in sorted(range(len(rows)), key=lambda p: -int(lengths[p])):
        emptiest = min(range(packs), key=tokens.__getitem__)
        members[emptiest].append(position)
        tokens[emptiest] += int(lengths[position])
    order = sorted(range(packs), key=lambda p: -tokens[p])
    return [[rows[p] for p in sorted(members[pack])] for pack in order]


def flatten_rows(features: list, count_targets: bool = False) -> dict:
    """One padding-free batch from rows (dicts with ``input_ids`` and ``labels``).

    Returns tensors of shape (1, total tokens): input_ids, labels (the first of each row ignored) and
    position_ids; no attention mask, which is what lets transformers see the packed format; and the rows'
    bounds for the varlen attention. With ``count_targets``, also ``num_targets``: how many tokens have a next
    token to predict, counted here on the host so that the fused loss (``fused_loss``) need not ask the GPU.
    """
    import torch

    input_ids, labels, positions = [], [], []
    for row in features:
        ids = list(row["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(row["labels"])[1:]
        positions += range(len(ids))
    counted = {"num_targets": sum(label != IGNORE_INDEX for label in labels[1:])} if count_targets else {}
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "use_cache": False,
            **row_bounds([len(row["input_ids"]) for row in features]), **counted}


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
    """Make ``attn_implementation="varlen"`` known to transformers. No mask function is registered with it: for an
    attention without one, transformers builds no mask and looks no further, where with one it first asks the GPU
    whether the position ids hold several rows, a wait in every forward."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN
