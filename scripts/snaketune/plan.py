"""Resource plan: the expected peak GPU memory, RAM and disk of each stage of a run, from the model's shape.

Estimates, in GiB, from the parameter count and the run's settings (bytes per parameter as each stage holds it):

- train: base weights (bf16: 2 B/param; QLoRA: NF4 ~0.52 B/param on the decoder layers, embeddings and head in
  bf16, fp32 in an fp16 run; full with DeepSpeed: bf16 weights and grads, fp32 grads, master
  copy and two Adam moments = 20 B/param, the weights divided over the GPUs by ZeRO-3, the rest by ZeRO-1/2/3,
  off the GPU with offload) + trainable LoRA weights at 16 B/param (fp32 weight, grad, two Adam moments) +
  activations of ``per_device_train_batch_size x max_seq_length`` tokens (each layer's saved inputs, all layers'
  or one's with gradient checkpointing) + logits (18 B per token and vocabulary entry: bf16, float32 copy,
  softmax, gradient) + 1.5 GiB of CUDA context, workspace and allocator slack.
- RAM: 2 GiB for the process, plus the shard being read while loading (at most 5 GB), plus ZeRO-offloaded
  optimizer state (12 B/param).
- merge (CPU): one safetensors shard (at most 5 GB) in the output dtype plus its float32 update; disk: the
  merged weights in the merge dtype (a full fine-tune is linked: no disk).
- predict: weights in their dtype + the KV cache of ``generation.batch_size`` rows of ``max_seq_length`` prompt
  + new tokens (an upper bound: real prompts are often shorter), + 10%.
- exam: weights + one layer's activations of ``batch_size`` prompts of ``max_seq_length`` tokens (no KV cache),
  + 10%.
- disk: the download (and its converted copy for remote-code families; counted for the first run of a model),
  checkpoints (adapter + optimizer state,
  ``save_total_limit`` of them) and the final adapter, the merged folder.

The figures are planning numbers for refusing what cannot fit, checked against measured peaks in
benchmarks/results/ (see the README's resource table); allocator fragmentation can add ~10%.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GIB = 2**30
SHAPES = Path(__file__).resolve().parents[2] / "config" / "model_shapes.yaml"
CONVERTED_FAMILIES = {"qwen", "baichuan", "internlm2"}  # remote-code models the download stage converts
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_GIB = 1.5  # CUDA context, cuBLAS workspace and the allocator's slack beyond what torch allocates
INFERENCE_SLACK = 1.1  # predict/exam: buffers beside the weights and the allocator's cache (measured: 14B exam)
PROCESS_GIB = 2.0  # RAM of a stage process before it holds any weights (Python, torch, CUDA libraries)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Shape:
    """What the estimates need from a model's config.json."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False
    dtype_bytes: int = 2  # of the checkpoint as downloaded
    family: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its native (Llama/Qwen2) name."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden

    def lora_params(self, rank: int, target: str | list[str]) -> int:
        names = LINEAR_NAMES if target == "all" else [n for n in LINEAR_NAMES if n in target]
        shapes = self.linear_shapes()
        return self.layers * rank * sum(sum(shapes[name]) for name in names)


def shape_from_config(config: dict[str, Any]) -> Shape:
    """A Shape from a Hugging Face config.json (native, or Qwen-1 / Baichuan2 / InternLM2 remote code; a
    vision-language model's language model, from its ``text_config``: its vision tower is a few percent)."""
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "tie_word_embeddings": config.get(
            "tie_word_embeddings", config["text_config"].get("tie_word_embeddings", False))}
    family = config.get("model_type", "")
    heads = config["num_attention_heads"]
    intermediate = config["intermediate_size"]
    if family == "qwen":  # Qwen-1 counts both halves of its gated MLP
        intermediate //= 2
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return Shape(vocab=config["vocab_size"], hidden=config["hidden_size"], intermediate=intermediate,
                 layers=config["num_hidden_layers"], heads=heads,
                 kv_heads=config.get("num_key_value_heads") or heads,
                 tied=bool(config.get("tie_word_embeddings", family not in {"qwen", "baichuan", "internlm2",
                                                                            "llama", "qwen2"})),
                 dtype_bytes=DTYPE_BYTES.get(dtype, 4), family=family)


