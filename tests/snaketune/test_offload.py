"""Checkpointed layers whose inputs wait in host memory give the gradients of plain checkpointing."""

import pytest


def lora_gradients(tiny_model, offload: bool, compiled: bool):
    """The LoRA gradients (dropout 0.2: the recompute must repeat the forward's masks) of one batch, with the
    layers checkpointed, their inputs offloaded or not, the layers compiled or eager."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from snaketune.train.offload import offload_layer_inputs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear",
                                             init_lora_weights=False))
    layers = model.base_model.model.model.layers
    if offload:
        assert offload_layer_inputs(model) == len(layers)
    if compiled:
        for layer in layers:
            layer.compile(dynamic=True)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager layers", "compiled layers"])
def test_offloaded_layer_inputs_give_the_gradients_of_plain_checkpointing(tiny_model, compiled):
    import torch

    plain = lora_gradients(tiny_model, offload=False, compiled=compiled)
    offloaded = lora_gradients(tiny_model, offload=True, compiled=compiled)
    assert plain.keys() == offloaded.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert torch.allclose(offloaded[name], grad, atol=1e-6, rtol=1e-5), name
    assert any(grad.abs().sum() > 0 for grad in plain.values())


def test_the_layer_input_is_held_on_the_host_between_forward_and_backward():
    """The box holds a host copy after the forward, and the recompute reads it back: the input's own tensor is
    not kept (its storage can be freed as soon as the caller drops it)."""
    import gc
    import weakref

    import torch

    from snaketune.train.offload import offloaded_checkpoint

    layer = torch.nn.Linear(8, 8)
    hidden = torch.randn(4, 8, requires_grad=True)
    inner = hidden * 2  # what a decoder layer receives: an intermediate the caller lets go of
    kept = weakref.ref(inner)
    output = offloaded_checkpoint(lambda x: torch.tanh(layer(x)), inner, use_reentrant=False)
    del inner
    gc.collect()
    assert kept() is None  # nothing held on to the layer's input
    output.sum().backward()
    expected_input = hidden.detach().clone().requires_grad_()
    torch.tanh(layer(expected_input * 2)).sum().backward()
    assert torch.allclose(hidden.grad, expected_input.grad)
