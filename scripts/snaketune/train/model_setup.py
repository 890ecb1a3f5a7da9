"""The model as the train stage trains it: precision, the speed settings made concrete for this machine
(``resolve_speedups``), gradient checkpointing's auto, loading (quantized for QLoRA, wrapped in a PEFT adapter for
LoRA), the refusal to train one half of tied embeddings, regional compilation, and the DeepSpeed config."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from snaketune.errors import UserError
from snaketune.settings import DEEPSPEED_CONFIGS, TrainSettings
from snaketune.train import fused_loss
from snaketune.train import packing as packing_module
from snaketune.train.data import longest_row
from snaketune.train.offload import NON_REENTRANT


def resolve_precision(precision: str) -> str:
    """``precision`` made concrete: auto is bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU."""
    import torch

    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class Speedups:
    """What the speed settings resolve to on this machine (auto made concrete), logged in the summary."""

    packing: str | bool  # tokens | rows | False
    attention: str
    fused_loss: str
    liger_kernels: bool
    torch_compile: bool


def native_model(model_dir: Path, trust_remote_code: bool) -> bool:
    """Whether the model runs on transformers' own code (packing and the fused loss rely on it), not a
    repository's remote code."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return not (trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}))


def resolve_speedups(settings: TrainSettings, native: bool, precision: str = "bf16", vision: bool = False) -> Speedups:
    """Make the auto speed settings concrete for this machine and model; refuse what cannot work."""
    import torch

    gpu = torch.cuda.is_available()
    if vision:
        return vision_speedups(settings)
    if not native:
        asked = [f"{name}: {getattr(settings, name)}" for name, plain in
                 (("packing", False), ("attention", "eager"), ("fused_loss", "none")) if
                 getattr(settings, name) not in ("auto", plain)]
        if asked:
            raise UserError(f"{', '.join(asked)} needs a model on transformers' own code; this one runs remote "
                            "code (convert it, or leave these settings at auto)")
        return Speedups(packing=False, attention="auto", fused_loss="none", liger_kernels=False,
                        torch_compile=settings.torch_compile is True)
    if settings.stage != "sft":  # trl pads the pairs and computes its own loss (DPO: its own fused head)
        liger = settings.liger_kernels is True or (settings.liger_kernels == "auto" and
                                                    settings.torch_compile is not True and
                                                    fused_loss.liger_available())
        if liger and settings.torch_compile is True:
            raise UserError("liger_kernels: true and torch_compile: true do not go together; choose one")
        attention = settings.attention if settings.attention != "auto" else "sdpa"
        return Speedups(packing=False, attention=attention, fused_loss="none", liger_kernels=liger,
                        torch_compile=settings.torch_compile is True)
    packing = settings.packing if settings.packing != "auto" else ("tokens" if gpu else False)
    attention = settings.attention
    if attention == "auto":
        attention = "sdpa" if not (gpu and packing) else "flex_attention" if precision == "fp32" or \
            not packing_module.varlen_available() else "varlen"
    if attention == "varlen" and not packing:
        raise UserError("attention: varlen needs padding-free batches: set packing to tokens or rows")
    # auto compiles where it was measured to pay: LoRA and QLoRA (14B: 2,873 against 1,694 tok/s, the eager
    # layers launching 10,000 kernels a step; benchmarks/README.md). DeepSpeed's hooks were not tried, and a full
    # fine-tune without DeepSpeed was not measured.
    compile_layers = settings.torch_compile is True or (
        settings.torch_compile == "auto" and gpu and settings.method in ("lora", "qlora") and not settings.deepspeed)
    # Liger's RMSNorm/RoPE/SwiGLU cannot be traced inside a compiled layer, and compiling fuses the same work
    liger = settings.liger_kernels is True or (
        settings.liger_kernels == "auto" and not compile_layers and fused_loss.liger_available())
    if liger and compile_layers:
        raise UserError("liger_kernels: true and torch_compile: true do not go together (Liger's kernels cannot be "
                        "compiled into a layer); choose one")
    if liger and not fused_loss.liger_available():
        raise UserError("liger_kernels: true needs a CUDA GPU and the liger-kernel package (pip install liger-kernel)")
    loss = fused_loss.resolve(settings.fused_loss)
    if loss == "liger" and not fused_loss.liger_available():
        raise UserError("fused_loss: liger needs a CUDA GPU and the liger-kernel package (pip install liger-kernel)")
    if loss != "none" and settings.modules_to_save:
        if settings.fused_loss != "auto":
            raise UserError(f"fused_loss: {settings.fused_loss} cannot read a head that modules_to_save trains; "
                            "set fused_loss: none")
        loss = "none"
    return Speedups(packing=packing, attention=attention, fused_loss=loss, liger_kernels=liger,
                    torch_compile=compile_layers)