def gguf_shape(path: Path, dtype: str) -> Shape:
    """The shape a GGUF file declares in its header (no tensor is read), as the download stage will write it."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.get_field(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture")
    heads = value(f"{arch}.attention.head_count")
    return Shape(vocab=len(reader.get_field("tokenizer.ggml.tokens").data), hidden=value(f"{arch}.embedding_length"),
                 intermediate=value(f"{arch}.feed_forward_length"), layers=value(f"{arch}.block_count"), heads=heads,
                 kv_heads=value(f"{arch}.attention.head_count_kv") or heads,
                 tied="output.weight" not in {tensor.name for tensor in reader.tensors},
                 dtype_bytes=DTYPE_BYTES.get(dtype, 2), family=arch)


def model_shape(entry: dict[str, Any], downloaded: Path | None = None) -> Shape | None:
    """The shape of a model entry of the config: the downloaded folder's config.json, a local folder's, the
    builtin settings, or for a hub id not downloaded yet the copy in config/model_shapes.yaml; None if unknown."""
    for folder in (downloaded, Path(entry["path"]) if entry.get("source") == "local" else None):
        if folder is not None and (folder / "config.json").is_file():
            return shape_from_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    if entry.get("source") == "builtin":
        return Shape(vocab=entry["vocab_size"], hidden=entry["hidden_size"], intermediate=entry["intermediate_size"],
                     layers=entry["num_hidden_layers"], heads=entry["num_attention_heads"],
                     kv_heads=entry["num_key_value_heads"], tied=entry.get("tie_word_embeddings", False),
                     dtype_bytes=4, family="qwen2")
    if entry.get("source") == "gguf" and Path(entry["path"]).is_file():
        return gguf_shape(Path(entry["path"]), entry.get("dtype", "bfloat16"))
    known = yaml.safe_load(SHAPES.read_text(encoding="utf-8"))
    return shape_from_config(known[entry["id"]]) if entry.get("id") in known else None


@dataclass
class StageNeed:
    stage: str
    gpu_gib: float  # per GPU
    ram_gib: float
    disk_gib: float  # written by the stage and kept
    saving: str = ""  # the setting that would spare this stage's disk


def train_gpu_gib(shape: Shape, train, max_seq_length: int) -> float:
    p = shape.params
    processes = train.gpus * train.nodes
    zero = train.deepspeed or ""
    if train.method == "full" and zero:  # DeepSpeed: bf16 weights and grads, fp32 grads, master copy, 2 moments
        weights = 4 * p / (processes if zero.startswith("zero3") else 1)
        states = 0 if zero.endswith("offload") else 16 * p / processes
        trainable = weights + states
    elif train.method == "full":  # one process: bf16 weights, grads and Adam moments (torch keeps their dtype)
        trainable = 8 * p
    else:
        linear = shape.layers * (shape.layer_params - 2 * shape.hidden)
        # QLoRA: NF4 with double-quantized scales; the rest bf16 (fp32 in an fp16 or fp32 run: train/model_setup.py)
        rest = 4 if train.precision in ("fp16", "fp32") else 2
        base = linear * 0.52 + rest * (p - linear) if train.method == "qlora" else 2 * p
        base = base / processes if zero.startswith("zero3") else base
        trainable = base + 16 * shape.lora_params(train.lora_rank, train.lora_target)
    if train.stage == "dpo" and train.method == "full":  # the reference: a frozen bf16 copy (lora: adapter off)
        trainable += 2 * p / (processes if zero.startswith("zero3") else 1)
    pairs = 1 if train.stage == "sft" else 2  # dpo/orpo: a chosen and a rejected sequence per row
    tokens = train.per_device_train_batch_size * max_seq_length * pairs
    per_layer = tokens * (10 * shape.hidden + 4 * shape.intermediate) * 2  # saved inputs of each linear, bf16
    checkpointed = tokens * shape.hidden * 2
    # auto turns checkpointing on where the run would not fit without it: the least the run needs is with it
    activations = per_layer + (shape.layers - 1) * (checkpointed if train.gradient_checkpointing else per_layer)
    logits = tokens * shape.vocab * 18  # bf16 logits, their float32 copy, softmax and gradient
    return 1.05 * (trainable + activations + logits) / GIB + CUDA_CONTEXT_GIB  # 5%: allocator fragmentation


def run_needs(run, shape: Shape, max_seq_length: int, converted: bool, downloads: bool = True) -> list[StageNeed]:
    """Per stage of ``run``: peak GPU memory (per GPU), RAM and disk, in GiB. ``downloads``: false when an earlier
    run already counts the model's download."""
    p, train, generation = shape.params, run.train, run.generation
    merge_bytes = shape.dtype_bytes if run.merge.dtype == "auto" else DTYPE_BYTES[run.merge.dtype]
    download = p * shape.dtype_bytes * (2 if converted else 1) if downloads else 0
    lora = shape.lora_params(train.lora_rank, train.lora_target)
    if train.method == "full":
        checkpoint, final = 14 * p, 2 * p  # bf16 weights + fp32 master weights and two Adam moments
    else:
        checkpoint, final = 12 * lora, 4 * lora
    trains = train.trains
    merges = trains and train.method != "full" and generation.predict_from == "merged"
    # batch_size auto grows only into free memory: the plan counts the 16 rows it needs at least to be useful
    rows = generation.batch_size if isinstance(generation.batch_size, int) else 16
    kv = rows * (max_seq_length + generation.max_new_tokens) * shape.layers * 2 \
        * shape.kv_heads * shape.head_dim * 2
    weights = p * (merge_bytes if merges else shape.dtype_bytes)
    shard = min(5 * 10**9, p * merge_bytes)
    exam_tokens = run.exam.batch_size * max_seq_length
    loading = shard / GIB + PROCESS_GIB  # from_pretrained reads one shard at a time
    offloaded = 12 * p / GIB if train.method == "full" and (train.deepspeed or "").endswith("offload") else 0
    extra_checkpoints = checkpoint * (train.save_total_limit - 1) / GIB
    spare = {
        "download": f"models.{run.model}.convert: false with trust_remote_code: true (-{download / 2 / GIB:.1f} "
                    "GiB)" if converted and downloads else "",
        "train": f"runs.{run.name}.save_total_limit: 1 (-{extra_checkpoints:.1f} GiB)"
                 if trains and train.save_total_limit > 1 else "",
        "merge": f"runs.{run.name}.generation.predict_from: adapter (-{p * merge_bytes / GIB:.1f} GiB)"
                 if merges else "",
    }
    return [
        StageNeed("download", 0.0, PROCESS_GIB, download / GIB, spare["download"]),
        StageNeed("train", train_gpu_gib(shape, train, max_seq_length) if trains else 0.0,
                  loading + offloaded if trains else 0.0,
                  (checkpoint * train.save_total_limit + final) / GIB if trains else 0.0, spare["train"]),
        StageNeed("merge", 0.0, (shard * 3 + 4 * lora) / GIB + PROCESS_GIB if merges else 0.0,
                  p * merge_bytes / GIB if merges else 0.0, spare["merge"]),
        StageNeed("predict", INFERENCE_SLACK * (weights + kv + rows * shape.vocab * 4) / GIB
                  + CUDA_CONTEXT_GIB, loading, 0.0),
        StageNeed("exam", INFERENCE_SLACK * (weights + exam_tokens * (4 * shape.hidden + 3 * shape.intermediate) * 2)
                  / GIB + CUDA_CONTEXT_GIB, loading, 0.0),
    ]


