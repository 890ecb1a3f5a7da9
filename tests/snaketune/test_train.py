"""Train stage, through the same CLI the rule runs: every method learns, a killed run resumes exactly,
ZeRO-3 shards over two processes, and failures say what to change."""

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from conftest import REPO, run_train, train_command, workflow_env
from snaketune.dataset import build
from snaketune.errors import UserError
from snaketune.layout import dataset_outputs, run_outputs
from snaketune.settings import DatasetSettings, TrainSettings
from snaketune.train.checkpoints import complete_checkpoints
from snaketune.train.distributed import fix_cuda_arch_list
from snaketune.train.recipe import TrainFiles

FAST = {"learning_rate": 0.01, "per_device_train_batch_size": 8, "logging_steps": 5, "save_steps": 20,
        "save_total_limit": 2, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "warmup_steps": 0}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The identity dataset tokenized for the tiny model, and its manifest."""
    out = tmp_path_factory.mktemp("identity")
    build(DatasetSettings(path=str(REPO / "data" / "identity.jsonl"), format="messages", max_seq_length=64,
                          eval_size=8, test_size=8), tiny_tokenizer, dataset_outputs(out))
    return tiny_model / "manifest.json", out


def losses(run_dir):
    return pd.read_csv(run_dir / "train_log.csv")


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_each_method_trains_and_its_loss_falls(built, tmp_path, method):
    result = run_train(built, tmp_path, {**FAST, "method": method, "max_steps": 30, "gradient_checkpointing": True})
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # a failed job's log shows its failure, not noise
    lean = {"lora": 1, "qlora": 0, "full": 0}[method]  # the tiny model's one MLP; 4-bit or trained weights: none
    assert f"0 layers keep their inputs in host memory, {lean} MLPs keep gate and up only" in result.stdout
    log = losses(tmp_path)
    assert log["step"].iloc[-1] == 30 and log["loss"].iloc[-1] < 0.8 * log["loss"].iloc[0]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["global_step"] == 30 and summary["settings"]["method"] == method
    if method == "full":
        assert (tmp_path / "adapter" / "model.safetensors").is_file()
    else:
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (tmp_path / "loss.png").is_file() and not (tmp_path / "checkpoints").exists()


def test_lora_plus_and_modules_to_save_train_and_are_saved(built, tmp_path):
    from safetensors import safe_open

    run_train(built, tmp_path, {**FAST, "max_steps": 20, "loraplus_lr_ratio": 16, "modules_to_save": ["lm_head"]})
    log = losses(tmp_path)
    assert log["loss"].iloc[-1] < 0.8 * log["loss"].iloc[0]
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as weights:
        assert any("lm_head" in key for key in weights.keys())  # the head is trained in full and saved


def test_out_of_memory_ends_with_what_to_change(built, tmp_path, monkeypatch):
    import torch
    from transformers import Trainer

    from snaketune.train.recipe import train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    manifest, data = built
    with pytest.raises(UserError, match=r"out of GPU memory at step 0: lower per_device_train_batch_size \(now 8\)"
                                        r".*gradient_checkpointing: true \(now False\)"):
        files = {**dataset_outputs(data), **run_outputs(tmp_path)}
        train(TrainSettings(**{**FAST, "max_steps": 5}), manifest.parent, False, TrainFiles(
            train=files["train"], eval=files["eval"], stats=files["stats"], adapter=files["adapter"],
            train_log=files["train_log"], summary=files["train_summary"], curve=files["loss_curve"],
            checkpoints=files["checkpoints"]))
    assert not (tmp_path / "adapter").exists()


def test_a_4bit_model_keeps_its_layout_through_an_evaluation_on_any_cpu(tiny_model, monkeypatch):
    """bitsandbytes repacks a 4-bit weight in place for its CPU kernel at a forward without gradients where the CPU
    has AVX512-BF16, and fails on layers narrower than a block: QLoRA turns that off, so a run evaluates between
    its steps on every CPU alike, with its weights as they train."""
    import bitsandbytes.nn.modules
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from snaketune.train.model_setup import keep_4bit_layout

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)  # as on such a CPU
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, quantization_config=quantized)
    keep_4bit_layout(model)
    packed = {name: weight.data.clone() for name, weight in model.named_parameters() if weight.dtype == torch.uint8}
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert packed and torch.isfinite(logits).all()
    assert all(torch.equal(weight.data, packed[name]) for name, weight in model.named_parameters() if name in packed)


def test_tensorboard_events_are_written_when_asked(built, tmp_path):
    run_train(built, tmp_path, {**FAST, "max_steps": 4, "tensorboard": True})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def uninterrupted(built, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train(built, run_dir, {**FAST, "max_steps": 160})
    return losses(run_dir)


def start_train(built, run_dir, settings, log):
    """Start training in the background; its output goes to a file (a full pipe would block it)."""
    handle = open(log, "w")
    return subprocess.Popen(train_command(built, run_dir, settings), env=workflow_env(), start_new_session=True,
                            stdout=handle, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(folder, step, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(p.name.split("-")[1]) >= step for p in complete_checkpoints(folder)):
            return
        assert process.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint-{step} after {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_resumes_to_the_same_step_and_loss(built, tmp_path, uninterrupted, sig):
    settings = {**FAST, "max_steps": 160}
    process = start_train(built, tmp_path, settings, tmp_path / "first.log")
    wait_for_checkpoint(tmp_path / "checkpoints", 40, process)
    process.send_signal(sig)
    assert process.wait(timeout=120) != 0 and not (tmp_path / "adapter").exists()
    output = (tmp_path / "first.log").read_text()
    if sig == signal.SIGTERM:  # stopped cleanly: a checkpoint at the step it stopped, one line saying so
        assert "error: stopped by a signal at step" in output and "Traceback" not in output
    resume_step = int(complete_checkpoints(tmp_path / "checkpoints")[-1].name.split("-")[1])
    assert 40 <= resume_step < 160

    result = run_train(built, tmp_path, settings)
    assert f"resume from {tmp_path / 'checkpoints' / f'checkpoint-{resume_step}'}" in result.stderr
    resumed = losses(tmp_path)
    assert list(resumed["step"]) == list(uninterrupted["step"])  # one continuous curve, no step twice
    assert resumed["loss"].iloc[-1] == pytest.approx(uninterrupted["loss"].iloc[-1], rel=0.01)


@pytest.mark.slow
def test_zero3_in_two_processes_trains_consolidates_and_resumes(built, tmp_path, tied_model):
    """The expensive real run: full fine-tune, ZeRO-3, two CPU processes under torchrun, killed and resumed, on
    the GPU's fast path: packs sized in tokens, varlen attention and the fused loss (the head's weight gathered
    by ZeRO-3 for a forward that is not the head's own), on a model whose head is its input embedding (tied, as
    SmolLM2 and Qwen2.5-0.5B are: the two-node test below runs an untied one)."""
    import torch
    from transformers import AutoModelForCausalLM

    built = (tied_model / "manifest.json", built[1])  # the same tokenizer, so the same tokenized rows

    settings = {**FAST, "method": "full", "deepspeed": "zero3", "gpus": 2, "max_steps": 60, "learning_rate": 0.003,
                "packing": "tokens", "per_device_train_batch_size": 2, "attention": "varlen", "fused_loss": "chunked"}
    process = start_train(built, tmp_path, settings, tmp_path / "first.log")
    wait_for_checkpoint(tmp_path / "checkpoints", 20, process, timeout=300)
    os.killpg(process.pid, signal.SIGKILL)  # the whole launcher and both workers, as a node failure would
    process.wait(timeout=60)
    resume_step = int(complete_checkpoints(tmp_path / "checkpoints")[-1].name.split("-")[1])

    result = run_train(built, tmp_path, settings)
    assert f"resume from {tmp_path / 'checkpoints' / f'checkpoint-{resume_step}'}" in result.stderr
    assert "processes 2" in result.stderr
    summaries = [line for line in result.stdout.splitlines() if line.startswith('{"')]
    assert len(summaries) == 1 and json.loads(summaries[0])["global_step"] == 60  # rank 0 alone reports
    log = losses(tmp_path)
    assert log["step"].is_monotonic_increasing and log["step"].iloc[-1] == 60
    assert log["loss"].iloc[-1] < 0.8 * log["loss"].iloc[0]

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")  # consolidated: a normal HF folder
    base = AutoModelForCausalLM.from_pretrained(tied_model)
    shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    assert {name: tuple(p.shape) for name, p in trained.named_parameters()} == shapes
    assert trained.config.tie_word_embeddings and trained.lm_head.weight is trained.model.embed_tokens.weight
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)  # the shared weight trained, and was kept


def start_node(built, run_dir, settings, node, port):
    """One node's launcher of a 2-node Slurm job, as srun starts it on that node (here: both on this host)."""
    from snaketune.train.distributed import NODE_LAUNCHER

    env = {**workflow_env(), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": str(node), NODE_LAUNCHER: "1", "MASTER_PORT": str(port)}
    log = open(run_dir.parent / f"{run_dir.name}-node{node}.log", "a")
    return subprocess.Popen(train_command(built, run_dir, settings), env=env, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_nodes_train_zero3_resume_after_a_kill_and_match_two_local_processes(built, tmp_path, tiny_model):
    """The multi-node path without a multi-node cluster: two node launchers (SLURM_NODEID 0 and 1) meet at the
    first host of the node list through torchrun's static rendezvous, one process each, ZeRO-3 across them."""
    import socket

    from transformers import AutoModelForCausalLM

    settings = {**FAST, "method": "full", "deepspeed": "zero3", "max_steps": 40, "learning_rate": 0.003,
                "logging_steps": 1, "save_steps": 10}
    run_train(built, tmp_path / "local", {**settings, "gpus": 2})  # the reference: 2 processes on one machine

    def free_port():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def start_job():
        port = free_port()  # a restarted job is a new Slurm job: a new id, so a new port
        return [start_node(built, run_dir, {**settings, "nodes": 2}, node, port) for node in (0, 1)]

    def kill(nodes):  # a node failure: every process of the job dies at once
        for process in nodes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)

    run_dir = tmp_path / "nodes"
    nodes = start_job()
    try:
        wait_for_checkpoint(run_dir / "checkpoints", 20, nodes[0], timeout=300)
    finally:
        kill(nodes)
    checkpoint = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert not (run_dir / "adapter").exists()

    nodes = start_job()
    try:
        assert [process.wait(timeout=600) for process in nodes] == [0, 0]
    finally:
        kill(nodes)
    logs = [(tmp_path / f"nodes-node{node}.log").read_text() for node in (0, 1)]
    assert "rank 0 of 2: node 0, local rank 0" in logs[0] and "rank 1 of 2: node 1, local rank 0" in logs[1]
    assert f"resume from {checkpoint}" in logs[0]
    summaries = [[line for line in log.splitlines() if line.startswith('{"')] for log in logs]
    assert len(summaries[0]) == 1 and summaries[1] == []  # global rank 0 alone reports and writes the outputs

    reference, resumed = losses(tmp_path / "local"), losses(run_dir)
    assert list(resumed["step"]) == list(reference["step"]) == list(range(1, 41))
    assert (resumed["loss"] - reference["loss"]).abs().max() < 1e-4
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "adapter")  # consolidated: a normal HF folder
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert {n: p.shape for n, p in trained.named_parameters()} == {n: p.shape for n, p in base.named_parameters()}


