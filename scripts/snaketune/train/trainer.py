"""The Hugging Face Trainer as the train stage runs it: its arguments, a subclass that logs real tokens per second
and deals packed rows by tokens, the callbacks that stop on a NaN loss or a signal, and the one-line advice an
out-of-memory error or a NaN loss turns into."""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from snaketune.errors import UserError
from snaketune.settings import TrainSettings
from snaketune.train.data import step_packs_sampler
from snaketune.train.model_setup import deepspeed_config
from snaketune.train.offload import NON_REENTRANT


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(UserError):
    """Training stopped on a signal after saving a checkpoint; running the job again resumes it."""


def make_callbacks(offload_checkpoints: bool = False, lean_mlps: bool = False):
    """Callbacks: stop on a NaN/inf loss; on SIGTERM (Ctrl-C, Slurm time limit) save a checkpoint and stop; with
    ``offload_checkpoints``, checkpointed layers keep their inputs in host memory (``offload``); with
    ``lean_mlps``, SwiGLU MLPs keep less for their backward (``lean_mlp``)."""
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

    class LeanCheckpointing(TrainerCallback):
        """Once the Trainer has switched checkpointing on (just before on_train_begin) and before the first
        forward: the checkpointed layers keep their inputs in pinned host memory (on a GPU, what checkpointing
        leaves there is one layer's), and the MLPs keep less for the backward that sets the peak."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from snaketune.train.lean_mlp import use_lean_mlps
            from snaketune.train.offload import offload_layer_inputs

            offloaded = offload_layer_inputs(model) if offload_checkpoints else 0
            lean = use_lean_mlps(model) if lean_mlps else 0
            print(f"gradient checkpointing: {offloaded} layers keep their inputs in host memory, {lean} MLPs keep "
                  "gate and up only (lean_mlp)", flush=True)

    on_signal = StopOnSignal()
    return (on_signal, StopOnNonFiniteLoss(), EndOfRun(on_signal),
            *((LeanCheckpointing(),) if offload_checkpoints or lean_mlps else ()))


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

        def _track_num_input_tokens(self, inputs):
            """Padding-free batches hold no padding: one process counts their tokens from the shape. transformers
            counts on the GPU and reads the count back after every micro-batch, which makes the host wait for
            that micro-batch's backward before it may queue the next forward (the GPU idles meanwhile)."""
            ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
            if self.args.include_num_input_tokens_seen == "all" and self.args.world_size == 1 and ids is not None:
                self.state.num_input_tokens_seen += ids.numel()
                return
            super()._track_num_input_tokens(inputs)

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


def training_arguments(settings: TrainSettings, checkpoints: Path, tensorboard: Path | None, precision: str,
                       run_name: str, packing: str | bool = False, config_class=None, **extra: Any):
    """The Trainer's arguments, writing checkpoints to ``checkpoints`` (``config_class``: trl's config of a
    preference stage, with its ``extra`` keys)."""
    import torch
    from transformers import TrainingArguments

    if settings.tensorboard:  # transformers 5 takes the TensorBoard folder from the environment only
        if tensorboard is None:
            raise UserError("tensorboard: true needs a TensorBoard folder (--tensorboard)")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard)
    # transformers 5.2x names it activation_checkpointing and warns on the old name, which older releases use
    names = {f.name for f in fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return (config_class or TrainingArguments)(
        output_dir=str(checkpoints), run_name=run_name, seed=settings.seed, data_seed=settings.seed,
        learning_rate=settings.learning_rate, num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps, per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        lr_scheduler_type=settings.lr_scheduler_type, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm, optim=settings.optim,
        bf16=precision == "bf16", fp16=precision == "fp16",
        **{checkpointing: settings.gradient_checkpointing,
           f"{checkpointing}_kwargs": dict(NON_REENTRANT) if settings.gradient_checkpointing else None},
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
        # batches come in pinned host memory and go to the GPU without making the host wait for the GPU's queue
        **({"dataloader_pin_memory": True, "accelerator_config": {"non_blocking": True}}
           if torch.cuda.is_available() else {}),
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