def vision_speedups(settings: TrainSettings) -> Speedups:
    """A vision-language model trains padded batches with its own attention and loss: packing would need the
    image features placed per pack, and the fused loss and compiled layers were written for text models."""
    asked = [f"{name}: {getattr(settings, name)}" for name, plain in (
        ("packing", False), ("fused_loss", "none"), ("liger_kernels", False), ("torch_compile", False))
             if getattr(settings, name) not in ("auto", plain)]
    if asked:
        raise UserError(f"{', '.join(asked)}: not for vision-language models yet (they train padded batches with "
                        "the model's own loss); leave these settings at auto")
    if settings.attention == "varlen":
        raise UserError("attention: varlen needs packing, which vision-language models do not use yet; use sdpa")
    print("speed settings: a vision-language model trains padded batches, without packing, the fused loss, Liger "
          "or compiled layers", file=sys.stderr)
    return Speedups(packing=False, attention="sdpa" if settings.attention == "auto" else settings.attention,
                    fused_loss="none", liger_kernels=False, torch_compile=False)


CHECKPOINTING_HEADROOM = 0.85  # share of the GPU's memory a run without checkpointing may plan to use


def needs_checkpointing(settings: TrainSettings, model_dir: Path, train_split: Path) -> bool:
    """gradient_checkpointing made concrete: auto is off on the CPU, and on a GPU off when the plan's estimate of
    this run without checkpointing (the model's shape, the longest row, the batch) fits in 85% of its memory."""
    import torch

    if settings.gradient_checkpointing != "auto":
        return bool(settings.gradient_checkpointing)
    if not torch.cuda.is_available():
        return False
    from snaketune.plan import shape_from_config, train_gpu_gib

    shape = shape_from_config(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))
    planned = train_gpu_gib(shape, replace(settings, gradient_checkpointing=False), longest_row(train_split))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    needed = planned > CHECKPOINTING_HEADROOM * total
    print(f"gradient_checkpointing auto: {'on' if needed else 'off'} (planned {planned:.1f} GiB without it, "
          f"GPU {total:.1f} GiB)", file=sys.stderr)
    return needed


def load_tokenizer(model_dir: Path, trust_remote_code: bool, stats: Path | None):
    """The model's tokenizer, carrying the chat template the data was rendered with (the build's stats.json), so the
    saved tokenizer renders prompts as training saw them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if stats is not None:
        template = json.loads(Path(stats).read_text(encoding="utf-8")).get("chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def load_model(settings: TrainSettings, model_dir: Path, trust_remote_code: bool, precision: str,
               speedups: Speedups):
    """The base model, quantized for QLoRA, with the speedups applied, wrapped in a PEFT adapter for LoRA/QLoRA. A
    vision-language model trains the parts its settings name (the tower frozen by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    from snaketune.vision import family_of, trainable_parts

    family = family_of(model_dir)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[precision]
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if speedups.attention == "varlen":
        packing_module.register_varlen_attention()
    if speedups.attention != "auto":
        kwargs["attn_implementation"] = speedups.attention
    if settings.method == "qlora":
        compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # a vision-language model's tower and projector stay unquantized, as its output head does
            llm_int8_skip_modules=["lm_head", *(family.tower + family.projector if family else ())],
        )
        kwargs["dtype"] = compute
    model = (AutoModelForImageTextToText if family else AutoModelForCausalLM).from_pretrained(model_dir, **kwargs)
    if settings.method == "qlora":
        keep_4bit_layout(model)
    parts = trainable_parts(model, family, settings.train_vision_tower, settings.train_projector,
                            settings.train_language_model) if family else None
    if speedups.liger_kernels:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        fused_linear_cross_entropy=False, cross_entropy=False)
    if speedups.fused_loss != "none":
        speedups.fused_loss = fused_loss.install(model, speedups.fused_loss)
    if settings.method == "full":
        layers = decoder_layers(model)
        if zero3_whole(settings) and layers is not None:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [type(layers[0])])
        return compile_layers(model) if speedups.torch_compile else model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.method == "qlora" and precision != "bf16":
        # fp16: the frozen embeddings, norms and head go to fp32, as in LoRA's fp16 runs. In bf16 they stay bf16:
        # peft's fp32 copies cost 3 GiB for a 14B model, and the fp32 residual stream they make was cast back to
        # bf16 at every linear layer, forward and backward (a sixth of a step's GPU time, benchmarks/README.md)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=dict(NON_REENTRANT))
    refuse_tied_training(model, settings)
    targets = "all-linear" if settings.lora_target == "all" else list(settings.lora_target)
    if parts is not None:
        if not parts["lora"]:
            raise UserError("train_language_model: false (and the tower frozen) leaves LoRA nothing to adapt: train "
                            "the projector alone with method: full")
        targets = parts["lora"] if settings.lora_target == "all" else targets
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets, task_type="CAUSAL_LM",
        modules_to_save=[*(settings.modules_to_save or []), *(parts["whole"] if parts else [])] or None,
    )
    model = get_peft_model(model, lora)
    return compile_layers(model) if speedups.torch_compile else model