def test_nodes_above_one_outside_slurm_is_one_line(built, tmp_path):
    result = subprocess.run(train_command(built, tmp_path, {**FAST, "nodes": 2, "max_steps": 2}),
                            capture_output=True, text=True, env=workflow_env())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: nodes: 2 spans several machines, which needs a Slurm job (--profile profiles/slurm); on one "
        "machine use nodes: 1 and gpus: <GPUs of the machine>"]


def test_a_nan_loss_stops_with_what_to_change(built, tmp_path):
    settings = {**FAST, "method": "full", "max_steps": 40, "learning_rate": 1e30, "max_grad_norm": 0}
    result = subprocess.run(train_command(built, tmp_path, settings), capture_output=True, text=True,
                            env=workflow_env())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("error: loss became"))
    assert "lower learning_rate (now 1e+30)" in line and not (tmp_path / "adapter").exists()


def test_zero3_in_one_process_trains_with_whole_decoder_layers_and_saves_a_loadable_model(built, tmp_path,
                                                                                          tiny_model):
    from transformers import AutoModelForCausalLM

    settings = {**FAST, "method": "full", "deepspeed": "zero3", "max_steps": 20, "learning_rate": 0.003}
    result = run_train(built, tmp_path, settings)
    assert "processes 1" in result.stderr
    log = losses(tmp_path)
    assert log["step"].iloc[-1] == 20 and log["loss"].iloc[-1] < 0.8 * log["loss"].iloc[0]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert trained.state_dict().keys() == base.state_dict().keys()
    assert all(trained.state_dict()[k].shape == v.shape for k, v in base.state_dict().items())