def downloaded_models(cfg) -> dict[str, Path]:
    """The folders of the config's models that are downloaded already (a manifest naming a model folder)."""
    from snaketune.download import model_path
    from snaketune.errors import UserError
    from snaketune.layout import pattern

    found = {}
    for model in cfg.models:
        manifest = Path(pattern("model_manifest").format(model=model))
        try:
            found[model] = model_path(manifest)[0] if manifest.is_file() else None
        except UserError:  # the folder it names is gone: planned as not downloaded
            found[model] = None
    return {model: folder for model, folder in found.items() if folder is not None}


def plan(cfg) -> dict[str, list[StageNeed] | None]:
    """Needs of every run of the config; None where the model's shape is unknown before its download."""
    downloaded = downloaded_models(cfg)
    result, counted = {}, set()
    for name, run in cfg.runs.items():
        entry = cfg.models[run.model]
        shape = model_shape(entry, downloaded.get(run.model))
        converted = shape is not None and shape.family in CONVERTED_FAMILIES and entry.get("convert", True) \
            and entry.get("source") in ("modelscope", "huggingface")
        result[name] = None if shape is None else run_needs(run, shape, cfg.datasets[run.dataset].max_seq_length,
                                                            converted, downloads=run.model not in counted)
        counted.add(run.model)
    return result


