"""Every stage's settings, in one place: typed (``Literal`` where the values are a closed set), with their defaults
and help, and how they become their jobs' params. Imports no stage module, so anything may import it.

The config's JSON schema (config/schema/config.schema.yaml) documents the same keys, types and defaults; the loader
(config.py) takes the defaults from the dataclasses alone, and tests/snaketune/test_settings.py fails when the two
disagree.

Params: a rule passes its stage's settings as a ``params`` value, and Snakemake reruns a job whose params changed.
Were that every field of the settings dataclass, each new setting would change every finished job's params and
rerun the whole DAG after an upgrade, though no output would change. So a setting added after the first release is
declared with ``added(default)``: while a run's value is the one that gives the outputs snaketune gave before the
setting existed, the setting is left out of the params. A run that sets another value, or a later default that
changes what runs compute (``added(new_default, same_output_at=old_value)``), has it in its params and reruns.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from snaketune.errors import UserError

SAME_OUTPUT_AT = "same_output_at"  # field metadata: the value at which the setting changes no output
DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "config" / "deepspeed"


def added(default: Any, *, same_output_at: Any = None, **metadata: Any) -> Any:
    """A dataclass field for a setting added after jobs were already run: left out of its jobs' params while it
    holds ``same_output_at`` (the default itself unless given)."""
    neutral = default if same_output_at is None else same_output_at
    return field(default=default, metadata={SAME_OUTPUT_AT: neutral, **metadata})


def job_params(settings: Any) -> dict[str, Any]:
    """The settings dataclass ``settings`` as a job's params: every field, but an ``added`` one at its
    same-output value. Values are JSON-ready (nested dataclasses are not used in settings)."""
    params = {}
    for spec in fields(settings):
        value = getattr(settings, spec.name)
        if SAME_OUTPUT_AT in spec.metadata and value == spec.metadata[SAME_OUTPUT_AT]:
            continue
        params[spec.name] = value
    return params


def setting(default: Any = MISSING, *, help: str, factory: Any = MISSING, **metadata: Any) -> Any:
    """A dataclass field with its help text (``factory``: a default made fresh for each instance)."""
    return field(default=default, default_factory=factory, metadata={"help": help, **metadata})


def literal_values(annotation: Any) -> tuple | None:
    """The values a ``Literal`` annotation allows (``Literal[...] | None``: None among them), else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [literal_values(part) if part is not type(None) else (None,) for part in get_args(annotation)]
        if all(part is not None for part in parts):
            return tuple(value for part in parts for value in part)
    return None


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``cls``'s field types, evaluated (this module's annotations are strings)."""
    return typing.get_type_hints(cls)


def choice_problems(settings: Any, names: tuple[str, ...]) -> list[str]:
    """One line for each of the fields ``names`` whose value is not one its ``Literal`` type allows (a bool is
    matched by identity, so 1 is not True)."""
    hints, problems = type_hints(type(settings)), []
    for name in names:
        allowed, value = literal_values(hints[name]), getattr(settings, name)
        if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
            problems.append(f"{name} `{value}` is not one of {', '.join(map(str, allowed))}")
    return problems


# -- model (the download stage) ----------------------------------------------------------------------------------
Source = Literal["builtin", "local", "gguf", "modelscope", "huggingface"]
BUILTIN, HUB = ("builtin",), ("modelscope", "huggingface")


def model_key(default: Any = MISSING, *, sources: tuple[str, ...], help: str, required_for: tuple[str, ...] = (),
              factory: Any = MISSING) -> Any:
    """A model setting that applies to ``sources`` only (required for ``required_for``)."""
    return setting(default, help=help, factory=factory, sources=sources, required_for=required_for)


@dataclass
class ModelSettings:
    """A ``models:`` entry: where the weights come from and, per source, how to get them. The loader keeps each
    entry as a dict of the keys its source takes (SOURCE_KEYS), and the download job's params are that dict.
    None: not given (a source in a field's ``required_for`` must give it)."""

    source: Source = setting(help="where the weights come from")
    architecture: Literal["qwen2", "llama", "qwen2_vl", "llava"] = model_key(
        "qwen2", sources=BUILTIN, help="model family to instantiate (qwen2_vl, llava: vision-language, 56x56-pixel "
        "images)")
    seed: int = model_key(0, sources=BUILTIN, help="seed of the random init")
    vocab_size: int = model_key(2048, sources=BUILTIN, help="BPE vocabulary size")
    hidden_size: int = model_key(64, sources=BUILTIN, help="width of the residual stream")
    intermediate_size: int = model_key(128, sources=BUILTIN, help="width of the MLP")
    num_hidden_layers: int = model_key(2, sources=BUILTIN, help="decoder layers")
    num_attention_heads: int = model_key(4, sources=BUILTIN, help="query heads")
    num_key_value_heads: int = model_key(2, sources=BUILTIN, help="key/value heads (grouped-query attention)")
    max_position_embeddings: int = model_key(1024, sources=BUILTIN, help="longest context")
    initializer_range: float = model_key(0.2, sources=BUILTIN, help="std of the random init (0.02 suits 4096-wide "
                                         "models; a 64-wide one needs more to become confident)")
    tokenizer_corpus: list[str] | None = model_key(None, sources=BUILTIN, required_for=BUILTIN, help="text files "
                                                   "the byte-level BPE tokenizer is trained on")
    tie_word_embeddings: bool = model_key(False, sources=BUILTIN, help="share the input embedding with the output "
                                          "head")
    path: str | None = model_key(None, sources=("local", "gguf"), required_for=("local", "gguf"),
                          help="local: a Hugging Face model folder; gguf: a .gguf file")
    copy: bool = model_key(False, sources=("local",), help="copy into results/models/ instead of using in place")
    convert: bool = model_key(True, sources=("local", *HUB), help="convert a remote-code checkpoint (Qwen-1, "
                              "Baichuan2-7B, InternLM2) to the native Qwen2 / Llama architecture")
    dtype: Literal["bfloat16", "float16", "float32"] = model_key(
        "bfloat16", sources=("gguf",), help="dtype of the dequantized safetensors weights")
    id: str | None = model_key(None, sources=HUB, required_for=HUB, help="repository id, e.g. qwen/Qwen-14B-Chat")
    revision: str | None = model_key(None, sources=HUB, help="tag, branch or commit")
    cache_dir: str | None = model_key(None, sources=HUB, help="where weights are stored (default: model_cache_dir)")
    trust_remote_code: bool = setting(False, help="allow Python code shipped with the weights")


SOURCE_KEYS = {source: {f.name for f in fields(ModelSettings) if source in f.metadata.get("sources", ())}
               for source in get_args(Source)}  # keys that only make sense for one source; any other naming them errs
SOURCE_REQUIRED = {source: {f.name for f in fields(ModelSettings) if source in f.metadata.get("required_for", ())}
                   for source in get_args(Source)}


# -- dataset (the dataset and replay stages) ---------------------------------------------------------------------
Format = Literal["alpaca", "sharegpt", "messages", "firefly", "text", "columns", "preference"]
FORMATS = get_args(Format)
RANKING_FORMATS = ("alpaca", "sharegpt", "messages", "preference")  # the layouts that carry chosen/rejected pairs


@dataclass
class ReadSettings:
    """How to read one dataset's files (the ``datasets:`` entry of the config, resolved)."""

    path: str | list[str] = setting(help="data file(s): JSON array, JSONL, CSV, TSV or parquet, read in order")
    format: Format = setting(help="row layout (formats.py lists each one's fields)")
    system: str | None = setting(None, help="system prompt for rows that have none")
    columns: dict[str, str] = setting(factory=dict, help="field renames, ours -> the file's")
    tags: dict[str, str] = setting(factory=dict, help="sharegpt/messages: the keys and role names of turns")
    prompt: str | None = setting(None, help="columns: user turn template over the file's columns")
    response: str | None = setting(None, help="columns: assistant turn template over the file's columns")
    max_bad_rows: int = setting(0, help="bad rows skipped (and counted) before the build stops and lists them")
    deduplicate: bool = setting(True, help="drop exact duplicate rows (counted)")
    ranking: bool = setting(False, help="rows are preference pairs (chosen/rejected); format preference always is")
    encoding: str = setting("utf-8", help="of text files (JSON, CSV, TSV): any Python codec (gb18030 for Excel's "
                            "Chinese CSV), or auto: UTF-8 when the whole file is, else GB18030 when it is")

    def __post_init__(self) -> None:
        if self.format == "preference":
            self.ranking = True
        if self.ranking and self.format not in RANKING_FORMATS:
            raise UserError(f"ranking: true needs format {', '.join(RANKING_FORMATS)}, not `{self.format}`")

    @property
    def paths(self) -> list[Path]:
        return [Path(p) for p in ([self.path] if isinstance(self.path, str) else self.path)]


@dataclass
class DatasetSettings(ReadSettings):
    """How to read a dataset (ReadSettings) and how to build it: template, length, split."""

    template: str = setting("auto", help="chat template: auto (the tokenizer's own) or a name in templates.py")
    max_seq_length: int = setting(512, help="tokens per row; longer rows are truncated")
    eval_size: float = setting(0.1, help="eval rows: a fraction (<1) or a row count (>=1)")
    test_size: float | Literal["all"] = setting(0.1, help="test rows: a fraction (<1) or a row count (>=1); all: "
                                                "every row is a test row (a test set, never trained on)")
    seed: int = setting(0, help="seed of the train/eval/test shuffle (and of a mix's sampling)")
    replay: str | None = setting(None, help="a prompt file the base model answers itself (snaketune.replay); the "
                                 "rows are its answers")
    replay_max_new_tokens: int = setting(256, help="replay: longest answer generated")
    mix: list[tuple[str, float]] | None = setting(None, help="a mixture of other datasets' builds: (name, weight of "
                                                  "its train rows) in the config's order, the first one giving the "
                                                  "test split")
    num_workers: int | None = setting(None, help="processes that tokenize; None: the job's threads. Changes the "
                                      "speed, never the rows: not part of what the build depends on")

    @property
    def mix_names(self) -> list[str]:
        return [name for name, _ in self.mix or []]

    @property
    def source(self) -> str:
        return self.path if isinstance(self.path, str) else ", ".join(self.path)

    @property
    def test_only(self) -> bool:
        return self.test_size == "all"


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ReplaySettings:
    """A replay dataset's answers: the base model's own, to its prompts (made from the dataset's settings)."""

    prompts: str = setting(help='.txt: a prompt a line; .jsonl: {"prompt": ...} a line (an "id" is kept)')
    system: str | None = setting(None, help="the system prompt the answers are generated (and later trained) with")
    template: str = setting("auto", help="chat template: auto (the tokenizer's own) or a name in templates.py")
    max_new_tokens: int = setting(256, help="longest answer; one that does not end by then is left out (counted)")
    batch_size: int | Literal["auto"] = setting("auto", help="prompts answered together; auto: as memory allows")
    dtype: Dtype = setting("auto", help="what the model computes in: auto is float32 on a CPU, bf16 on a GPU")


# -- train -----------------------------------------------------------------------------------------------------
Method = Literal["lora", "qlora", "full", "none"]
Stage = Literal["sft", "dpo", "orpo"]
PrefLoss = Literal["sigmoid", "hinge", "ipo"]  # trl's DPO losses that need no setting beyond beta
AutoBool = Literal["auto", True, False]
SPEED_CHOICES = ("packing", "attention", "fused_loss", "liger_kernels", "torch_compile", "gradient_checkpointing")


@dataclass
class TrainSettings:
    """Hyperparameters, named as in transformers' TrainingArguments, PEFT's LoraConfig and LLaMA-Factory."""

    method: Method = setting("lora", help="lora | qlora (4-bit NF4 base) | full (every parameter) | none (a "
                             "baseline, as max_steps 0)")
    stage: Stage = setting("sft", help="sft: supervised on the answers | dpo | orpo: preference pairs (a dataset "
                           "with ranking)")
    pref_beta: float = setting(0.1, help="dpo: beta of the loss (how far from the reference); orpo: weight of the "
                               "odds ratio")
    pref_loss: PrefLoss = setting("sigmoid", help="dpo: trl's loss_type, sigmoid (DPO), hinge (SLiC) or ipo")
    pref_ftx: float = setting(0.0, help="dpo: weight of a supervised loss on the chosen answers added to DPO's "
                              "(LLaMA-Factory's)")
    learning_rate: float = setting(2e-4, help="peak learning rate")
    num_train_epochs: float = setting(3, help="passes over the train split (when max_steps is -1)")
    max_steps: int = setting(-1, help="-1: run num_train_epochs; 0: no training at all (a baseline run)")
    per_device_train_batch_size: int = setting(4, help="rows per micro-batch in each process")
    gradient_accumulation_steps: int = setting(1, help="micro-batches per optimizer step: effective batch = "
                                               "per_device * accumulation * processes")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = \
        setting("cosine", help="learning-rate schedule after warmup")
    warmup_steps: int = setting(0, help="steps the learning rate rises from 0 to its peak")
    weight_decay: float = setting(0.0, help="AdamW's decoupled weight decay")
    max_grad_norm: float = setting(1.0, help="gradients are clipped to this norm (0: no clipping)")
    logging_steps: int = setting(10, help="steps between train_log.csv rows (the last step is always logged)")
    save_steps: int = setting(500, help="steps between resumable checkpoints")
    save_total_limit: int = setting(2, help="checkpoints kept (the oldest are removed)")
    seed: int = setting(42, help="seed of the init, the data order and dropout")
    lora_rank: int = setting(8, help="r of each LoRA adapter")
    lora_alpha: float = setting(16, help="LoRA scaling numerator (scale = alpha / rank)")
    lora_dropout: float = setting(0.05, help="dropout on the adapters' input")
    lora_target: Literal["all"] | list[str] = setting("all", help='"all": every linear layer but the output head; '
                                                      "or a list of module names")
    loraplus_lr_ratio: float | None = setting(None, help="LoRA+: B matrices learn this many times faster than A")
    modules_to_save: list[str] | None = setting(None, help="trained in full beside the adapter (e.g. "
                                                "embed_tokens, lm_head)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting("auto", help="auto: bf16 on a GPU that has it, "
                                                                 "else fp16 on a GPU, fp32 on the CPU")
    gradient_checkpointing: AutoBool = setting("auto", help="recompute activations: much less memory, 30-40% "
                                               "slower; auto: on a GPU only when the plan says the run would not "
                                               "fit without")
    optim: str = setting("adamw_torch", help="any TrainingArguments optim, e.g. paged_adamw_8bit for QLoRA")
    deepspeed: str | None = setting(None, help="zero1 | zero2 | zero3 | zero3_offload "
                                    "(config/deepspeed/<name>.json)")
    gpus: int = setting(1, help="processes to launch on each node (one per GPU; on a machine without GPUs, CPU "
                        "processes)")
    nodes: int = setting(1, help="machines the job spans (Slurm: one torchrun per node through srun)")
    tensorboard: bool = setting(False, help="also write TensorBoard events to results/runs/{run}/tensorboard")
    # speed: each switchable; auto is the fastest correct choice on the machine the job runs on
    packing: Literal["auto", "tokens", "rows", False] = setting(
        "auto", help="tokens: rows end to end, a step's rows (the padded run's) dealt into its micro-batches by "
        "tokens; rows: each batch's rows end to end; false: padded to the longest (the reference); auto: tokens on "
        "a GPU, false on the CPU")
    attention: Literal["auto", "varlen", "flex_attention", "sdpa", "eager"] = setting(
        "auto", help="varlen: flash attention row by row within a pack (needs packing); auto: varlen for packed "
        "rows on a GPU in bf16/fp16, flex_attention in fp32, else sdpa")
    fused_loss: Literal["auto", "liger", "chunked", "none"] = setting(
        "auto", help="head + cross-entropy without full logits: chunked | liger | none; auto: chunked on a GPU, "
        "none on the CPU")
    liger_kernels: AutoBool = setting("auto", help="Liger's RMSNorm, RoPE and SwiGLU kernels; auto: on where "
                                      "installed")
    torch_compile: AutoBool = setting("auto", help="compile each decoder layer (dynamic shapes); auto: on a GPU "
                                      "for lora without DeepSpeed (1.6x on an H100, benchmarks/README.md)")
    # vision-language models: which parts train (a text-only model has none of the first two)
    train_vision_tower: bool = added(False, help="vision-language: train the vision encoder too (frozen by default)")
    train_projector: bool = added(True, help="vision-language: train the projector from image features to the "
                                  "language model (whole, beside a LoRA adapter)")
    train_language_model: bool = added(True, help="vision-language: false trains the projector alone (the first "
                                       "phase of the LLaVA recipe, on captions)")

    @property
    def trains(self) -> bool:
        """False for a baseline (``max_steps: 0`` or ``method: none``): the workflow gives it no train or merge job."""
        return self.max_steps != 0 and self.method != "none"

    def __post_init__(self) -> None:
        problems = choice_problems(self, (*SPEED_CHOICES, "stage", "pref_loss"))
        if self.pref_ftx and self.stage != "dpo":
            problems.append(f"`pref_ftx` is for stage dpo (orpo has its supervised loss already), not {self.stage}")
        if self.stage != "sft":
            problems += self._pair_stage_problems()
        problems += choice_problems(self, ("method",))
        if self.deepspeed and not (DEEPSPEED_CONFIGS / f"{self.deepspeed}.json").is_file():
            known = sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json"))
            problems.append(f"deepspeed `{self.deepspeed}` is not one of {', '.join(known)}")
        if self.method == "qlora" and self.deepspeed and self.deepspeed.startswith("zero3"):
            problems.append("method `qlora` cannot shard 4-bit weights with ZeRO-3; use zero2, or method `lora`")
        if self.loraplus_lr_ratio and (self.method == "full" or self.deepspeed):
            problems.append("`loraplus_lr_ratio` needs method lora/qlora without deepspeed (it builds its own "
                            "optimizer)")
        if problems:
            raise UserError("; ".join(problems))

    def _pair_stage_problems(self) -> list[str]:
        """What stage dpo/orpo cannot take: trl pads each pair and computes its own loss."""
        problems = []
        for name, plain in (("packing", (False,)), ("attention", ("sdpa", "eager", "flex_attention")),
                            ("fused_loss", ("none",))):
            value = getattr(self, name)
            if value != "auto" and not any(value is p or value == p for p in plain):
                problems.append(f"{name} `{value}` does not apply to stage {self.stage} (trl pads each pair; "
                                "leave it at auto)")
        if self.loraplus_lr_ratio:
            problems.append(f"`loraplus_lr_ratio` is for stage sft; stage {self.stage} uses trl's optimizer")
        return problems


# -- merge, predict, evaluate, exam ------------------------------------------------------------------------------
@dataclass
class MergeSettings:
    """How the adapter is folded into its base."""

    dtype: Dtype = setting("auto", help="dtype of the merged weights; auto: the base model's own (its config's "
                           "torch_dtype)")
    max_shard_size: str = setting("2GB", help="largest safetensors shard written")
    tolerance: float = setting(1e-3, help="max abs logit difference allowed between merged and base+adapter "
                               "(float32)")


@dataclass
class GenerationSettings:
    """How predict (and serve's defaults) generate answers to the test prompts."""

    max_new_tokens: int = setting(64, help="longest answer")
    batch_size: int | Literal["auto"] = setting("auto", help="rows generated together; auto: as many as 70% of "
                                                "the free GPU memory (a quarter of the available RAM on the CPU) "
                                                "holds, up to predict.AUTO_BATCH_LIMIT")
    do_sample: bool = setting(False, help="sample instead of greedy decoding")
    temperature: float = setting(1.0, help="sampling temperature (with do_sample)")
    top_p: float = setting(1.0, help="nucleus sampling's probability mass (with do_sample)")
    seed: int = setting(0, help="sampling seed (the run's seed)")
    predict_from: Literal["merged", "adapter"] = setting("merged", help="merged: the merged folder; adapter: the "
                                                         "base with the adapter on top")
    decoder: Literal["greedy", "generate"] = setting("greedy", help="greedy: our lean greedy loop (same tokens as "
                                                     "generate); generate: transformers' generate, also used "
                                                     "whenever do_sample is set")
    dtype: Dtype = setting("auto", help="what predict and exams compute in: auto is float32 on a CPU, bf16 on a "
                           "GPU")


Metric = Literal["bleu", "rouge", "exact_match", "contains", "label"]
ScoreMode = Literal["default", "llamafactory"]


@dataclass
class EvalSettings:
    """Which metrics score the predictions, and how."""

    metrics: list[Metric] = setting(factory=lambda: ["bleu", "rouge", "exact_match"], help="metrics computed")
    text_tokenizer: Literal["char", "whitespace"] = setting("char", help="how BLEU/ROUGE split text: char (CJK per "
                                                            "character, other words by space), whitespace")
    bleu: ScoreMode = setting("default", help="default: nltk sentence BLEU-4; llamafactory: LLaMA-Factory's")
    rouge: ScoreMode = setting("default", help="default: rouge_score; llamafactory: rouge-chinese over jieba words")
    labels: dict[str, list[str]] = setting(factory=dict, help="label -> texts that mean it (the label itself too)")
    exams: list[str] = setting(factory=list, help="multiple-choice exams (scored by the exam rule)")
    shots: int = setting(0, help="solved dev questions put before each exam question")
    test_sets: list[str] = setting(factory=list, help="datasets whose test split the run is also scored on")


@dataclass
class ExamSettings:
    """How a run takes its multiple-choice exams (made from its evaluation and generation settings)."""

    shots: int = setting(0, help="solved dev questions put before each test question")
    batch_size: int = setting(8, help="prompts scored together")
    dtype: Dtype = setting("auto", help="what the model computes in (the run's generation.dtype): float32 on a CPU, "
                           "bf16 on a GPU")


# -- serve -----------------------------------------------------------------------------------------------------
@dataclass
class ServiceSettings:
    """The HTTP service `snakemake serve` (scripts/serve.py) runs: limits and who may call it."""

    api_key: str | None = setting(None, help="the key clients must send (None: no key needed)")
    max_body_bytes: int = setting(1_000_000, help="larger requests get 413")
    max_tokens_limit: int = setting(2048, help="larger max_tokens get 400")
    default_max_tokens: int = setting(256, help="max_tokens of a request that names none")
    max_context: int | None = setting(None, help="prompt + max_tokens cap; None: the model's context "
                                      "(max_position_embeddings)")
    host: str = setting("127.0.0.1", help="the address the service is bound to: Host headers must name it (or "
                        "allowed_hosts)")
    allowed_hosts: list[str] = setting(factory=list, help="more names clients may reach it by")
    allowed_origins: list[str] = setting(factory=list, help="other web origins whose pages may call it")
    retry_after_seconds: int = setting(1, help="Retry-After of a 429 (queue full)")
