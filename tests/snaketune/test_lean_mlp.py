"""The lean SwiGLU MLP gives autograd's outputs and gradients, keeps less for its backward, and steps aside where
it does not apply."""

import pytest


def tiny_lora_model(tiny_model, dropout=0.0, targets="all-linear", dtype=None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype or torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                            init_lora_weights=False))


def mlp_of(model):
    return model.base_model.model.model.layers[0].mlp


def mlp_gradients(mlp, forward, dtype):
    """Output, input gradient and trainable gradients of one forward and backward of ``mlp`` through
    ``forward`` (fixed input and output gradient; under bf16 autocast for bf16, as the Trainer runs)."""
    import torch

    for parameter in mlp.parameters():
        parameter.grad = None
    generator = torch.Generator().manual_seed(1)
    width = mlp.gate_proj.in_features
    x = torch.randn(2, 37, width, generator=generator).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 37, width, generator=generator).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = forward(x)
    out.backward(grad_out)
    found = {"out": out.detach().float(), "x": x.grad.float()}
    found.update({name: p.grad.float().clone() for name, p in mlp.named_parameters() if p.requires_grad})
    return found


@pytest.mark.parametrize("targets,slice_rows", [("all-linear", None), ("all-linear", 5), (["q_proj", "v_proj"], None),
                                               (["gate_proj"], None)],
                         ids=["LoRA on every layer", "product made again 5 rows at a time", "frozen MLP",
                              "LoRA on gate only"])
def test_the_lean_mlp_gives_the_outputs_and_gradients_of_autograd(tiny_model, targets, slice_rows, monkeypatch):
    import torch

    from snaketune.train import lean_mlp
    from snaketune.train.lean_mlp import lean_forward, mlp_parts

    mlp = mlp_of(tiny_lora_model(tiny_model, targets=targets))
    if slice_rows:
        monkeypatch.setattr(lean_mlp, "PRODUCT_CHUNK_ELEMENTS", slice_rows * mlp.up_proj.out_features)
    mlp.train()
    assert mlp_parts(mlp) is not None
    expected = mlp_gradients(mlp, mlp.forward, torch.float32)
    found = mlp_gradients(mlp, lean_forward(mlp, mlp.forward), torch.float32)
    assert expected.keys() == found.keys()
    assert len(expected) > 2 or targets != "all-linear"
    for name, value in expected.items():
        assert torch.allclose(found[name], value, atol=1e-5, rtol=1e-4), name
        assert value.abs().sum() > 0, name


def test_in_bf16_the_lean_mlp_is_as_close_to_fp32_as_autograd(tiny_model):
    import torch

    from snaketune.train.lean_mlp import lean_forward

    mlp = mlp_of(tiny_lora_model(tiny_model))
    mlp.train()
    reference = mlp_gradients(mlp, mlp.forward, torch.float32)
    mlp.to(torch.bfloat16)
    for parameter in mlp.parameters():  # LoRA's weights stay fp32, as peft keeps them
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    plain = mlp_gradients(mlp, mlp.forward, torch.bfloat16)
    lean = mlp_gradients(mlp, lean_forward(mlp, mlp.forward), torch.bfloat16)

    def error(found, name):
        return ((found[name] - reference[name]).norm() / reference[name].norm()).item()

    for name in reference:
        assert error(lean, name) < 2 * error(plain, name) + 1e-3, name


def test_the_lean_mlp_keeps_gate_and_up_but_not_their_product(tiny_model):
    """What the backward keeps, beyond weights: autograd keeps gate's and up's outputs and their product (three
    tensors as wide as the MLP); the lean function keeps the first two."""
    import torch

    from snaketune.train.lean_mlp import lean_forward

    mlp = mlp_of(tiny_lora_model(tiny_model))
    mlp.train()
    parameters = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    x = torch.randn(1, 64, mlp.gate_proj.in_features, requires_grad=True)

    def wide_tensors_kept(forward):
        kept = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters and tensor.shape[-1] == mlp.up_proj.out_features:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward(x)
        return len(kept)

    assert wide_tensors_kept(mlp.forward) >= 3
    assert wide_tensors_kept(lean_forward(mlp, mlp.forward)) == 2


