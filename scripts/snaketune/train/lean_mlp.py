"""A SwiGLU MLP with frozen weights (LoRA on them or not) as one autograd function that keeps less for backward.

``down(silu(gate(x)) * up(x))`` through autograd keeps gate's and up's outputs and their product for the backward
pass, and the backward makes three more tensors of that size (the gradients of the product, of gate's output and
of up's). At the 1.5B shape's 8,960 columns that is 70 MiB each per 4k tokens, the largest tensors of a layer.
With gradient checkpointing only one layer's are alive at a time, but they set the backward's peak: measured on a
CPU (``benchmarks/layer_memory.py``: one decoder layer, 4k tokens, LoRA r16 on every linear layer, compiled as the
stage compiles it), a layer's forward and backward peak at 580 MiB; with this function in place of the MLP, at
332 MiB.

Here the function keeps only the input and gate's and up's outputs (and LoRA's rank-wide products). The backward
computes the product again, a slice of rows at a time, where down's LoRA needs it, and turns gate's and up's
outputs into their own gradients in place: with Liger's SwiGLU kernel on a GPU where liger-kernel is installed (one
pass, fp32 inside), else with in-place tensor operations on a slice of rows at a time. This is what Unsloth's LoRA
MLP does with its own kernels.

It applies to an MLP whose ``gate_proj``, ``up_proj`` and ``down_proj`` are frozen ``nn.Linear`` layers without
bias, each either alone or under one active peft LoRA adapter without dropout or DoRA, and whose activation is
SiLU; anything else keeps its own forward. Weights stay as they are (no copy); LoRA's fp32 weights are cast to the
input's dtype for each product, as autocast does.
"""

from __future__ import annotations

import functools


def linear_parts(linear):
    """(frozen weight, LoRA A, LoRA B, scale) of a frozen Linear or a peft LoRA Linear over one; None where the
    layer is anything else (bias, dropout, DoRA, several adapters, merged, trainable weight)."""
    import torch

    base = getattr(linear, "base_layer", linear)
    if type(base) is not torch.nn.Linear or base.bias is not None or base.weight.requires_grad:
        return None
    if base is linear:
        return base.weight, None, None, 0.0
    adapters = list(getattr(linear, "active_adapters", None) or [])
    if len(adapters) != 1 or getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return None
    name = adapters[0]
    if name not in linear.lora_A or dict(getattr(linear, "use_dora", {})).get(name, False):
        return None
    if not isinstance(linear.lora_dropout[name], torch.nn.Identity):
        return None
    return base.weight, linear.lora_A[name].weight, linear.lora_B[name].weight, float(linear.scaling[name])