def test_zero3_keeps_parameters_whole_in_one_process_and_dpo_runs_without_prefetching():
    from snaketune.train.model_setup import deepspeed_config

    def zero(**settings):
        config = deepspeed_config(TrainSettings(method="full", **settings))
        return config["zero_optimization"] if isinstance(config, dict) else config

    whole = zero(deepspeed="zero3")
    assert whole["stage3_param_persistence_threshold"] >= 2**40  # nothing to shard with
    assert whole["reduce_bucket_size"] >= 10**8 and whole["memory_efficient_linear"] is False
    assert zero(deepspeed="zero3_offload")["stage3_param_persistence_threshold"] >= 2**40  # the optimizer only
    sharded = zero(deepspeed="zero3", gpus=2)
    assert sharded["stage3_param_persistence_threshold"] == sharded["reduce_bucket_size"] == "auto"
    assert "memory_efficient_linear" not in sharded
    assert zero(deepspeed="zero3", nodes=2)["stage3_param_persistence_threshold"] == "auto"
    assert zero(deepspeed="zero3", gpus=2, stage="dpo")["stage3_prefetch_bucket_size"] == 0
    assert zero(deepspeed="zero3", gpus=2)["stage3_prefetch_bucket_size"] == "auto"
    assert str(zero(deepspeed="zero2")).endswith("zero2.json")  # other stages: the file as it is


