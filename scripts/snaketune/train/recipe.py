"""Train stage recipe: LoRA, QLoRA or full fine-tuning (SFT, or DPO/ORPO through trl), resumable, one or N processes.

Read top to bottom, in torchtune's shape, ``setup -> fit -> save -> cleanup``:

- setup: the settings made concrete for this machine (precision, gradient checkpointing, speedups); the Trainer's
  arguments (these set up DeepSpeed before the model loads, so ZeRO-3 can shard it while loading); the process
  group; the checkpoint to resume from; tokenizer, model, data and the trainer.
- fit: train (resuming), evaluate on the eval split, measure the preference accuracy and the peak memory.
- save: every process takes part (ZeRO-3 gathers the shards); rank 0 alone writes the adapter (or full weights)
  with the tokenizer, train_log.csv, train_summary.json and the loss curve, then removes the checkpoints.
- cleanup: leave the process group.

Beside it: ``checkpoints`` (which checkpoints a resume can read, and whose they are), ``model_setup`` (loading,
speedups, DeepSpeed config), ``data`` (the splits, memory-mapped), ``trainer`` (the Trainer's arguments, subclass and
callbacks), ``logs`` (what the run leaves to read), ``distributed`` (launch, process group, GPUs), ``guard`` (one
trainer per run folder, none without its Snakemake), and the fast path's ``packing``, ``token_rows`` and
``fused_loss``; ``preference`` holds DPO and ORPO.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from snaketune.errors import UserError
from snaketune.io import write_json
from snaketune.settings import TrainSettings
from snaketune.train import checkpoints, distributed, model_setup, preference
from snaketune.train.data import longest_row, open_pairs, open_rows, step_packs_sampler
from snaketune.train.guard import still_wanted
from snaketune.train.logs import LOG_COLUMNS, peak_memory, plot_loss, run_summary, write_log_csv
from snaketune.train.trainer import (
    Interrupted,
    NonFiniteLoss,
    fail_with_advice,
    make_callbacks,
    make_trainer_class,
    training_arguments,
)
from snaketune.vision import ImageInputs, copy_processor_files, family_of


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


def train(settings: TrainSettings, model_dir: Path, trust_remote_code: bool, files: TrainFiles,
          run_name: str = "run") -> dict:
    """Fine-tune and write the adapter, train log, summary and loss curve ``files`` names; return the summary.

    Raises:
        UserError: out of memory or a non-finite loss, with what to change; Interrupted on SIGTERM after a
            checkpoint was saved (run again to resume).
    """
    recipe = Recipe(settings, model_dir, trust_remote_code, files, run_name)
    recipe.setup()
    recipe.fit()
    recipe.save()
    recipe.cleanup()
    return recipe.summary


class Recipe:
    """One training run of ``settings`` on ``model_dir``: call ``setup``, ``fit``, ``save`` and ``cleanup`` in order.

    Features: LoRA, QLoRA (4-bit NF4 base), full fine-tuning, DeepSpeed ZeRO 1-3 (with offload); SFT on packed,
    padding-free rows (``packing``) with varlen attention and a fused head + cross-entropy, or DPO/ORPO on pairs
    through trl; resume from the newest readable checkpoint of the same settings, data and model; a checkpoint and
    a clean stop on SIGTERM/SIGUSR1. The effective batch is per_device_train_batch_size x
    gradient_accumulation_steps x processes.

    Raises:
        UserError: (setup) a preference stage on a dataset without pairs, speed settings this model or machine
            cannot run; (fit) out of memory or a non-finite loss, with what to change; Interrupted when stopped by
            a signal (fit) or when Snakemake is gone (save).
    """

    def __init__(self, settings: TrainSettings, model_dir: Path, trust_remote_code: bool, files: TrainFiles,
                 run_name: str = "run"):
        self.settings, self.model_dir, self.trust_remote_code = settings, model_dir, trust_remote_code
        self.files, self.run_name = files, run_name
        self.pairs_stage = settings.stage != "sft"  # dpo/orpo: trl's trainers on preference pairs
        self.summary: dict[str, Any] = {}
        self.result = None  # what Trainer.train returned

    # -- setup: everything before the first step, in the order it must happen ---------------------------------
    def setup(self) -> None:
        from transformers import set_seed

        distributed.die_with_launcher()
        distributed.prepare_environment(self.settings)
        set_seed(self.settings.seed)
        self._resolve_settings()
        self.args = self._training_arguments()
        distributed.start_process_group(self.settings)  # before the model loads: ZeRO-3 shards it while loading
        distributed.report_rank()
        self.resume_from = self._resume_point()
        self.tokenizer = model_setup.load_tokenizer(self.model_dir, self.trust_remote_code, self.files.stats)
        self.image_inputs = ImageInputs.of(self.model_dir, self.tokenizer)  # None: a text-only model
        self.model = model_setup.load_model(self.settings, self.model_dir, self.trust_remote_code, self.precision,
                                            self.speedups)
        self.trainer = self._make_trainer()
        self.rank0 = self.trainer.is_world_process_zero()
        self.summary = self._start_summary()

    def _resolve_settings(self) -> None:
        """Precision, gradient checkpointing and the speed settings, made concrete for this machine and model."""
        settings, files = self.settings, self.files
        self.precision = model_setup.resolve_precision(settings.precision)
        self.settings = replace(settings, gradient_checkpointing=model_setup.needs_checkpointing(
            settings, self.model_dir, files.train))
        native = model_setup.native_model(self.model_dir, self.trust_remote_code)
        self.speedups = model_setup.resolve_speedups(self.settings, native, self.precision,
                                                     vision=family_of(self.model_dir) is not None)
        if self.pairs_stage and not preference.has_pairs(files.train):
            raise UserError(f"stage {settings.stage} trains on preference pairs, and {files.train} has none: give "
                            "the run a dataset with `ranking: true` (or `format: preference`)")

    def _training_arguments(self):
        settings, files = self.settings, self.files
        trl_arguments = {}
        if self.pairs_stage:
            trl_arguments = {"config_class": preference.config_class(settings.stage), **preference.config_arguments(
                settings.stage, settings.pref_beta, settings.pref_loss, lambda: longest_row(files.train),
                settings.pref_ftx)}
        return training_arguments(settings, files.checkpoints, files.tensorboard, self.precision, self.run_name,
                                  packing=self.speedups.packing, **trl_arguments)

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from (of these settings, data and model), or None; a baseline has none."""
        if self.settings.max_steps == 0:
            return None
        stamp = checkpoints.fingerprint(self.settings, self.files.train, self.model_dir)
        return checkpoints.resume_point(self.files.checkpoints, stamp)

    def _make_trainer(self):
        """The data and the trainer: trl's for preference pairs, the Trainer for SFT; with the callbacks that stop
        on a signal or a NaN loss, and one that measures the starting policy's preference accuracy."""
        tokenizer, files = self.tokenizer, self.files
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_pairs, self.eval_pairs = open_pairs(files.train, files.eval, files.checkpoints, self.pairs_stage)
        import torch

        # checkpointing is on where memory is short: on a GPU, checkpointed layers keep their inputs in host
        # memory; SwiGLU MLPs over frozen weights keep less for their backward (not under DeepSpeed: ZeRO-3 gathers
        # weights in hooks around each module's forward and backward, which the function's saved weights bypass)
        checkpointing = bool(self.settings.gradient_checkpointing)
        callbacks = make_callbacks(offload_checkpoints=checkpointing and torch.cuda.is_available(),
                                   lean_mlps=checkpointing and not self.settings.deepspeed)
        self.on_signal, self.start_callback = callbacks[0], None
        if self.eval_pairs is not None and len(self.eval_pairs):  # the starting policy, measured as training begins
            self.start_callback = preference.start_callback(self.eval_pairs, self.pad_id, files.checkpoints)
            callbacks = (*callbacks, self.start_callback)
        if self.pairs_stage:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self.train_rows, self.eval_data = train_pairs, self.eval_pairs
            return make_trainer_class(preference.trainer_base(self.settings.stage))(
                model=self.model, args=self.args, train_dataset=train_pairs,
                eval_dataset=self.eval_pairs if len(self.eval_pairs) else None, processing_class=tokenizer,
                callbacks=list(callbacks))
        self.train_rows, self.eval_data = open_rows(files.train, files.eval, files.checkpoints)
        return make_trainer_class()(model=self.model, args=self.args, train_dataset=self.train_rows,
                                    optimizers=self._optimizers(), callbacks=list(callbacks),
                                    data_collator=self._collator())

    def _optimizers(self) -> tuple:
        """The Trainer's own optimizer, or LoRA+'s (B matrices learning ``loraplus_lr_ratio`` times faster)."""
        settings = self.settings
        if not settings.loraplus_lr_ratio:
            return None, None
        import torch
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model=self.model, optimizer_cls=torch.optim.AdamW, lr=settings.learning_rate,
                                         weight_decay=settings.weight_decay,
                                         loraplus_lr_ratio=settings.loraplus_lr_ratio), None

    def _collator(self):
        """Packed rows laid end to end (padding-free), or rows padded to the longest of their batch (with their
        images' pixels, for a vision-language model)."""
        if self.speedups.packing:
            from snaketune.train.packing import flatten_rows

            return functools.partial(flatten_rows, count_targets=self.speedups.fused_loss != "none")
        from transformers import DataCollatorForSeq2Seq

        padded = DataCollatorForSeq2Seq(self.tokenizer, padding=True, label_pad_token_id=-100)
        if self.image_inputs is None:
            return padded
        from snaketune.vision import ImageCollator, takes_token_types

        return ImageCollator(self.image_inputs, padded, takes_token_types(self.model))

    def _start_summary(self) -> dict[str, Any]:
        """train_summary.json's opening part (what the run is), printed with the derived numbers by rank 0."""
        settings, args, rows = self.settings, self.args, self.train_rows
        batches_per_epoch = (len(step_packs_sampler(rows, args)) if self.speedups.packing == "tokens" else  # else
                             math.ceil(math.ceil(len(rows) / args.world_size)  # the sampler shares rows, then batches
                                       / args.per_device_train_batch_size))
        summary: dict[str, Any] = {"settings": asdict(settings), "precision": self.precision,
                                   "processes": args.world_size, "speedups": asdict(self.speedups),
                                   "train_rows": len(rows), "train_batches_per_epoch_per_process": batches_per_epoch,
                                   "eval_rows": len(self.eval_data), "global_step": 0}
        if self.rank0:
            effective = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * args.world_size
            print(f"speed settings: {self.speedups}", file=sys.stderr)
            print(f"method {settings.method}, precision {self.precision}, processes {args.world_size}, effective "
                  f"batch {effective} rows, train rows {len(rows)}, resume from {self.resume_from}", file=sys.stderr)
        return summary

    # -- fit ------------------------------------------------------------------------------------------------------
    def fit(self) -> None:
        if self.settings.max_steps != 0:
            self._train()
            self._evaluate()
        if self.eval_pairs is not None and len(self.eval_pairs):
            self._measure_preference()
        self.summary.update(peak_memory())

    def _train(self) -> None:
        import torch

        trainer = self.trainer
        try:
            self.result = trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        except (NonFiniteLoss, torch.OutOfMemoryError) as exc:
            raise fail_with_advice(self.settings, exc, trainer.state.global_step) from None
        if self.on_signal.stopped:
            raise Interrupted(f"stopped by a signal at step {trainer.state.global_step}; the checkpoint is saved "
                              f"in {self.files.checkpoints}: run again to resume")

    def _evaluate(self) -> None:
        """The eval loss (and for dpo/orpo trl's reward accuracy and margin) on the eval split."""
        if not len(self.eval_data):
            return
        trainer = self.trainer  # trl's trainers evaluate the eval pairs they prepared
        scores = trainer.evaluate() if self.pairs_stage else trainer.evaluate(eval_dataset=self.eval_data)
        self.summary["eval_loss"] = scores["eval_loss"]
        if self.pairs_stage:
            self.summary["reward_accuracy"] = scores.get("eval_rewards/accuracies")
            self.summary["reward_margin"] = scores.get("eval_rewards/margins")

    def _measure_preference(self) -> None:
        """The model's own preference accuracy and margin on the eval pairs, at the start and now."""
        end = preference.preference_accuracy(self.trainer.model, self.eval_pairs, self.pad_id)
        start = self.start_callback.result or end  # no training steps: the start is the end
        self.summary["preference"] = {"pairs": end["pairs"], "start_accuracy": start["accuracy"],
                                      "start_margin": start["margin"], "accuracy": end["accuracy"],
                                      "margin": end["margin"]}

    # -- save -----------------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Every process takes part in the save (ZeRO-3 gathers the shards); only rank 0 writes files, into a staging
        folder renamed into place, so a killed job never leaves an adapter folder that looks finished."""
        adapter_out = Path(self.files.adapter)
        staging = adapter_out.with_name(f".{adapter_out.name}.partial")
        if self.rank0 and staging.exists():
            shutil.rmtree(staging)
        self.trainer.save_model(str(staging))
        if not self.rank0:
            return
        self.tokenizer.save_pretrained(staging)
        copy_processor_files(self.model_dir, staging)  # a vision-language model's image processor, beside it
        if not still_wanted():  # Snakemake died during the last steps: no live job asked for these outputs
            raise Interrupted(f"Snakemake is gone: the trained weights stay in {staging}, unused; run again")
        if adapter_out.exists():
            shutil.rmtree(adapter_out)
        os.replace(staging, adapter_out)
        self._write_logs()
        shutil.rmtree(self.files.checkpoints, ignore_errors=True)

    def _write_logs(self) -> None:
        """train_log.csv, train_summary.json and the loss curve."""
        files = self.files
        rows = write_log_csv(self.trainer.state.log_history, files.train_log,
                             LOG_COLUMNS + (preference.LOG_COLUMNS if self.pairs_stage else []))
        if self.settings.max_steps != 0:
            self.summary.update(run_summary(self.trainer, self.result, rows))
        write_json(files.summary, self.summary)
        plot_loss(rows, files.curve, title=self.run_name)

    # -- cleanup --------------------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        distributed.finish_process_group()