def keep_4bit_layout(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight in place for its CPU kernel at the
    first forward without gradients (an evaluation during training): that fails on a layer narrower than one
    quantization block ("shape '[32, 0]' is invalid", the tiny models) and leaves the weight in a layout the
    training forward does not use. A QLoRA run keeps the layout it trains with, on every CPU alike."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def refuse_tied_training(model, settings: TrainSettings) -> None:
    """An adapter may not train the input embedding or output head of a model that ties them: one copy would
    train and the other not, and the merged folder (which stores the tied weight once) could not hold both."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    tied = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
    named = set(settings.modules_to_save or []) | (set() if settings.lora_target == "all"
                                                   else set(settings.lora_target))
    if named & tied:
        raise UserError(f"modules_to_save/lora_target name {', '.join(sorted(named & tied))}, which this model ties "
                        "(tie_word_embeddings: true: the input embedding is the output head); training one would "
                        "untie them. Leave them out (LoRA on every other linear layer learns new answers), or use "
                        "method: full")


def compile_layers(model):
    """Compile each decoder layer in place (regional compilation: one graph for all layers, shapes dynamic so
    packs of any length reuse it); the rest of the model stays eager."""
    layers = decoder_layers(model)
    if layers is None:
        raise UserError("torch_compile: true found no decoder layers to compile in this model")
    for layer in layers:
        layer.compile(dynamic=True)
    return model


def decoder_layers(model):
    """The model's list of decoder layers, or None."""
    import torch

    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) and
                 type(m[0]).__name__.endswith("DecoderLayer")), None)


KEEP_WHOLE_IN_ONE_PROCESS = True  # ZeRO-3 in a single process: parameters stay whole (see deepspeed_config)


def zero3_whole(settings: TrainSettings) -> bool:
    """ZeRO-3 in a single process with its parameters on the GPU: they stay whole (``deepspeed_config``), and each
    decoder layer is one ZeRO-3 leaf module (``load_model``): hooks per layer instead of per linear layer."""
    one_process = settings.gpus * settings.nodes == 1
    if not (KEEP_WHOLE_IN_ONE_PROCESS and one_process and (settings.deepspeed or "").startswith("zero3")):
        return False
    config = json.loads((DEEPSPEED_CONFIGS / f"{settings.deepspeed}.json").read_text(encoding="utf-8"))
    return "offload_param" not in config["zero_optimization"]


def deepspeed_config(settings: TrainSettings) -> str | dict:
    """The DeepSpeed config ``settings.deepspeed`` names, adjusted for ZeRO-3 where the file cannot know the run:

    - in a single process, without offloaded parameters (``zero3_whole``), every parameter persists: one process
      has nothing to shard them with, and gathering and releasing each layer's weights around every use, flushing
      gradients a parameter at a time and DeepSpeed's own linear function only cost time;
    - for stage dpo, parameter prefetching is off. trl's DPO gathers the output head itself for its fused
      log-probabilities, and with two or more processes a head that the prefetcher has in flight cannot be released
      after it (DeepSpeed: "Cannot partition a param in flight"; tests/snaketune/test_preference.py runs it).
    """
    path = DEEPSPEED_CONFIGS / f"{settings.deepspeed}.json"
    if not settings.deepspeed.startswith("zero3"):
        return str(path)
    config = json.loads(path.read_text(encoding="utf-8"))
    zero = config["zero_optimization"]
    if zero3_whole(settings):
        zero.update(stage3_param_persistence_threshold=2**62,  # no layer's weights are gathered or released
                    reduce_bucket_size=500_000_000,  # "auto" (hidden x hidden) flushed gradients once per parameter
                    memory_efficient_linear=False)  # only spares a gathered weight that is never released here
    if settings.stage == "dpo":
        zero["stage3_prefetch_bucket_size"] = 0
    return config
