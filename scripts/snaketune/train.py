"""Train stage: LoRA, QLoRA or full fine-tuning through the Hugging Face Trainer, resumable, one or N processes.

Read top to bottom: settings -> training arguments (these set up DeepSpeed before the model loads, so ZeRO-3
can shard it while loading) -> checkpoints to resume from -> model -> trainer -> train -> save.

Checkpoints live in a folder of their own (``results/runs/{run}/checkpoints/``), beside the adapter folder and
not in it, because Snakemake deletes a job's declared outputs before starting it again. They carry a fingerprint
of the settings and data, so a rerun after a config change starts over instead of resuming someone else's
optimizer state.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from snaketune import preference
from snaketune.errors import UserError
from snaketune.io import atomic_file, file_problem, save_png, sha256_file, write_json
from snaketune.settings import DEEPSPEED_CONFIGS, TrainSettings
from snaketune.trainer_guard import still_wanted

LOG_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainFiles:
    """What the train stage reads and writes, each path given by the caller (the workflow's layout)."""

    train: Path  # train split (parquet)
    eval: Path  # eval split (parquet)
    stats: Path | None  # the build's stats.json: the chat template the data was rendered with
    adapter: Path  # the adapter (or full weights) folder to write, with the tokenizer
    train_log: Path  # train_log.csv to write: one row per logged step, the last step always among them
    summary: Path  # train_summary.json to write: steps, final loss, tokens/s of the whole run
    curve: Path  # loss.png to write
    checkpoints: Path  # resumable state (kept between attempts, removed after success)
    tensorboard: Path | None = None  # TensorBoard events, when settings.tensorboard


def fix_cuda_arch_list(environ: dict[str, str] = os.environ) -> str | None:
    """Strip arch suffixes (``9.0a`` -> ``9.0``) from TORCH_CUDA_ARCH_LIST, which DeepSpeed cannot parse.

    Containers for Hopper set ``9.0a``; DeepSpeed's op builder then fails at import with ValueError('0a').
    Returns the new value when it changed something.
    """
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    fixed = ";".join(dict.fromkeys(re.sub(r"(\d+\.\d+)[a-z]+", r"\1", a) for a in re.split(r"[;\s]+", value) if a))
    if fixed == value:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = fixed
    return fixed


def prepare_environment(settings: TrainSettings) -> None:
    """Environment fixes that must happen before torch/deepspeed are imported, in every process."""
    # transformers and accelerate import DeepSpeed whenever it is installed, so this matters for LoRA runs too
    if fix_cuda_arch_list():
        print(f"TORCH_CUDA_ARCH_LIST set to {os.environ['TORCH_CUDA_ARCH_LIST']} for DeepSpeed", file=sys.stderr)
    if settings.deepspeed:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU: its cpu accelerator, gloo backend


def die_with_launcher() -> None:
    """Make this worker die when torchrun dies.

    torchrun starts each worker in a session of its own, so killing the launcher (Snakemake cancelling the job,
    an OOM kill) would leave the workers training on as orphans that later write into a rerun's folder.
    """
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before we asked
        os._exit(1)


def start_process_group(settings: TrainSettings) -> None:
    """Join the processes torchrun started, before the model loads.

    ZeRO-3 shards the model while it loads, so DeepSpeed's group must exist before from_pretrained, and the
    checkpoint clean-up needs a barrier. The Trainer's arguments do this on a GPU but not on the CPU.
    """
    import torch

    if "LOCAL_RANK" not in os.environ:  # one process, no launcher
        return
    if settings.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # also adopts a torch group that already exists
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def resolve_precision(precision: str) -> str:
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


def resolve_speedups(settings: TrainSettings, native: bool, precision: str = "bf16") -> Speedups:
    """Make the auto speed settings concrete for this machine and model; refuse what cannot work."""
    import torch

    from snaketune import fused_loss
    from snaketune import packing as packing_module

    gpu = torch.cuda.is_available()
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


def longest_row(parquet: Path) -> int:
    """Tokens in the longest row of a tokenized split, read a row group at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = pq.ParquetFile(parquet)
    longest = 0
    for group in range(source.num_row_groups):
        lengths = pc.list_value_length(source.read_row_group(group, columns=["input_ids"]).column("input_ids"))
        longest = max(longest, pc.max(lengths).as_py() or 0)
    return longest


CHECKPOINTING_HEADROOM = 0.85  # share of the GPU's memory a run without checkpointing may plan to use


def needs_checkpointing(settings: TrainSettings, model_dir: Path, files: TrainFiles) -> bool:
    """gradient_checkpointing made concrete: auto is off on the CPU, and on a GPU off when the plan's estimate of
    this run without checkpointing (the model's shape, the longest row, the batch) fits in 85% of its memory."""
    import torch

    if settings.gradient_checkpointing != "auto":
        return bool(settings.gradient_checkpointing)
    if not torch.cuda.is_available():
        return False
    from snaketune.plan import shape_from_config, train_gpu_gib

    shape = shape_from_config(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))
    planned = train_gpu_gib(shape, replace(settings, gradient_checkpointing=False), longest_row(files.train))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    needed = planned > CHECKPOINTING_HEADROOM * total
    print(f"gradient_checkpointing auto: {'on' if needed else 'off'} (planned {planned:.1f} GiB without it, "
          f"GPU {total:.1f} GiB)", file=sys.stderr)
    return needed


def step_packs_sampler(rows, args):
    """``packing: tokens``: each optimizer step's ``rows`` (TokenRows), as the padded run draws them, dealt into
    its micro-batches (every process's) by tokens.

    transformers' BatchRebalanceSampler keeps a step's rows and shares them out among micro-batches and processes;
    its cost is a padded batch's (rows x the longest, in groups of similar length), and it takes no seed. Packs
    have no padding, so this one deals rows by their tokens (``packing.balance_step``) and shuffles with the run's
    seed: the same order as the padded run's sampler (``torch.randperm`` seeded with seed + epoch).
    """
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    from snaketune.packing import balance_step

    class StepPacks(BatchRebalanceSampler):
        def _assign(self, indices, lengths):
            packs = balance_step(indices, lengths, self.dp_size * self.grad_accum)  # fullest first
            return [[packs[slot * self.dp_size + rank] for slot in range(self.grad_accum)]
                    for rank in range(self.dp_size)]

    processes, accumulation = max(1, args.world_size), args.gradient_accumulation_steps
    return StepPacks(lengths=rows.lengths.tolist(), dp_size=processes, grad_accum=accumulation,
                     effective_batch_size=args.per_device_train_batch_size * accumulation * processes,
                     seed=args.data_seed, rank=args.process_index if processes > 1 else 0,
                     drop_last=args.dataloader_drop_last)


def open_rows(files: TrainFiles, scratch: Path):
    """The train and eval splits, memory-mapped from Arrow copies in ``scratch`` (the run's checkpoint folder:
    kept for a resume, removed with it). Rank 0 writes them while the others wait."""
    import torch

    from snaketune.token_rows import TokenRows

    caches = {"train": scratch / "train.arrow", "eval": scratch / "eval.arrow"}
    if int(os.environ.get("RANK", "0")) == 0:
        scratch.mkdir(parents=True, exist_ok=True)
        for split, parquet in (("train", files.train), ("eval", files.eval)):
            TokenRows(parquet, caches[split])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return TokenRows(files.train, caches["train"]), TokenRows(files.eval, caches["eval"])


def open_pairs(files: TrainFiles, scratch: Path, train: bool):
    """The preference pairs of the train split (when ``train``) and of the eval split, each None when the dataset
    has none; memory-mapped Arrow copies live in ``scratch``. Rank 0 writes them while the others wait."""
    import torch

    def load():
        return [preference.pair_rows(path, scratch / "pairs") if wanted and preference.has_pairs(path) else None
                for path, wanted in ((files.train, train), (files.eval, True))]

    if int(os.environ.get("RANK", "0")) == 0:
        scratch.mkdir(parents=True, exist_ok=True)
        found = load()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return found if int(os.environ.get("RANK", "0")) == 0 else load()


def model_stamp(model_dir: Path) -> list:
    """Names, sizes and modification times of a model folder's files: a starting model built again (another
    run's merged model, retrained) does not resume checkpoints of the old one."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).iterdir() if p.is_file())


WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "latest")  # one of them: the weights (``latest``: a DeepSpeed checkpoint)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when every file the resume reads is there and readable.

    The Trainer writes trainer_state.json last, but a kill during a later copy, a full disk or a bad sync can
    still leave a truncated file behind; each file is checked the way the resume will read it.
    """
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (it was still being written)"
    if not any((checkpoint / name).exists() for name in WEIGHT_FILES):
        return f"no weights ({', '.join(WEIGHT_FILES)})"
    if (checkpoint / "latest").is_file():  # DeepSpeed: `latest` names the folder of the sharded states
        tag = (checkpoint / "latest").read_text().strip()
        if not (checkpoint / tag).is_dir():
            return f"`latest` names {tag}, which is missing"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        problem = file_problem(path)
        if problem:
            return f"{path.relative_to(checkpoint)}: {problem}"
    return None


def complete_checkpoints(folder: Path, warn: bool = False) -> list[Path]:
    """Checkpoints a resume can read, oldest first; with ``warn``, one line for each one skipped."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    usable = []
    for _, checkpoint in sorted(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            usable.append(checkpoint)
        elif warn:
            print(f"warning: skipping checkpoint {checkpoint}: {problem}", file=sys.stderr)
    return usable


def prepare_checkpoints(folder: Path, fingerprint: str) -> Path | None:
    """Return the checkpoint to resume from, or None; checkpoints of other settings or data are discarded, and
    unreadable ones removed (with a warning) so the resume takes the newest readable one."""
    stamp = folder / "fingerprint.txt"
    if folder.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        print(f"checkpoints in {folder} belong to other settings or data: starting over", file=sys.stderr)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    usable = complete_checkpoints(folder, warn=True)
    for checkpoint in folder.iterdir():
        if CHECKPOINT_RE.match(checkpoint.name) and checkpoint.is_dir() and checkpoint not in usable:
            shutil.rmtree(checkpoint)
    return usable[-1] if usable else None


def write_log_csv(history: list[dict[str, Any]], path: Path, columns: list[str] = LOG_COLUMNS) -> list[dict[str, Any]]:
    """train_log.csv: one row per logged step; a column named ``a/b`` in the log is written ``a_b``."""
    rows = [{key.replace("/", "_"): entry.get(key, "") for key in columns} for entry in history if "loss" in entry]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key.replace("/", "_") for key in columns])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot_loss(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    else:
        ax.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    save_png(fig, path)


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(UserError):
    """Training stopped on a signal after saving a checkpoint; running the job again resumes it."""


def make_callbacks():
    """Callbacks: stop on a NaN/inf loss; on SIGTERM (Ctrl-C, Slurm time limit) save a checkpoint and stop."""
    import torch
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self):
            self.requested = False
            self.stopped = False
            for sig in (signal.SIGTERM, signal.SIGUSR1):  # Slurm sends SIGUSR1 with --signal=USR1@<seconds>
                signal.signal(sig, self._request)

        def _request(self, signum, frame):
            self.requested = True

        def on_step_end(self, args, state, control, **kwargs):
            requested = self.requested
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # every process must decide at the same step, or the checkpoint's collectives would hang
                flag = torch.tensor([float(requested)], device="cuda" if torch.cuda.is_available() else "cpu")
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                requested = bool(flag.item())
            if requested:
                control.should_save = True
                control.should_training_stop = True
                self.stopped = True

    class EndOfRun(TrainerCallback):
        """The last step is always logged, so train_log.csv and the leaderboard end where the run ended; and no
        resume checkpoint (optimizer state: several times the model) is written there, since the final weights
        are saved next. Runs after StopOnSignal, whose checkpoint on a signal it keeps."""

        def __init__(self, on_signal):
            self.on_signal = on_signal

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
                control.should_save = self.on_signal.stopped

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss} at step {state.global_step}")

    on_signal = StopOnSignal()
    return on_signal, StopOnNonFiniteLoss(), EndOfRun(on_signal)


def make_trainer_class(base=None):
    """``base`` (transformers' Trainer, or trl's preference trainer) logging real tokens per second."""
    from transformers import Trainer

    class LoggingTrainer(base or Trainer):
        """Adds real (non-padding) tokens per second, over all processes, to every log entry."""

        _last = None
        _flops_per_token = None

        def floating_point_ops(self, inputs) -> int:
            """transformers counts the model's parameters anew at every step (50 ms a step for a 14B model, one
            sixteenth of its step); counted once here."""
            ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
            if ids is None or not ids.numel():
                return super().floating_point_ops(inputs)
            if self._flops_per_token is None:
                self._flops_per_token = super().floating_point_ops(inputs) / ids.numel()
            return int(self._flops_per_token * ids.numel())

        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy == "batch_rebalance":  # packing: tokens
                rows = self.train_dataset if train_dataset is None else train_dataset
                return step_packs_sampler(rows, self.args)
            return super()._get_train_sampler(train_dataset)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            now, seen = time.monotonic(), self.state.num_input_tokens_seen
            if "loss" in logs and self._last is not None and now > self._last[0]:
                logs["tokens_per_second"] = round((seen - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, seen)
            super().log(logs, start_time)

    return LoggingTrainer


def load_model(settings: TrainSettings, model_dir: Path, trust_remote_code: bool, precision: str,
               speedups: Speedups):
    """The base model, quantized for QLoRA, with the speedups applied, wrapped in a PEFT adapter for LoRA/QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from snaketune import fused_loss

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[precision]
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if speedups.attention == "varlen":
        from snaketune.packing import register_varlen_attention

        register_varlen_attention()
    if speedups.attention != "auto":
        kwargs["attn_implementation"] = speedups.attention
    if settings.method == "qlora":
        compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
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
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    refuse_tied_training(model, settings)
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules="all-linear" if settings.lora_target == "all" else list(settings.lora_target),
        modules_to_save=settings.modules_to_save, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    return compile_layers(model) if speedups.torch_compile else model


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


