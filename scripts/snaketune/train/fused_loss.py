"""The output head and the cross-entropy in one step, without the full-vocabulary logits.

A causal LM's loss usually multiplies every hidden state by the output head (tokens x vocabulary: 152k columns
for Qwen, 2.4 GiB in fp32 for 4k tokens), keeps those logits for the backward pass, and upcasts them again for
the softmax. Here the supervised tokens alone go through the head, a chunk at a time, and the gradients of the
hidden states (and of the head, when it trains) are computed in the same pass, so only one chunk's logits exist
at any moment. Liger Kernel's Triton kernel does the same job (``fused_loss: liger``).

``install(model, kind)`` replaces the forward of a loaded causal-LM instance (before PEFT wraps it) with one
that returns this loss when labels are given in training, and the usual logits otherwise.
"""

from __future__ import annotations

import functools
import types

IGNORE_INDEX = -100
KINDS = ("auto", "liger", "chunked", "none")


@functools.cache
def chunked_function():
    """The torch.autograd.Function, built on first use (torch is imported lazily in this package)."""
    import torch

    class Function(torch.autograd.Function):
        """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (every target valid)."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk_rows):
            ctx.weight_dtype = weight.dtype
            wants_hidden, wants_weight = ctx.needs_input_grad[:2]
            grad_hidden = torch.empty_like(hidden) if wants_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight \
                else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_rows):
                part = hidden[start : start + chunk_rows]
                target = targets[start : start + chunk_rows]
                logits = (part @ weight.T).float()
                log_norm = torch.logsumexp(logits, dim=-1)
                total += (log_norm - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d loss / d logits = softmax - one_hot, computed in place over the chunk's logits
                probabilities = logits.sub_(log_norm[:, None]).exp_()
                probabilities[torch.arange(len(target), device=target.device), target] -= 1
                probabilities = probabilities.to(part.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_rows] = probabilities @ weight
                if grad_weight is not None:
                    grad_weight += (probabilities.T @ part).float()
            ctx.save_for_backward(grad_hidden, grad_weight)
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grad_hidden, grad_weight = ctx.saved_tensors
            scaled_hidden = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
            scaled_weight = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
            return scaled_hidden, scaled_weight, None, None

    return Function


CHUNK_LOGITS_BYTES = 128 * 2**20  # what one chunk's float32 logits may take


def chunk_rows_for(vocab_size: int) -> int:
    """Rows per chunk: as many as keep one chunk's fp32 logits within CHUNK_LOGITS_BYTES, a multiple of 64, at
    least 64 and at most 4096 (220 rounded to 192 for Qwen's 152k vocabulary).

    Every chunk reads the whole head (467 MiB in bf16 for 152k x 1536) twice, forward and for the hidden states'
    gradient. Liger's rule (a chunk's logits the size of all the hidden states) gives 64-row chunks there, and
    those two matmuls, bound by reading the weight, took a tenth of a 1.5B LoRA step on an H100
    (benchmarks/README.md, issue 36)."""
    rows = CHUNK_LOGITS_BYTES // (4 * vocab_size) // 64 * 64
    return max(64, min(4096, rows))


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, kind: str = "chunked",
                         num_targets: int | None = None):
    """Mean (or summed / ``num_items_in_batch``) next-token cross-entropy of ``hidden @ weight.T`` against
    ``labels`` shifted by one, as transformers' causal-LM loss computes it, without the full logits.

    ``num_targets``, the tokens with a target counted on the host (``packing.flatten_rows``), lets the loss pick
    those tokens without asking the GPU how many there are: the host goes on queueing the backward while the GPU
    finishes the forward, instead of waiting for it."""
    import torch
    import torch.nn.functional as F

    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    if num_targets is None:
        hidden, targets = hidden[keep], targets[keep]
        num_targets = len(targets)
    else:
        picked = torch.nonzero_static(keep, size=num_targets).squeeze(1)
        hidden, targets = hidden.index_select(0, picked), targets.index_select(0, picked)
    if kind == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
    else:
        total = chunked_function().apply(hidden, weight, targets, chunk_rows_for(weight.shape[0]))
    count = num_items_in_batch if num_items_in_batch is not None else max(1, num_targets)
    if hasattr(count, "to"):
        count = count.to(total.device)
    return total / count


def liger_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def resolve(kind: str) -> str:
    """The loss to use for ``kind``: auto is the chunked loss on a GPU and the plain one on the CPU (where the
    logits of a small vocabulary cost little). Liger's kernel is a choice, not the default: on the H100 it ran
    no faster than the chunked loss (benchmarks/README.md), and the chunked loss's gradients are tested against
    the plain loss's, while Liger's fused cross-entropy once hurt quality with an unchanged loss (Liger #827)."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"fused_loss `{kind}` is not one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "chunked" if torch.cuda.is_available() else "none"


def head_problem(model) -> str | None:
    """Why the fused loss cannot replace this model's head, or None when it can."""
    import torch

    head = model.get_output_embeddings()
    if not isinstance(getattr(model, "model", None), torch.nn.Module):
        return "the model has no `.model` decoder to call"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"its output head is a {type(head).__name__}, not a plain linear layer without bias"
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            return f"its config scales the logits ({name})"
    return None


def install(model, kind: str) -> str:
    """Make ``model`` (a loaded causal LM, before PEFT) return the fused loss when given labels in training.

    Returns the kind installed ("none" when the model's head does not allow it).
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kind = resolve(kind)
    if kind == "none" or head_problem(model) is not None:
        return "none"
    plain_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, num_items_in_batch=None, num_targets=None,
                **kwargs):
        if labels is None or not self.training:
            return plain_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                 use_cache=use_cache, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("logits_to_keep", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        loss = linear_cross_entropy(outputs.last_hidden_state, self.get_output_embeddings().weight, labels,
                                    num_items_in_batch, kind, num_targets)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    if _zero3():
        import deepspeed

        # the head's weight is used outside the head's own forward: ZeRO-3 must gather it for the model's
        deepspeed.zero.register_external_parameter(model, model.get_output_embeddings().weight)
    return kind


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()