def test_the_lean_mlp_steps_aside_where_it_does_not_apply(tiny_model):
    """LoRA dropout, evaluation (or no gradients) and an MLP of other layers keep their own forward."""
    import torch

    from snaketune.train.lean_mlp import mlp_parts, use_lean_mlps

    assert mlp_parts(mlp_of(tiny_lora_model(tiny_model, dropout=0.1))) is None
    full = tiny_lora_model(tiny_model).merge_and_unload()
    for parameter in full.parameters():
        parameter.requires_grad_(True)
    assert mlp_parts(full.model.layers[0].mlp) is None  # a full fine-tune trains the weights
    assert mlp_parts(torch.nn.Linear(4, 4)) is None

    model = tiny_lora_model(tiny_model)
    layers = len(model.base_model.model.model.layers)
    assert use_lean_mlps(model) == layers
    assert use_lean_mlps(model) == 0  # once only
    mlp = mlp_of(model)
    x = torch.randn(1, 5, mlp.gate_proj.in_features)
    mlp.eval()
    with torch.no_grad():
        out = mlp(x)
    assert out.grad_fn is None
    mlp.train()
    assert type(mlp(x.requires_grad_()).grad_fn).__name__ == "LeanSwiGLUBackward"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager layers", "compiled layers"])
def test_checkpointed_layers_with_lean_mlps_give_the_gradients_of_plain_checkpointing(tiny_model, compiled):
    """The whole model, as the train stage runs it with checkpointing: layers checkpointed, their inputs
    offloaded, compiled or eager; the lean MLPs change no gradient."""
    import torch

    from snaketune.train.lean_mlp import use_lean_mlps
    from snaketune.train.offload import NON_REENTRANT, offload_layer_inputs

    def gradients(lean):
        model = tiny_lora_model(tiny_model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        model.enable_input_require_grads()
        offload_layer_inputs(model)
        if lean:
            assert use_lean_mlps(model) > 0
        if compiled:
            for layer in model.base_model.model.model.layers:
                layer.compile(dynamic=True)
        model.train()
        ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain, lean = gradients(False), gradients(True)
    assert plain.keys() == lean.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert torch.allclose(lean[name], grad, atol=1e-6, rtol=1e-4), name


def liger_forward(a, b, gate_multiplier=1.0):
    raise AssertionError("not called here")


def liger_backward(a, b, dc, gate_multiplier=1.0):
    raise AssertionError("not called here")


def other_backward(dc, a, b):
    raise AssertionError("not called here")


@pytest.mark.parametrize("backward,usable", [(liger_backward, True), (other_backward, False)],
                         ids=["liger 0.8", "other order"])
def test_liger_is_used_only_with_the_arguments_it_is_called_with(monkeypatch, backward, usable):
    """A liger-kernel whose SwiGLU operations take other arguments is not called (the MLP's tensor operations
    run instead), rather than failing at the first backward on a GPU."""
    import importlib.machinery
    import sys
    import types

    from snaketune.train import lean_mlp

    modules = {}
    for name in ("liger_kernel", "liger_kernel.ops", "liger_kernel.ops.swiglu"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, modules[name])
    modules["liger_kernel.ops.swiglu"].swiglu_forward = liger_forward
    modules["liger_kernel.ops.swiglu"].swiglu_backward = backward
    modules["liger_kernel.ops"].swiglu = modules["liger_kernel.ops.swiglu"]
    lean_mlp._liger.cache_clear()
    try:
        assert lean_mlp._liger() is usable
    finally:
        lean_mlp._liger.cache_clear()


def test_a_deep_copy_of_a_lean_model_computes_with_its_own_weights(tiny_model):
    """A copied model (a reference model, an average of weights) must not run the original's MLPs."""
    import copy

    import torch

    from snaketune.train.lean_mlp import use_lean_mlps

    model = tiny_lora_model(tiny_model)
    use_lean_mlps(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        mlp_of(twin).down_proj.base_layer.weight.zero_()
        mlp_of(twin).down_proj.lora_B["default"].weight.zero_()
    model.train()
    twin.train()
    x = torch.randn(1, 5, mlp_of(model).gate_proj.in_features, requires_grad=True)
    original, copied = mlp_of(model)(x), mlp_of(twin)(x)
    assert type(copied.grad_fn).__name__ == "LeanSwiGLUBackward"
    assert original.abs().sum() > 0
    assert copied.abs().sum() == 0
    assert mlp_of(twin).forward.__self__ is mlp_of(twin)