def training_arguments(settings: TrainSettings, files: TrainFiles, precision: str, run_name: str,
                       packing: str | bool = False, config_class=None, **extra: Any):
    """The Trainer's arguments (``config_class``: trl's config of a preference stage, with its ``extra`` keys)."""
    import torch
    from transformers import TrainingArguments

    if settings.tensorboard:  # transformers 5 takes the TensorBoard folder from the environment only
        if files.tensorboard is None:
            raise UserError("tensorboard: true needs a TensorBoard folder (--tensorboard)")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(files.tensorboard)
    # transformers 5.2x names it activation_checkpointing and warns on the old name, which older releases use
    names = {f.name for f in fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return (config_class or TrainingArguments)(
        output_dir=str(files.checkpoints), run_name=run_name, seed=settings.seed, data_seed=settings.seed,
        learning_rate=settings.learning_rate, num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps, per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        lr_scheduler_type=settings.lr_scheduler_type, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm, optim=settings.optim,
        bf16=precision == "bf16", fp16=precision == "fp16",
        **{checkpointing: settings.gradient_checkpointing,
           f"{checkpointing}_kwargs": {"use_reentrant": False} if settings.gradient_checkpointing else None},
        deepspeed=deepspeed_config(settings) if settings.deepspeed else None,
        logging_steps=settings.logging_steps, logging_first_step=True, save_strategy="steps",
        logging_nan_inf_filter=False,  # the default hides a NaN loss behind earlier values; we stop on it
        save_steps=settings.save_steps, save_total_limit=settings.save_total_limit,
        report_to=["tensorboard"] if settings.tensorboard else [],
        use_cpu=not torch.cuda.is_available(),
        # tokens/s counts real tokens: a padding-free batch has no padding, a padded one its attention mask's ones
        include_num_input_tokens_seen="all" if packing else "non_padding",
        # packing tokens: a step's rows dealt into its micro-batches by tokens (the trainer's step_packs_sampler)
        train_sampling_strategy="batch_rebalance" if packing == "tokens" else "random",
        remove_unused_columns=False, dataloader_num_workers=0, per_device_eval_batch_size=8,
        ddp_find_unused_parameters=False if settings.gpus * settings.nodes > 1 else None, **extra,
    )


def fail_with_advice(settings: TrainSettings, exc: BaseException, step: int) -> UserError:
    """Turn an out-of-memory error or a NaN loss into one line that says what to change."""
    if isinstance(exc, NonFiniteLoss):
        return UserError(
            f"{exc}: lower learning_rate (now {settings.learning_rate}), keep max_grad_norm > 0 (now "
            f"{settings.max_grad_norm}), or use precision bf16 instead of fp16"
        )
    return UserError(
        f"out of GPU memory at step {step}: lower per_device_train_batch_size (now "
        f"{settings.per_device_train_batch_size}) and raise gradient_accumulation_steps to keep the effective "
        f"batch, set gradient_checkpointing: true (now {settings.gradient_checkpointing}), cut the dataset's "
        f"max_seq_length, or use method qlora / deepspeed zero3_offload"
    )


def run_summary(trainer, result, log_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, losses and speed of the whole run (not of the last logging window)."""
    seconds = result.metrics.get("train_runtime") or 0.0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
            "final_loss": log_rows[-1]["loss"] if log_rows else None, "tokens_seen": tokens,
            "train_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None}


def finish_process_group() -> None:
    """Leave the process group cleanly: every rank waits for rank 0's writes, then the group is destroyed.

    Exiting with the group alive lets the interpreter tear down gloo/NCCL threads that are still joinable, which
    aborts the process (``terminate called without an active exception``, SIGABRT) after a finished run.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train(settings: TrainSettings, model_dir: Path, trust_remote_code: bool, files: TrainFiles,
          run_name: str = "run") -> dict:
    """Fine-tune and write the adapter, train log, summary and loss curve ``files`` names; return the summary.

    Raises:
        UserError: out of memory or a non-finite loss, with what to change; Interrupted on SIGTERM after a
            checkpoint was saved (run again to resume).
    """
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, set_seed

    from snaketune.packing import flatten_rows

    die_with_launcher()
    prepare_environment(settings)
    set_seed(settings.seed)
    precision = resolve_precision(settings.precision)
    checkpoints = files.checkpoints
    settings = replace(settings, gradient_checkpointing=needs_checkpointing(settings, model_dir, files))
    speedups = resolve_speedups(settings, native_model(model_dir, trust_remote_code), precision)
    pairs_stage = settings.stage != "sft"
    if pairs_stage and not preference.has_pairs(files.train):
        raise UserError(f"stage {settings.stage} trains on preference pairs, and {files.train} has none: give the run "
                        "a dataset with `ranking: true` (or `format: preference`)")
    trl_arguments = {}
    if pairs_stage:
        trl_arguments = {"config_class": preference.config_class(settings.stage), **preference.config_arguments(
            settings.stage, settings.pref_beta, settings.pref_loss, lambda: longest_row(files.train),
            settings.pref_ftx)}
    args = training_arguments(settings, files, precision, run_name, packing=speedups.packing,
                              **trl_arguments)
    start_process_group(settings)
    if "RANK" in os.environ:  # where each process is: global rank, node, local rank
        import socket

        print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: node {os.environ.get('GROUP_RANK', 0)}, "
              f"local rank {os.environ['LOCAL_RANK']}, host {socket.gethostname()}", file=sys.stderr, flush=True)
    resume_from = None
    if settings.max_steps != 0:
        fingerprint = hashlib.sha256(
            json.dumps([asdict(settings), sha256_file(files.train), model_stamp(model_dir)], sort_keys=True).encode()
        ).hexdigest()
        if int(os.environ.get("RANK", "0")) == 0:  # one process cleans up; the others wait, then read
            prepare_checkpoints(checkpoints, fingerprint)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        resume_from = (complete_checkpoints(checkpoints) or [None])[-1]

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if files.stats is not None:  # the template the data was rendered with goes into the saved tokenizer
        template = json.loads(Path(files.stats).read_text(encoding="utf-8")).get("chat_template")
        if template:
            tokenizer.chat_template = template
    model = load_model(settings, model_dir, trust_remote_code, precision, speedups)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_pairs, eval_pairs = open_pairs(files, checkpoints, train=pairs_stage)
    callbacks = make_callbacks()
    on_signal = callbacks[0]
    if eval_pairs is not None and len(eval_pairs):  # the starting policy's preference, measured as training begins
        callbacks = (*callbacks, preference.start_callback(eval_pairs, pad_id, checkpoints))
    if pairs_stage:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train_rows, eval_data = train_pairs, eval_pairs
        trainer = make_trainer_class(preference.trainer_base(settings.stage))(
            model=model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs if len(eval_pairs) else None,
            processing_class=tokenizer, callbacks=list(callbacks))
    else:
        train_rows, eval_data = open_rows(files, checkpoints)
        optimizers = (None, None)
        if settings.loraplus_lr_ratio:
            from peft.optimizers import create_loraplus_optimizer

            optimizers = (create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW,
                                                    lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                                    loraplus_lr_ratio=settings.loraplus_lr_ratio), None)
        trainer = make_trainer_class()(
            model=model, args=args, train_dataset=train_rows, optimizers=optimizers, callbacks=list(callbacks),
            data_collator=flatten_rows if speedups.packing else
            DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        )
    rank0 = trainer.is_world_process_zero()
    batches_per_epoch = (len(step_packs_sampler(train_rows, args)) if speedups.packing == "tokens" else  # else the
                         math.ceil(math.ceil(len(train_rows) / args.world_size)  # sampler shares rows, then batches
                                   / args.per_device_train_batch_size))
    summary: dict[str, Any] = {"settings": asdict(settings), "precision": precision, "processes": args.world_size,
                               "speedups": asdict(speedups), "train_rows": len(train_rows),
                               "train_batches_per_epoch_per_process": batches_per_epoch,
                               "eval_rows": len(eval_data), "global_step": 0}
    if rank0:
        effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * args.world_size
        print(f"speed settings: {speedups}", file=sys.stderr)
        print(f"method {settings.method}, precision {precision}, processes {args.world_size}, effective batch "
              f"{effective} rows, train rows {len(train_rows)}, resume from {resume_from}", file=sys.stderr)

    if settings.max_steps != 0:
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except (NonFiniteLoss, torch.OutOfMemoryError) as exc:
            raise fail_with_advice(settings, exc, trainer.state.global_step) from None
        if on_signal.stopped:
            raise Interrupted(f"stopped by a signal at step {trainer.state.global_step}; the checkpoint is saved "
                              f"in {checkpoints}: run again to resume")
        if len(eval_data):  # trl's trainers evaluate the eval pairs they prepared
            scores = trainer.evaluate() if pairs_stage else trainer.evaluate(eval_dataset=eval_data)
            summary["eval_loss"] = scores["eval_loss"]
            if pairs_stage:
                summary["reward_accuracy"] = scores.get("eval_rewards/accuracies")
                summary["reward_margin"] = scores.get("eval_rewards/margins")
    if eval_pairs is not None and len(eval_pairs):
        end = preference.preference_accuracy(trainer.model, eval_pairs, pad_id)
        start = callbacks[-1].result or end  # no training steps: the start is the end
        summary["preference"] = {"pairs": end["pairs"], "start_accuracy": start["accuracy"],
                                 "start_margin": start["margin"], "accuracy": end["accuracy"], "margin": end["margin"]}
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
        if torch.distributed.is_initialized():  # every GPU's peak: ZeRO's promise is about each of them
            peaks = [torch.zeros_like(peak) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(peaks, peak)
        else:
            peaks = [peak]
        summary["peak_memory_gib_per_process"] = [round(p.item(), 3) for p in peaks]
        summary["peak_memory_gib"] = max(summary["peak_memory_gib_per_process"])

    # Every process takes part in the save (ZeRO-3 gathers the shards); only rank 0 writes files.
    adapter_out = Path(files.adapter)
    staging = adapter_out.with_name(f".{adapter_out.name}.partial")
    if rank0 and staging.exists():
        shutil.rmtree(staging)
    trainer.save_model(str(staging))
    if rank0:
        tokenizer.save_pretrained(staging)
        if not still_wanted():  # Snakemake died during the last steps: no live job asked for these outputs
            raise Interrupted(f"Snakemake is gone: the trained weights stay in {staging}, unused; run again")
        if adapter_out.exists():
            shutil.rmtree(adapter_out)
        os.replace(staging, adapter_out)
        rows = write_log_csv(trainer.state.log_history, files.train_log,
                             LOG_COLUMNS + (preference.LOG_COLUMNS if pairs_stage else []))
        if settings.max_steps != 0:
            summary.update(run_summary(trainer, result, rows))
        write_json(files.summary, summary)
        plot_loss(rows, files.curve, title=run_name)
        shutil.rmtree(checkpoints, ignore_errors=True)
    finish_process_group()
    return summary