def mlp_parts(mlp):
    """The three projections' parts of a SwiGLU MLP this function can run, else None."""
    import torch

    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return None
    from transformers import activations

    silu = (torch.nn.SiLU, *((activations.SiLUActivation,) if hasattr(activations, "SiLUActivation") else ()))
    if type(getattr(mlp, "act_fn", None)) not in silu:
        return None
    parts = [linear_parts(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
    return None if any(part is None for part in parts) else parts


def project(z, weight, a, b, scale):
    """z W^T (+ scale z A^T B^T); also z A^T, which B's gradient needs."""
    out = z @ weight.t()
    if a is None:
        return out, None
    za = z @ a.t().to(z.dtype)
    out.addmm_(za, b.t().to(z.dtype), alpha=scale)
    return out, za


def project_back(d, z, za, weight, a, b, scale, dz=None):
    """The gradient of ``project`` for the output gradient ``d``: added into ``dz`` (made when None) for the
    input, and LoRA A's and B's in their own dtype."""
    if dz is None:
        dz = d @ weight
    else:
        dz.addmm_(d, weight)
    if a is None:
        return dz, None, None
    db = (d.t() @ za).mul_(scale).to(b.dtype)
    d_times_b = d @ b.to(d.dtype)
    dz.addmm_(d_times_b, a.to(d.dtype), alpha=scale)
    da = (d_times_b.t() @ z).mul_(scale).to(a.dtype)
    return dz, da, db


def silu_times(gate, up):
    """silu(gate) * up, a new tensor."""
    import torch.nn.functional as F

    if gate.is_cuda and _liger():
        from liger_kernel.ops.swiglu import swiglu_forward

        return swiglu_forward(gate, up)[2]
    return F.silu(gate).mul_(up)


PRODUCT_CHUNK_ELEMENTS = 2**23  # 16 MiB of bf16: temporaries as wide as the MLP are made a slice of rows at a time


def product_times(left, gate, up):
    """``left @ (silu(gate) * up)`` in fp32, the product made again a slice of rows at a time (``left`` is
    rank x rows): down's LoRA A needs it, and a whole copy would be the backward's largest tensor but two."""
    import torch

    rows = max(1, PRODUCT_CHUNK_ELEMENTS // gate.shape[1])
    total = torch.zeros(left.shape[0], gate.shape[1], dtype=torch.float32, device=gate.device)
    for start in range(0, gate.shape[0], rows):
        part = slice(start, start + rows)
        total += left[:, part] @ silu_times(gate[part], up[part])
    return total


def silu_times_backward(gate, up, grad):
    """The gradients of silu(gate) * up for its output gradient ``grad``, as (gate's, up's): written over
    ``gate``, ``up`` and ``grad``, which the caller no longer needs."""
    import torch

    if gate.is_cuda and _liger():
        from liger_kernel.ops.swiglu import swiglu_backward

        swiglu_backward(gate, up, grad)  # gate's gradient into gate, up's into up
        return gate, up
    rows = max(1, PRODUCT_CHUNK_ELEMENTS // gate.shape[1])
    for start in range(0, gate.shape[0], rows):  # a slice of rows at a time: the sigmoid's copy stays small
        g, u, d = gate[start : start + rows], up[start : start + rows], grad[start : start + rows]
        sig = torch.sigmoid(g)
        u.mul_(d)  # grad up
        d.mul_(g).mul_(sig)  # grad silu(gate): up's gradient
        u.mul_(sig)  # grad up sig
        g.mul_(sig.neg_().add_(1)).add_(1)  # 1 + gate (1 - sig)
        u.mul_(g)  # grad up sig (1 + gate (1 - sig)): gate's gradient
    return up, grad


@functools.cache
def lean_swiglu():
    """The autograd function of ``down(silu(gate(x)) * up(x))`` (made on first use: torch is imported late)."""
    import torch

    class LeanSwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b, scales):
            flat = x.reshape(-1, x.shape[-1])
            gate, gate_za = project(flat, gate_w, gate_a, gate_b, scales[0])
            up, up_za = project(flat, up_w, up_a, up_b, scales[1])
            product = silu_times(gate, up)
            out, down_za = project(product, down_w, down_a, down_b, scales[2])
            del product
            ctx.save_for_backward(flat, gate, up, gate_za, up_za, down_za, gate_w, gate_a, gate_b, up_w, up_a,
                                  up_b, down_w, down_a, down_b)
            ctx.scales, ctx.shape = scales, x.shape
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad_out):
            (flat, gate, up, gate_za, up_za, down_za, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a,
             down_b) = ctx.saved_tensors
            gate_scale, up_scale, down_scale = ctx.scales
            grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_product = grad @ down_w
            down_da = down_db = None
            if down_a is not None:  # down's LoRA: its A needs the product again
                down_db = (grad.t() @ down_za).mul_(down_scale).to(down_b.dtype)
                grad_b = grad @ down_b.to(grad.dtype)
                grad_product.addmm_(grad_b, down_a.to(grad.dtype), alpha=down_scale)
                down_da = product_times(grad_b.t(), gate, up).mul_(down_scale).to(down_a.dtype)
            grad_gate, grad_up = silu_times_backward(gate, up, grad_product)
            grad_x, gate_da, gate_db = project_back(grad_gate, flat, gate_za, gate_w, gate_a, gate_b, gate_scale)
            grad_x, up_da, up_db = project_back(grad_up, flat, up_za, up_w, up_a, up_b, up_scale, grad_x)
            return (grad_x.view(ctx.shape), None, gate_da, gate_db, None, up_da, up_db, None, down_da, down_db,
                    None)

    return LeanSwiGLU


def lean_forward(mlp, original):
    """The MLP's forward through the lean function while training with gradients, else ``original`` (its own).
    A method bound to ``mlp``, with ``original`` kept on it: a deep copy of the model rebinds both to the copy,
    which then computes with its own weights."""
    import types

    mlp._forward_before_lean = original
    return types.MethodType(_lean_method(), mlp)


@functools.cache
def _lean_method():
    import torch

    @torch.compiler.disable  # a compiled layer runs it as it is (its in-place backward is not traceable)
    def forward(mlp, x, *args, **kwargs):
        parts = mlp_parts(mlp) if mlp.training and torch.is_grad_enabled() and not args and not kwargs else None
        if parts is None or x.dtype != parts[0][0].dtype:
            return mlp._forward_before_lean(x, *args, **kwargs)
        (gate_w, gate_a, gate_b, gate_s), (up_w, up_a, up_b, up_s), (down_w, down_a, down_b, down_s) = parts
        return lean_swiglu().apply(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b,
                                 (gate_s, up_s, down_s))

    return forward


def use_lean_mlps(model) -> int:
    """Give every SwiGLU MLP of ``model`` that the function can run the lean forward; returns how many."""
    changed = 0
    for module in model.modules():
        if mlp_parts(module) is not None and not getattr(module, "_lean_forward", False):
            module.forward = lean_forward(module, module.forward)
            module._lean_forward = True
            changed += 1
    return changed


@functools.cache
def _liger() -> bool:
    """Whether Liger's SwiGLU operations are there with the arguments used here (``(a, b[, ...])`` forward,
    ``(a, b, dc[, ...])`` backward, as in liger-kernel 0.8)."""
    import importlib.util
    import inspect

    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        from liger_kernel.ops import swiglu
    except ImportError:
        return False
    expected = {"swiglu_forward": ["a", "b"], "swiglu_backward": ["a", "b", "dc"]}
    return all(callable(getattr(swiglu, name, None)) and
               list(inspect.signature(getattr(swiglu, name)).parameters)[: len(names)] == names
               for name, names in expected.items())