HINTS = {
    "train": "set method: qlora, gradient_checkpointing: true or a smaller per_device_train_batch_size",
    "predict": "set a smaller generation.batch_size (each row keeps its prompt and answer in the KV cache)",
    "exam": "set a smaller generation.batch_size (the exam batch)",
}


def problems(needs: dict[str, list[StageNeed] | None], gpu_memory_gib: float | None,
             disk_gib: float | None) -> list[str]:
    """One line per stage that cannot fit the declared GPU memory, and one if the whole plan exceeds the disk."""
    lines, total_disk, savings = [], 0.0, []
    for run, stages in needs.items():
        for need in stages or ():
            total_disk += need.disk_gib
            savings += [need.saving] if need.saving else []
            if gpu_memory_gib and need.gpu_gib > gpu_memory_gib:
                lines.append(f"runs.{run}: {need.stage} needs ~{need.gpu_gib:.1f} GiB of GPU memory, the profile "
                             f"declares gpu_memory_gib: {gpu_memory_gib:g}; {HINTS[need.stage]}")
    if disk_gib and total_disk > disk_gib:
        lines.append(f"the runs write ~{total_disk:.1f} GiB, the profile declares disk_gib: {disk_gib:g}; set "
                     + "; or ".join(savings + ["a larger disk_gib once the disk is grown"]))
    return lines


def totals(stages: list[StageNeed]) -> tuple[float, float, float]:
    """A run's largest GPU and RAM need and the disk it writes in all, in GiB."""
    return (max(s.gpu_gib for s in stages), max(s.ram_gib for s in stages), sum(s.disk_gib for s in stages))


def table(needs: dict[str, list[StageNeed] | None]) -> str:
    """The plan as a text table: run, stage, GPU/RAM/disk GiB, and each run's disk total."""
    rows = ["run\tstage\tgpu_gib\tram_gib\tdisk_gib"]
    for run, stages in needs.items():
        if stages is None:
            rows.append(f"{run}\t(model shape unknown until its download)\t\t\t")
            continue
        rows += [f"{run}\t{s.stage}\t{s.gpu_gib:.1f}\t{s.ram_gib:.1f}\t{s.disk_gib:.1f}" for s in stages]
        rows.append(f"{run}\ttotal\t" + "\t".join(f"{value:.1f}" for value in totals(stages)))
    return "\n".join(rows) + "\n"
