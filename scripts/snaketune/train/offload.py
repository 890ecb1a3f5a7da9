"""Gradient checkpointing that keeps each layer's input in host memory.

Checkpointing keeps one tensor a decoder layer, its input (``tokens x hidden``), to recompute the layer from in
the backward pass: 28 layers x 4k tokens x 1536 x 2 bytes = 0.33 GiB for a 1.5B model's micro-batch. Here that
input is copied to pinned host memory as soon as the layer has run, and back when the backward pass recomputes
the layer, so the GPU holds it for one layer at a time, as Unsloth's checkpointing does.

This wraps ``torch.utils.checkpoint.checkpoint`` (non-reentrant) without saved-tensor hooks of its own: the
layer's input is held by a box the recompute reads from. On an H100 (Qwen2.5-1.5B shape, LoRA, 4k-token
micro-batches) it took 0.365 GiB off the peak at no loss of speed (benchmarks/README.md, issue 36, session 13).
Recording the allocator's history (``torch.cuda.memory._record_memory_history``) makes the recompute of a
compiled layer fail ("SystemError: ... returned NULL without setting an exception") with this and with
transformers' own ``offload`` (``save_on_cpu``) alike.
"""

from __future__ import annotations

import functools

NON_REENTRANT = {"use_reentrant": False}  # how every checkpointed layer here is recomputed


def offloaded_checkpoint(function, hidden, *args, **checkpoint_kwargs):
    """``checkpoint(function, hidden, *args)``, with ``hidden`` moved to (pinned) host memory after the forward and
    back to its device for the recompute. An empty tensor on ``hidden``'s device goes to ``checkpoint`` in its
    place, so the device's random state is still saved and restored (dropout repeats its mask)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    device, wants_grad = hidden.device, hidden.requires_grad
    box = {"input": hidden, "on_host": False}

    def run(anchor, *rest):
        held = box["input"]
        if box["on_host"]:  # the recompute: the input comes back from the host
            held = held.to(device, non_blocking=True).requires_grad_(wants_grad)
        return function(held, *rest)

    output = checkpoint(run, hidden.new_empty(0), *args, **checkpoint_kwargs)
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=device.type == "cuda")
    host.copy_(hidden.detach(), non_blocking=True)
    box.update(input=host, on_host=True)  # the only reference to the GPU copy goes: freed once the caller drops it
    return output


def offload_layer_inputs(model, checkpoint_kwargs: dict | None = None) -> int:
    """Give every layer that checkpoints (transformers' ``GradientCheckpointingLayer`` after
    ``gradient_checkpointing_enable``) the offloading function; returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = functools.partial(
                offloaded_checkpoint, **(checkpoint_kwargs or NON_REENTRANT))
            changed += 1
    return changed