def test_hopper_arch_suffix_is_made_readable_for_deepspeed():
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}
    assert fix_cuda_arch_list(env) == "8.0;9.0" and env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert fix_cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0 9.0a+PTX"}) == "9.0;9.0+PTX"
    assert fix_cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}) is None


@pytest.mark.parametrize("settings, message", [
    ({"method": "qlora", "deepspeed": "zero3"}, "cannot shard 4-bit weights with ZeRO-3"),
    ({"method": "full", "loraplus_lr_ratio": 16}, "`loraplus_lr_ratio` needs method lora/qlora"),
    ({"deepspeed": "zero4"}, "deepspeed `zero4` is not one of zero1, zero2, zero3, zero3_offload"),
])
def test_known_bad_combinations_are_refused_before_any_work(settings, message):
    with pytest.raises(UserError, match=message):
        TrainSettings(**settings)


def test_qlora_in_bf16_keeps_the_frozen_weights_bf16_and_trains_fp32_adapters(tiny_model):
    """peft's kbit preparation would make the embeddings, norms and head fp32 (3 GiB more for a 14B model and an
    fp32 residual stream cast back to bf16 at every linear layer); in bf16 only the adapters are fp32. In an fp32
    (or fp16) run everything that is not 4-bit is fp32."""
    from snaketune.train.model_setup import load_model, resolve_speedups

    def dtypes(precision):
        settings = TrainSettings(method="qlora")
        model = load_model(settings, tiny_model, False, precision, resolve_speedups(settings, True, precision))
        kinds = {}
        for name, parameter in model.named_parameters():
            if type(parameter).__name__ != "Params4bit":
                kind = "adapter" if "lora_" in name else "base"
                kinds.setdefault(kind, set()).add((str(parameter.dtype), parameter.requires_grad))
        return kinds

    assert dtypes("bf16") == {"base": {("torch.bfloat16", False)}, "adapter": {("torch.float32", True)}}
    assert dtypes("fp32") == {"base": {("torch.float32", False)}, "adapter": {("torch.float32", True)}}


def test_library_noise_is_silenced_and_errors_are_not():
    import logging
    import warnings

    from snaketune.cli import quiet_known_noise

    quiet_known_noise()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")  # "Failed to load CPU gemm_4bit_forward ..."
    assert not bnb.isEnabledFor(logging.WARNING) and bnb.isEnabledFor(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_the_train_package_reads_in_short_functions():
    """The recipe and the modules beside it keep each function under 80 lines (train() once had 144)."""
    import ast

    long = []
    for path in sorted((REPO / "scripts" / "snaketune" / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long
